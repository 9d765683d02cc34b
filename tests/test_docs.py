"""The README's and docs' snippets run as written, so the docs cannot drift from what tvlang does.

Every fenced block of README.md and docs/*.md is collected:

- ``bash`` blocks: each ``tvlang …`` / ``python -m tvlang …`` command runs through the CLI and must
  exit 0; the commands that cannot run in a test (installs, the test suite itself, a GPU, the
  network) are listed in ``NOT_HERE`` with the reason, and any other command fails the test;
- ``python`` blocks that are tvlang programs (they parse as one) are checked and run;
- other ``python`` blocks are executed.

Each block runs in a fresh copy of the demo's playground (``tvlang demo --dir``): ``ckpt/`` with
the sentiment checkpoints and a LoRA adapter, ``sentiment.tv``, and the example files the README
says to copy there (``job.yaml``, ``merge.yml``).  Python
blocks also see ``base_sd`` and ``ft_sd``, the state dicts the README's example binds.  A block
preceded by ``<!-- doc-test: skip REASON -->`` is skipped with that reason.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tvlang import cli
from tvlang.errors import TvError
from tvlang.syntax.parser import parse

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(Path(p) for p in glob.glob(str(ROOT / "docs" / "*.md")))]
FENCE = re.compile(r"(?:<!-- doc-test: skip (?P<skip>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)

# Commands the docs show that a test does not run, and why.
NOT_HERE: list[tuple[Callable[[list[str]], bool], str]] = [
    (lambda a: a[0] == "pip", "installs packages"),
    (lambda a: a[:3] == ["python", "-m", "pytest"], "runs the test suite itself"),
    (lambda a: a[0] in ("ruff", "mypy"), "lint and type checks (.ci/run runs them)"),
    (lambda a: a[0] == "hf", "downloads from the Hugging Face Hub"),
    (
        lambda a: any("hf://" in x or x.startswith("Qwen/") for x in a),
        "reads a Hub model from the local cache",
    ),
    (lambda a: "cuda" in a, "needs a GPU"),
    (
        lambda a: a[0] == "ray" or "ray" in a,
        "needs a Ray cluster and shared storage (tests/test_ray.py runs one)",
    ),
    (
        lambda a: a[:2] == ["python", "examples/config/hydra_app.py"],
        "Hydra app: tests/test_config.py runs it",
    ),
    (lambda a: a[-1:] == ["demo"], "the demo: tests/test_cli.py runs it"),
    (
        lambda a: any(x.startswith("lm-eval:") for x in a),
        "lm-evaluation-harness tasks from the Hub (tests/test_tune_cli.py runs a local task)",
    ),
]


def blocks() -> list[pytest.ParameterSet]:
    params = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m["lang"] not in ("bash", "python"):
                continue
            line = text.count("\n", 0, m.start("body")) + 1
            marks = [pytest.mark.skip(reason=m["skip"])] if m["skip"] else []
            ident = f"{doc.relative_to(ROOT)}:{line}"
            params.append(pytest.param(m["lang"], m["body"], id=ident, marks=marks))
    return params


# The user's own files that docs/tune.md and the README's "Choosing λ" name: a program with the
# parameters they search, and a score function.
MERGE_TV = """\
base = load("ckpt/base")
a = load("ckpt/amazon_sent") - base
b = load("ckpt/yelp_lm") - base
param lam = 0.5
param density = 0.5
output merged = base + lam*ties(a, b, density=density)
"""
SCORE_PY = """\
def score(model):
    \"\"\"A stand-in for a validation accuracy: closeness of the MLP weights to zero.\"\"\"
    return -sum(float(p.float().abs().mean()) for n, p in model.named_parameters() if "mlp" in n)
"""


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tvlang.demo import make_playground
    from tvlang.synth import llama_shapes

    root = tmp_path_factory.mktemp("playground")
    make_playground(str(root), llama_shapes(hidden=16, layers=32, vocab=64))  # 32 layers: docs cut 0-24, 8-32
    shutil.copy(ROOT / "examples" / "config" / "job.yaml", root / "job.yaml")
    shutil.copy(ROOT / "examples" / "mergekit" / "ties.yml", root / "merge.yml")
    (root / "merge.tv").write_text(MERGE_TV)
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "eval.py").write_text(SCORE_PY)
    return root


@pytest.fixture
def workdir(playground: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "play"
    shutil.copytree(playground, work)
    monkeypatch.chdir(work)
    return work


def _is_program(body: str) -> bool:
    try:
        parse(body, "<doc>")
    except TvError:
        return False
    return True


def _run_shell(body: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run the block's tvlang commands; return how many ran, and why the others were not run."""
    ran, not_run = 0, []
    for raw in body.replace("\\\n", " ").splitlines():  # continued lines are one command
        words = shlex.split(raw, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
            words = words[1:]
        commands: list[list[str]] = [[]]
        for word in words:
            commands.append([]) if word == "&&" else commands[-1].append(word)
        for argv in filter(None, commands):
            reason = next((why for test, why in NOT_HERE if test(argv)), None)
            if reason is not None:
                not_run.append(f"`{' '.join(argv)}`: {reason}")
                continue
            if argv[:3] == ["python", "-m", "tvlang"]:
                argv = ["tvlang", *argv[3:]]
            assert argv[0] == "tvlang", f"a command the docs show and this test does not know: {raw!r}"
            code = cli.main(argv[1:])
            out, err = capsys.readouterr()
            assert code == 0, f"`{raw.strip()}` exited {code}:\n{err}{out}"
            ran += 1
    return ran, not_run


@pytest.mark.parametrize(("lang", "body"), blocks())
def test_doc_snippet_runs(
    lang: str, body: str, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if lang == "bash":
        ran, not_run = _run_shell(body, capsys)
        if not ran:
            pytest.skip("; ".join(not_run))
        return
    if _is_program(body):
        (workdir / "snippet.tv").write_text(body)
        for command in (["check", "snippet.tv"], ["run", "snippet.tv", "-o", "snippet_out", "-q"]):
            code = cli.main(command)
            out, err = capsys.readouterr()
            assert code == 0, f"tvlang {' '.join(command)} exited {code}:\n{err}{out}"
        assert any(f.endswith(".safetensors") for _, _, fs in os.walk("snippet_out") for f in fs)
        return
    for module in re.findall(r"^(?:from|import) (\w+)", body, re.M):
        pytest.importorskip(module, reason=f"the snippet imports {module}, an optional dependency")
    from safetensors.torch import load_file

    import tvlang

    sd = tvlang.evaluate("base", bindings={"base": "ckpt/base"})
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, "mypkg.eval", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    import mypkg.eval  # the playground's score function

    namespace = {
        "tvlang": tvlang,  # blocks that continue an earlier one use it without importing it again
        "base_sd": sd,
        "ft_sd": load_file("ckpt/amazon_sent/model.safetensors"),
        # the user's validation scores that docs/tune.md and the README call by these names
        "score": mypkg.eval.score,
        "val_accuracy": mypkg.eval.score,
        "evaluate_on_validation": mypkg.eval.score,
    }
    if re.search(r"\bmodel\b", body) and "model =" not in body:  # a model loaded in the block before
        transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
        namespace["model"] = transformers.AutoModelForCausalLM.from_pretrained("ckpt/base")
    exec(compile(body, "<doc>", "exec"), namespace)
