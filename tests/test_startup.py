"""A plain merge's start-up stays lean: what only job files, mergekit configs, LoRA outputs, `vocab`
statements or error messages need is imported when they need it, and Lark only when the text was
not parsed before (docs/performance.md, "Start-up").

Each command runs in a fresh process, which reports which of those modules it imported; a timing
test would be flaky on a shared machine, this one is not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tvlang.cli import build_parser
from tvlang.codegen import c
from tvlang.demo import make_playground
from tvlang.synth import llama_shapes

ROOT = Path(__file__).resolve().parents[1]

# Imported lazily: none of them may be loaded by a plain merge, check or plan.
LAZY = (
    "tvlang.config",  # job files
    "tvlang.mergekit",  # mergekit configs
    "tvlang.fields",
    "yaml",
    "tvlang.io.lora_out",  # --as-lora outputs
    "tvlang.io.vocab",  # `vocab` statements
    "tvlang.ir.vocab",
    "difflib",  # "did you mean" in error messages
    "subprocess",  # compiling a kernel not yet in the cache; `uname -p`
    "ctypes.util",
    "importlib.resources",
    "torch",
    "lark",  # a text parsed before comes from the parse cache
    "regex",  # (which Lark imports when it is installed)
    "concurrent.futures",  # the executor's workers are plain threads
    "logging",
)

REPORT = f"""\
import json, sys
from tvlang.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "loaded": sorted(m for m in {LAZY!r} if m in sys.modules)}}))
"""


# The same through the command's own entry point (`tvlang`, `python -m tvlang`), which ends the
# process with os._exit: the report is printed just before.
REPORT_FROM_RUN = f"""\
import json, os, sys
leave = os._exit
def report(code):
    print(json.dumps({{"code": code, "loaded": sorted(m for m in {LAZY!r} if m in sys.modules)}}), flush=True)
    leave(code)
os._exit = report
sys.argv = ["tvlang", *sys.argv[1:]]
from tvlang.cli import run
run()
"""


def run_cli(cwd: Path, cache: Path, *args: str, script: str = REPORT) -> list[str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "TVLANG_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, done.stdout + done.stderr
    loaded: list[str] = report["loaded"]
    return loaded


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    make_playground(str(root), llama_shapes(hidden=64, layers=2, vocab=256))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own cache: kernels compiled once for its tests, parses of its own."""
    return tmp_path_factory.mktemp("cache")


EVAL = [
    "eval",
    "base + 0.4*(ft - base)",
    "--bind",
    "base=ckpt/base",
    "--bind",
    "ft=ckpt/amazon_sent",
    "-o",
    "one.safetensors",
    "--force",
]
RUN = ["run", "sentiment.tv", "-o", "merged", "--force"]  # a directory: model card, side files


@pytest.mark.skipif(c.compiler() is None, reason="no C compiler: merges run on the eager (torch) path")
@pytest.mark.parametrize(
    "args",
    [
        EVAL,
        RUN,
        ["check", "sentiment.tv"],
        ["plan", "sentiment.tv"],
    ],
    ids=["eval to a file", "run to a directory", "check", "plan"],
)
def test_a_plain_command_imports_none_of_the_optional_modules(
    playground: Path, cache: Path, args: list[str]
) -> None:
    run_cli(playground, cache, *args)  # the first may compile kernels (subprocess) and parse: not the second
    assert run_cli(playground, cache, *args) == []


def written(path: Path) -> dict[str, bytes]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f.relative_to(path.parent)): f.read_bytes() for f in files if f.is_file()}


@pytest.mark.skipif(c.compiler() is None, reason="no C compiler: merges run on the eager (torch) path")
@pytest.mark.parametrize(
    ("args", "output"), [(EVAL, "one.safetensors"), (RUN, "merged")], ids=["eval", "run"]
)
def test_a_repeated_merge_parses_from_the_cache_without_lark(
    playground: Path, cache: Path, args: list[str], output: str
) -> None:
    """With an empty parse cache (kernels kept) the first run parses with Lark; the second reads its
    AST from the cache, imports neither Lark nor ``regex``, and writes the same bytes."""
    shutil.rmtree(cache / "parse", ignore_errors=True)
    assert "lark" in run_cli(playground, cache, *args)
    first = written(playground / output)
    assert run_cli(playground, cache, *args) == []
    assert written(playground / output) == first


@pytest.mark.skipif(importlib.util.find_spec("regex") is None, reason="`regex` is not installed here")
@pytest.mark.skipif(c.compiler() is None, reason="no C compiler: merges run on the eager (torch) path")
def test_the_command_parses_a_new_program_with_lark_but_without_regex(playground: Path, cache: Path) -> None:
    """Lark imports the optional ``regex`` module whenever it is installed and uses it for nothing
    tvlang asks; the command's process imports Lark without it, and writes the same bytes as a
    host's process, whose Lark keeps it."""
    shutil.rmtree(cache / "parse", ignore_errors=True)
    assert {"lark", "regex"} <= set(run_cli(playground, cache, *EVAL))  # as a library: main() in a host
    as_host = written(playground / "one.safetensors")
    shutil.rmtree(cache / "parse", ignore_errors=True)
    loaded = run_cli(playground, cache, *EVAL, script=REPORT_FROM_RUN)
    assert "lark" in loaded
    assert "regex" not in loaded
    assert written(playground / "one.safetensors") == as_host


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "m.tv", "-o", "out", "--set", "lam=0.1,0.2", "--threads", "2", "-q", "--force"],
        ["eval", "a + b", "--bind", "a=x", "--task", "b=y", "--dtype", "bf16", "--as-lora", "8"],
        ["plan", "m.tv", "--stage", "c", "--memory", "1G"],
        ["check", "-e", "a", "--keys", "union"],
        ["tune", "m.tv", "--param", "lam=0:1", "--score", "m:f", "-o", "o"],
        ["import-mergekit", "m.yml"],
        ["demo", "-q"],
    ],
)
def test_a_parser_for_one_command_reads_it_as_the_whole_parser_does(argv: list[str]) -> None:
    def parsed(command: str | None) -> dict[str, object]:
        return {k: v for k, v in vars(build_parser(command).parse_args(argv)).items() if k != "parser"}

    assert parsed(argv[0]) == parsed(None)


def test_the_kernel_host_key_follows_the_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is worked out once per compiler, not once per process: changing $CC changes it."""
    key = c._host_key()
    assert c._host_key() == key
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert c._host_key() != key
