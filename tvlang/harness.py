"""lm-evaluation-harness as a ready score for :func:`tvlang.tune` (the ``tvlang[lm-eval]`` extra).

``lm_eval_score(["hellaswag"], limit=200, tokenizer=tok)`` returns ``score(model) -> float``:
the mean over the tasks of each task's main metric (``acc_norm``, else ``acc``, else
``exact_match``, else the first metric it reports), negated where lower is better, measured on
the in-memory causal LM itself (``HFLM(pretrained=model)``), so the model is never written to
disk.  A task may also be a path to a task YAML file: its directory is added to the harness's
task search path, which is how tasks defined on local data files run offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from tvlang.errors import TvInputError, TvParamError

_PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mcc")


def _task_names(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """Task names, and the directories of the ones given as YAML files."""
    names, dirs = [], []
    for task in tasks:
        if task.lower().endswith((".yaml", ".yml")) and os.path.isfile(task):
            import yaml

            with open(task, encoding="utf-8") as f:
                config = yaml.safe_load(f)
            if not isinstance(config, dict) or "task" not in config:
                raise TvParamError(f"{task} is not an lm-eval task config (no `task:`)", code="E420")
            names.append(str(config["task"]))
            directory = os.path.dirname(os.path.abspath(task))
            if directory not in dirs:
                dirs.append(directory)
        else:
            names.append(task)
    if not names:
        raise TvParamError(
            "lm-eval: name at least one task", help="e.g. --score lm-eval:hellaswag", code="E420"
        )
    return names, dirs


def _load_tokenizer(path: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TvInputError(
            f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}",
            help="lm-eval needs the model's tokenizer files (tokenizer.json, tokenizer_config.json) there",
            code="E300",
        ) from None


def main_metric(results: dict[str, Any], higher: dict[str, Any] | None = None) -> float:
    """One task's headline number from lm-eval's ``results[task]`` (keys like ``"acc,none"``),
    negated when lm-eval says lower is better."""
    metrics = {k.split(",")[0]: v for k, v in results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}  # fmt: skip
    name = next((m for m in _PREFERRED if m in metrics), next(iter(metrics), None))
    if name is None:
        raise TvParamError("lm-eval reported no metric for a task", code="E420")
    value = float(metrics[name])
    return value if (higher or {}).get(name, True) else -value


def lm_eval_score(
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
) -> Callable[[Any], float]:
    """A score that runs lm-evaluation-harness ``tasks`` (at most ``limit`` examples each) on a
    ``transformers`` causal LM; ``tokenizer`` is the model's (the harness needs one), or the
    directory to load it from."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TvParamError(
            "--score lm-eval needs lm-evaluation-harness", help='pip install "tvlang[lm-eval]"', code="E420"
        ) from None
    names, dirs = _task_names(tasks)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = _load_tokenizer(os.fspath(tokenizer))
    manager = TaskManager(include_path=dirs or None)
    wrapped: dict[int, Any] = {}  # the model is merged into in place: one wrapper serves every trial

    def score(model: Any) -> float:
        if not hasattr(model, "config"):
            raise TvParamError(
                "lm-eval scores a transformers model",
                help="give the template as a directory with a config.json (and install transformers)",
                code="E420",
            )
        lm = wrapped.get(id(model))
        if lm is None:
            lm = wrapped[id(model)] = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, verbosity="ERROR", log_samples=False
        )
        higher = out.get("higher_is_better", {})
        values = [main_metric(out["results"][t], higher.get(t)) for t in names]
        return sum(values) / len(values)

    return score


__all__ = ["lm_eval_score", "main_metric"]
