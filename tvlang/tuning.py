"""Choosing a program's parameters by measuring: merge, score, search.

:func:`tune` runs a program once per trial with new parameter values, straight into a model
that is already in memory (``into=``, see :meth:`tvlang.Program.run`), calls the user's
``score(model)`` (higher is better) and keeps the best.  Nothing is written to disk per trial,
and the compiled kernels take the weights as arguments, so a trial costs one merge.

Search: ``"grid"`` (built in: every combination of the values of each parameter) or an
`Optuna <https://optuna.org>`_ sampler (``"random"``, ``"tpe"``, ``"cmaes"``; the
``tvlang[tune]`` extra), seeded, so the same seed and scores give the same trials.

>>> import torch, tvlang
>>> base = {"w": torch.tensor([0.0, 0.0])}
>>> ft = {"w": torch.tensor([1.0, 1.0])}
>>> res = tvlang.tune("param lam = 0\\nbase + lam*tau", {"lam": [0.0, 0.5, 1.0]},
...                   lambda m: -abs(float(m["w"][0]) - 0.5),
...                   bindings={"base": base, "tau": tvlang.task_vector(ft)}, progress=False)
>>> res.best_params, res.best_score
({'lam': 0.5}, -0.0)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

from tvlang.api import Program, compile, compile_file
from tvlang.errors import TvInputError, TvOutputError, TvParamError
from tvlang.options import Options

SAMPLERS = ("grid", "random", "tpe", "cmaes")
GRID_POINTS = 11  # values per range in a grid search without a trial budget: 0, 0.1, ..., 1 over [0, 1]
DEFAULT_TRIALS = 20  # trials of a sampler without a budget


@dataclass(frozen=True)
class Range:
    """A continuous parameter: uniform between ``low`` and ``high``, or log-uniform (``log=True``)."""

    low: float
    high: float
    log: bool = False

    def grid(self, points: int) -> list[float]:
        """``points`` evenly spaced values, both ends included (geometrically for a log range)."""
        if points == 1:
            return [self.low]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [round(math.exp(a + (b - a) * i / (points - 1)), 12) for i in range(points)]
        return [round(self.low + (self.high - self.low) * i / (points - 1), 12) for i in range(points)]


def log_range(low: float, high: float) -> Range:
    """A log-uniform range, for parameters that span orders of magnitude."""
    return Range(float(low), float(high), log=True)


Dimension = Range | list[float]  # a range, or the values to try


def _dimensions(space: Mapping[str, Any]) -> dict[str, Dimension]:
    """``(low, high)`` → a range, a list → its values, a :class:`Range` as it is; E420 otherwise."""
    if not isinstance(space, Mapping) or not space:
        raise TvParamError("the search space is empty", help='give e.g. {"lam": (0.0, 1.0)}', code="E420")
    dims: dict[str, Dimension] = {}
    for name, spec in space.items():
        dim: Dimension
        try:
            if isinstance(spec, Range):
                dim = Range(float(spec.low), float(spec.high), spec.log)
            elif isinstance(spec, tuple) and len(spec) == 2:
                dim = Range(float(spec[0]), float(spec[1]))
            elif isinstance(spec, (list, tuple)) and spec:
                dim = [float(v) for v in spec]
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise TvParamError(
                f"parameter `{name}`: {spec!r} is not a range or a list of values",
                help="a range is (low, high) or tvlang.log_range(low, high); values are a list [a, b, c]",
                code="E420",
            ) from None
        if isinstance(dim, Range) and not (dim.low < dim.high and (dim.low > 0 or not dim.log)):
            what = "0 < low < high" if dim.log else "low < high"
            raise TvParamError(
                f"parameter `{name}`: range {dim.low:g}..{dim.high:g} needs {what}", code="E420"
            )
        dims[str(name)] = dim
    return dims


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, float]
    score: float
    seconds: float  # merge + score


@dataclass
class TuneResult:
    """Every completed trial, in order, and the best one (the highest score; the first on ties)."""

    trials: list[Trial]
    space: dict[str, Dimension]
    sampler: str = "grid"
    seed: int = 0
    interrupted: bool = False  # stopped by Ctrl-C: the trials completed until then
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Trial:
        scored = [t for t in self.trials if not math.isnan(t.score)]
        if not scored:
            raise TvParamError("no trial has completed with a score", code="E420")
        return max(scored, key=lambda t: t.score)  # max keeps the first of equal scores

    @property
    def best_params(self) -> dict[str, float]:
        return dict(self.best.params)

    @property
    def best_score(self) -> float:
        return self.best.score

    def to_dict(self) -> dict[str, Any]:
        space = {
            k: {"low": d.low, "high": d.high, "log": d.log} if isinstance(d, Range) else list(d)
            for k, d in self.space.items()
        }
        return {
            "tvlang.tune": 1,
            "sampler": self.sampler,
            "seed": self.seed,
            "space": space,
            "interrupted": self.interrupted,
            **({"meta": self.meta} if self.meta else {}),
            "trials": [asdict(t) for t in self.trials],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the study as JSON (atomically: a crash leaves the previous file); :func:`tune`
        resumes from it with ``study=path``."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TuneResult:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            space: dict[str, Dimension] = {
                k: Range(v["low"], v["high"], v["log"]) if isinstance(v, dict) else [float(x) for x in v]
                for k, v in data["space"].items()
            }
            trials = [Trial(int(t["number"]), dict(t["params"]), float(t["score"]), float(t["seconds"]))
                      for t in data["trials"]]  # fmt: skip
            return cls(trials, space, data["sampler"], int(data["seed"]), bool(data.get("interrupted")),
                       dict(data.get("meta", {})))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TvParamError(f"cannot read the study {os.fspath(path)}: {e}", code="E420") from None

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        names = list(self.space)
        with open(path, "w", encoding="utf-8") as f:
            f.write(",".join(["trial", *names, "score", "seconds"]) + "\n")
            for t in self.trials:
                f.write(
                    ",".join(map(repr, [t.number, *(t.params[n] for n in names), t.score, t.seconds])) + "\n"
                )

    def to_dataframe(self) -> Any:
        """One row per trial: ``trial``, each parameter, ``score``, ``seconds`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise TvParamError(
                "to_dataframe() needs pandas", help="pip install pandas", code="E420"
            ) from None
        return pd.DataFrame(
            [{"trial": t.number, **t.params, "score": t.score, "seconds": t.seconds} for t in self.trials]
        )

    def plot(self, path: str | os.PathLike[str] | None = None, *, title: str | None = None) -> Any:
        """Score against each parameter (one panel each), the best trial marked; saved to ``path``
        if given.  Returns the matplotlib figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = list(self.space)
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
        best = self.best if any(not math.isnan(t.score) for t in self.trials) else None
        for ax, name in zip(axes[0], names, strict=True):
            points = sorted((t.params[name], t.score) for t in self.trials)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if len(self.space) == 1:
                ax.plot(xs, ys, "-o", ms=4, color="tab:blue")
            else:
                ax.scatter(xs, ys, s=14, color="tab:blue", alpha=0.7)
            if best is not None:
                ax.scatter([best.params[name]], [best.score], s=80, facecolors="none", edgecolors="tab:red",
                           label=f"best: {name} = {best.params[name]:.4g}")  # fmt: skip
                ax.legend(loc="best", fontsize=8)
            dim = self.space[name]
            if isinstance(dim, Range) and dim.log:
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel("score")
            ax.grid(alpha=0.3)
        fig.suptitle(title or f"{len(self.trials)} trials ({self.sampler})", fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


class _Bar:
    """Trials done, the best so far and seconds per trial, on one line of a stream."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream = total, stream
        self.tty = bool(stream is not None and stream.isatty())
        self.start = time.perf_counter()

    def update(self, done: int, best: Trial | None, end: str = "") -> None:
        if self.stream is None or not (self.tty or end):
            return
        frac = min(1.0, done / max(self.total, 1))
        rate = (time.perf_counter() - self.start) / max(done, 1)
        shown = ""
        if best is not None:
            shown = f"  best {best.score:.6g} at " + ", ".join(f"{k}={v:.4g}" for k, v in best.params.items())
        line = f"tune [{'#' * int(frac * 20):<20}] {done}/{self.total}  {rate:.2f} s/trial{shown}"
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _grid(dims: Mapping[str, Dimension], trials: int | None) -> list[dict[str, float]]:
    """Every combination; each range gets ``GRID_POINTS`` values, or as many as fit ``trials``."""
    ranges = [d for d in dims.values() if isinstance(d, Range)]
    fixed = math.prod(len(d) for d in dims.values() if not isinstance(d, Range))
    points = GRID_POINTS
    if trials is not None and ranges:
        points = max(1, int((trials / fixed) ** (1 / len(ranges)) + 1e-9))
    axes = [d.grid(points) if isinstance(d, Range) else list(d) for d in dims.values()]
    combos = [dict(zip(dims, values, strict=True)) for values in itertools.product(*axes)]
    return combos[:trials] if trials is not None else combos


def _program(program: Program | str | os.PathLike[str], bindings: Mapping[str, Any] | None) -> Program:
    if isinstance(program, Program):
        return Program(program.syntax, {**program.bindings, **(bindings or {})}) if bindings else program
    text = os.fspath(program)
    if isinstance(program, os.PathLike) or (text.endswith(".tv") and "\n" not in text):
        return compile_file(text, bindings=bindings)
    return compile(text, bindings=bindings)


def _storages(value: Any) -> set[int]:
    if hasattr(value, "state_dict") and callable(value.state_dict):
        value = value.state_dict()
    value = getattr(value, "value", value)  # a Binding
    if isinstance(value, Mapping):
        return {t.untyped_storage().data_ptr() for t in value.values() if isinstance(t, torch.Tensor)}
    return set()


def _check_not_an_input(prog: Program, into: Any) -> None:
    """A model merged into on every trial must not be read by the program: after the first trial
    it no longer holds the input's values."""
    ours = _storages(into)
    for name, bound in prog.bindings.items():
        if ours & _storages(bound):
            raise TvOutputError(
                f"the model tuned into= is also the program's input `{name}`",
                help="bind the input to its checkpoint file (or a copy); the trials overwrite into=",
                code="E510",
            )


def _sampler(name: str, seed: int) -> Any:
    try:
        import optuna
    except ImportError:
        raise TvParamError(
            f"sampler {name!r} needs Optuna",
            help='pip install "tvlang[tune]", or use sampler="grid"',
            code="E420",
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _distributions(dims: Mapping[str, Dimension]) -> dict[str, Any]:
    import optuna

    return {
        k: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)
        if isinstance(d, Range)
        else optuna.distributions.CategoricalDistribution(list(d))
        for k, d in dims.items()
    }


def _suggestions(
    dims: Mapping[str, Dimension],
    sampler: str,
    seed: int,
    total: int,
    done: list[Trial],
    storage: str | None,
) -> Iterator[tuple[dict[str, float], Callable[[float], None]]]:
    """Parameter values to try next, each with the call that reports its score back (trials an
    Optuna storage already holds are appended to ``done`` first)."""
    if sampler == "grid":
        seen = {tuple(sorted(t.params.items())) for t in done}
        for params in _grid(dims, total):
            if tuple(sorted(params.items())) not in seen:
                yield params, lambda _: None
        return
    import optuna

    dists = _distributions(dims)
    study = optuna.create_study(
        direction="maximize",
        sampler=_sampler(sampler, seed),
        storage=storage,
        study_name=f"tvlang-{sampler}-{seed}" if storage else None,
        load_if_exists=storage is not None,
    )
    if storage is not None:  # a study resumed from Optuna's storage: its trials are ours too
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        for frozen in study.trials:
            if frozen.state in finished:
                seconds = frozen.duration.total_seconds() if frozen.duration is not None else 0.0
                value = float("nan") if frozen.value is None else float(frozen.value)
                done.append(Trial(len(done), {k: float(v) for k, v in frozen.params.items()}, value, seconds))
    else:  # a study resumed from JSON: the sampler sees the completed trials
        for t in done:
            ok = not math.isnan(t.score)
            state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
            study.add_trial(
                optuna.trial.create_trial(
                    params=t.params, distributions=dists, value=t.score if ok else None, state=state
                )
            )
    for _ in range(total - len(done)):
        trial = study.ask(dists)
        params = {k: float(v) for k, v in trial.params.items()}

        def tell(score: float, trial: Any = trial) -> None:
            if math.isnan(score):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, score)

        yield params, tell


def tune(
    program: Program | str | os.PathLike[str],
    space: Mapping[str, Any],
    score: Callable[[Any], float],
    *,
    bindings: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    into: Any = None,
    trials: int | None = None,
    sampler: str = "grid",
    seed: int = 0,
    options: Options | None = None,
    study: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_best: bool = True,
) -> TuneResult:
    """Search ``space`` for the parameters of ``program`` whose merge ``score`` rates highest.

    ``program``: source text, a ``.tv`` path or a compiled :class:`~tvlang.Program` (one output);
    ``bindings`` as in :func:`tvlang.evaluate`; ``params`` fixes other parameters for every trial.
    ``space`` maps each ``param`` to a range
    ``(low, high)``, a :func:`log_range`, or a list of values.  ``score(model) -> float`` rates one
    merge (higher is better; NaN marks a failed trial); ``model`` is ``into`` when given (an
    ``nn.Module`` or a state dict of tensors, merged into in place on every trial), else the
    merged state dict.  ``trials``: how many (default: the whole grid; 20 for a sampler).
    ``study``: a JSON file written after every trial and resumed from when it exists, or an Optuna
    storage URL (``sqlite:///study.db``) for the Optuna samplers.  Ctrl-C abandons the trial in
    progress and returns the completed ones (``interrupted=True``).  With ``keep_best``,
    ``into`` holds the best trial's merge at the end.
    """
    if sampler not in SAMPLERS:
        raise TvParamError(
            f"unknown sampler {sampler!r}", help="choose one of " + ", ".join(SAMPLERS), code="E420"
        )
    if trials is not None and trials < 1:
        raise TvParamError(f"trials must be at least 1, not {trials}", code="E420")
    if not callable(score):
        raise TvParamError(f"score must be callable, not a {type(score).__name__}", code="E420")
    dims = _dimensions(space)
    prog = _program(program, bindings)
    options = options or Options()
    if into is not None:
        _check_not_an_input(prog, into)
    fixed = dict(params or {})
    both = sorted(set(fixed) & set(dims))
    if both:
        raise TvParamError(f"`{both[0]}` is both searched and fixed", code="E420")
    first = fixed | {k: d.low if isinstance(d, Range) else d[0] for k, d in dims.items()}
    prog.plan(first, options=options)  # unknown parameters, missing inputs: before any trial

    storage = None
    path = None if study is None else os.fspath(study)
    if path is not None and (path.startswith("sqlite:") or "://" in path):
        if sampler == "grid":
            raise TvParamError(
                "an Optuna storage needs an Optuna sampler", help="save grids as JSON", code="E420"
            )
        storage, path = path, None
    result = TuneResult([], dims, sampler, seed)
    if path is not None and os.path.exists(path):
        previous = TuneResult.load(path)
        if previous.space != dims or previous.sampler != sampler or previous.seed != seed:
            raise TvParamError(
                f"the study {path} was made with another space, sampler or seed",
                help="give another study file, or the same space, sampler and seed",
                code="E420",
            )
        result.trials = previous.trials
    total = len(_grid(dims, trials)) if sampler == "grid" else (trials or DEFAULT_TRIALS)
    bar = _Bar(total, sys.stderr if progress else None)
    best: Trial | None = result.best if any(not math.isnan(t.score) for t in result.trials) else None
    bar.update(len(result.trials), best)
    try:
        for params, tell in _suggestions(dims, sampler, seed, total, result.trials, storage):
            start = time.perf_counter()
            model = prog.run(params=fixed | params, options=options, into=into)
            value = score(model)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TvParamError(
                    f"score returned a {type(value).__name__}, not a number", code="E420"
                ) from None
            tell(value)
            trial = Trial(len(result.trials), params, value, time.perf_counter() - start)
            result.trials.append(trial)
            if not math.isnan(value) and (best is None or value > best.score):
                best = trial
            if path is not None:
                result.save(path)
            bar.update(len(result.trials), best)
    except KeyboardInterrupt:
        result.interrupted = True
        if path is not None:
            result.save(path)
    best = result.best if any(not math.isnan(t.score) for t in result.trials) else None
    bar.update(len(result.trials), best, end="\n")
    if into is not None and keep_best and best is not None:
        prog.run(params=fixed | best.params, options=options, into=into)
    return result


def parse_dimension(name: str, text: str) -> Dimension:
    """The command line's forms: ``0:1`` (a range), ``log:1e-3:1`` (a log range), ``0.2,0.4,0.6``
    or ``0.5`` (values)."""
    try:
        parts = text.split(":")
        if len(parts) == 3 and parts[0].strip().lower() == "log":
            return _dimensions({name: log_range(float(parts[1]), float(parts[2]))})[name]
        if len(parts) == 2:
            return _dimensions({name: (float(parts[0]), float(parts[1]))})[name]
        if len(parts) == 1:
            return [float(v) for v in text.split(",")]
    except ValueError:
        pass
    raise TvParamError(
        f"--param {name}={text}: not a range LOW:HIGH, log:LOW:HIGH or values A,B,C", code="E420"
    )


def load_score(spec: str, *, limit: int | None = None, tokenizer: Any = None) -> Callable[[Any], float]:
    """``module:function`` (imported; the current directory is searched first, as ``python -m``
    does), or ``lm-eval:TASK[,TASK...]`` (lm-evaluation-harness, see :mod:`tvlang.harness`)."""
    if spec.startswith("lm-eval:"):
        from tvlang.harness import lm_eval_score

        tasks = [t for t in spec.removeprefix("lm-eval:").split(",") if t]
        return lm_eval_score(tasks, limit=limit, tokenizer=tokenizer)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TvParamError(
            f"--score {spec!r}: expected MODULE:FUNCTION or lm-eval:TASK",
            help="e.g. --score mypkg.eval:score (a function taking the model, returning a float)",
            code="E420",
        )
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TvParamError(f"--score: cannot import {module_name}: {e}", code="E420") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TvParamError(f"--score: {module_name} has no function `{attr}`", code="E420")
    return fn  # type: ignore[no-any-return,unused-ignore]


def load_template(path: str, dtype: str | None = None) -> Any:
    """The model trials merge into, read once from the program's template checkpoint: a
    ``transformers`` model when the directory has a ``config.json`` and transformers is installed
    (weights loaded as it loads them), else a state dict of the checkpoint's tensors."""
    from tvlang.api import evaluate
    from tvlang.plan.planner import parse_dtype

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        try:
            import transformers
        except ImportError:
            pass
        else:
            torch_dtype: Any = "auto"
            if dtype is not None:
                from tvlang.io.safetensors import TORCH_DTYPES

                torch_dtype = TORCH_DTYPES[parse_dtype(dtype) or "F32"]
            model: Any
            try:
                try:
                    model = transformers.AutoModelForCausalLM.from_pretrained(
                        path, dtype=torch_dtype, local_files_only=True
                    )
                except TypeError:  # transformers < 4.56 names it torch_dtype
                    model = transformers.AutoModelForCausalLM.from_pretrained(
                        path, torch_dtype=torch_dtype, local_files_only=True
                    )
            except (OSError, ValueError, KeyError) as e:
                raise TvInputError(
                    f"transformers cannot load the template model {path}: {str(e).splitlines()[0]}",
                    help="check its config.json, or score a state dict: a template without config.json",
                    code="E300",
                ) from None
            model.eval()
            return model
    return evaluate("template", {"template": path}, dtype=dtype)


__all__ = [
    "SAMPLERS",
    "Range",
    "Trial",
    "TuneResult",
    "load_score",
    "load_template",
    "log_range",
    "parse_dimension",
    "tune",
]
