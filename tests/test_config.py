"""Job files and the OmegaConf/Hydra path, at the level users touch them: the CLI, Python, YAML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tvlang
from tvlang import cli
from tvlang.config import job_from_mapping, load_job, run_job, sum_of_names
from tvlang.errors import TvError, TvParamError
from tvlang.synth import llama_shapes, make_family

from .conftest import MISSION, NAMES

pytest.importorskip("yaml", reason="job files in YAML need PyYAML (the `config` extra)")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config"
TASKS = {n: {"path": f"ckpt/{n}", "role": "task"} for n in NAMES[1:]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentiment family as the example expects it: ckpt/NAME directories, the base sharded."""
    root = tmp_path_factory.mktemp("config")
    make_family(str(root / "ckpt"), NAMES, llama_shapes(32, 2, 64), layout="dir", base_shards=2)
    return root


@pytest.fixture
def work(ckpt: Path, tmp_path: Path) -> Path:
    """A fresh directory with ckpt/ in it, so each test writes its own outputs."""
    (tmp_path / "ckpt").symlink_to(ckpt / "ckpt")
    return tmp_path


def reference(root: Path) -> dict[str, torch.Tensor]:
    bindings = {"base": str(root / "ckpt" / "base")}
    bindings.update({n: tvlang.task_vector(str(root / "ckpt" / n)) for n in NAMES[1:]})
    result: dict[str, torch.Tensor] = tvlang.evaluate(MISSION, bindings)
    return result


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def params_of(path: Path) -> dict[str, float]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    params: dict[str, float] = json.loads(meta["tvlang.params"])
    return params


# -- the example, through the CLI ------------------------------------------------------------------


def test_example_job_runs_via_cli(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = work / "job.yaml"
    shutil.copy(EXAMPLE / "job.yaml", job)
    assert cli.main(["run", str(job), "-q"]) == 0, capsys.readouterr().err
    written = work / "merged_job" / "model.safetensors"
    assert same(load_file(str(written)), reference(work))
    assert params_of(written) == {"lam": 0.4}  # the job's params are recorded like a program's
    assert (work / "merged_job" / "config.json").exists()  # side files come from the base, as for .tv


def test_cli_flags_override_the_job(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(EXAMPLE / "job.yaml", work / "job.yaml")
    out = work / "other.safetensors"
    args = ["run", str(work / "job.yaml"), "-q", "-o", str(out), "--set", "lam=0.3", "--dtype", "fp32"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert params_of(out) == {"lam": 0.3}
    assert next(iter(load_file(str(out)).values())).dtype == torch.float32
    assert cli.main(args) == 1 and "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert cli.main(["run", str(work / "job.yaml"), "-q", "-o", str(out), "--force", "--set", "lamb=1"]) == 1
    err = capsys.readouterr().err
    assert "E401" in err and "did you mean `lam`" in err


def test_cli_job_needs_an_output(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "job.yaml").write_text("expression: base\nbindings: {base: ckpt/base}\n")
    assert cli.main(["run", str(work / "job.yaml")]) == 1
    err = capsys.readouterr().err
    assert "E406" in err and "has no `output:`" in err and "-o PATH" in err


def test_tv_run_still_requires_o(work: Path) -> None:
    (work / "p.tv").write_text('load("ckpt/base")\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(work / "p.tv")])
    assert exit_.value.code == 2


def test_missing_checkpoint_points_into_the_job(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "job.yaml").write_text(
        "expression: base + 0.5*ft\nbindings:\n  base: ckpt/base\n  ft: {path: ckpt/nope, role: task}\n"
    )
    assert cli.main(["run", str(work / "job.yaml"), "-o", str(work / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and "job.yaml:4:14" in err and "Traceback" not in err


# -- Python ----------------------------------------------------------------------------------------


def test_python_mapping_json_and_program_agree(work: Path) -> None:
    expected = reference(work)
    spec = {"expression": MISSION.replace("0.4", "lam"), "bindings": {"base": "ckpt/base", **TASKS}}
    spec["params"] = {"lam": 0.4}
    assert same(run_job(spec, base_dir=work), expected)  # no output: the state dict, as Program.run
    (work / "job.json").write_text(json.dumps(spec))
    assert same(run_job(work / "job.json"), expected)
    (work / "sentiment.tv").write_text((ROOT / "examples" / "sentiment" / "sentiment.tv").read_text())
    (work / "sub").mkdir()
    (work / "sub" / "job.yaml").write_text("program: ../sentiment.tv\nparams: {lam: 0.4}\n")
    job = load_job(work / "sub" / "job.yaml")
    assert job.program == str(work / "sentiment.tv")  # relative to the job file
    assert same(run_job(job), expected)


def test_python_sweep_and_overrides(work: Path) -> None:
    job = load_job_text(work, "expression: base + lam*amazon_sent\nparams: {lam: [0.0, 1.0]}\n", TASKS)
    out = run_job(job, output=str(work / "sweep"), threads=1, memory="1M")  # a sweep: one pass, two outputs
    assert len(out) == 2 and all(name.startswith("out.lam=") for name in out), out
    at_zero = next(path for name, path in out.items() if name.startswith("out.lam=0"))
    base = tvlang.evaluate("base", {"base": str(work / "ckpt" / "base")})
    assert same(load_file(os.path.join(at_zero, "model.safetensors")), base)
    with pytest.raises(TvParamError, match="unknown option `treads`") as err:
        run_job(job, treads=2)
    assert "did you mean `threads`" in str(err.value)
    with pytest.raises(TvParamError, match="`device` 'tpu' is not one of cpu, cuda, auto"):
        run_job(job, device="tpu")


def load_job_text(work: Path, text: str, bindings: dict[str, dict[str, str]]) -> tvlang.config.Job:
    path = work / "job.yaml"
    path.write_text(
        text
        + "bindings:\n  base: ckpt/base\n"
        + "".join(f"  {n}: {json.dumps(b)}\n" for n, b in bindings.items())
    )
    return load_job(path)


# -- validation: every error names the field and points at it ------------------------------------------


BAD = [
    ("expression: a\nbindigs: {a: x}\n", "unknown field `bindigs`", "2:1", "did you mean `bindings`"),
    (
        "expression: a\nbindings:\n  a: {path: x, role: tsk}\n",
        "`bindings.a.role` must be one of",
        "3:22",
        "`task`",
    ),
    ("expression: a\nbindings:\n  a: {pth: x}\n", "unknown field `bindings.a.pth`", "3:7", "`path`"),
    ("expression: a\nbindings:\n  a: {role: task}\n", "`bindings.a` needs a `path:`", "3:3", None),
    ("expression: a\nbindings:\n  a: 0.5\n", "must be a path or a mapping", "3:6", "under `params:`"),
    ("expression: a\nbindings:\n  a: {path: x, base: b}\n", "only a task has a base", "3:16", None),
    ("expression: a\nbindings:\n  1a: x\n", "`1a` is not a valid name", "3:3", None),
    (
        "expression: a\nparams: {lam: abc}\n",
        "`params.lam` must be a finite number, not a string ('abc')",
        "2:15",
        None,
    ),
    ("expression: a\nparams: {lam: []}\n", "`params.lam` must be a number or a non-empty list", "2:15", None),
    ("expression: a\nparams: {lam: [0.1, x]}\n", "`params.lam[1]` must be a finite number", "2:21", None),
    ("expression: a\ndevice: tpu\n", "`device` 'tpu' is not one of cpu, cuda, auto", "2:9", "device: cpu"),
    ("expression: a\nmemory: lots\n", "`memory` 'lots' is not a size", "2:9", "512M"),
    (
        "expression: a\nthreads: 0\n",
        "`threads` must be an integer of at least 1, not a number (0)",
        "2:10",
        None,
    ),
    ("expression: a\noverwrite: 'yes'\n", "`overwrite` must be true or false", "2:12", None),
    ("expression: a\nnonfinite: warning\n", "must be one of error, warn, propagate", "2:12", "`warn`"),
    ("expression: a\nkernels: compile\n", "must be one of auto, compiled, eager", "2:10", "`compiled`"),
    ("expression: a\ndtype: bf17\n", "`dtype` 'bf17' is not a dtype", "2:8", "bf16"),
    ("expression: a\noutput: [a, b]\n", "`output` must be a path or a mapping", "2:9", None),
    ("expression: a\nroots: ckpt\n", "`roots` must be a list of directories", "2:8", None),
    ("program: p.tv\nexpression: a\n", "not both", "2:1", None),
    ("params: {lam: 1}\n", "needs `program:` (a .tv file) or `expression:`", None, None),
    ("- expression: a\n", "a job is a mapping of fields, not a list", None, None),
    ("expression: a\nexpression: b\n", "`expression` is given twice", "2:1", None),
    (
        "expression: !!python/object/apply:os.system [echo]\n",
        "could not determine a constructor",
        "1:13",
        None,
    ),
    ("expression: a\n  bad: [\n", "is not valid", "2:6", None),
]


@pytest.mark.parametrize(("text", "message", "where", "hint"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_yaml_job(tmp_path: Path, text: str, message: str, where: str | None, hint: str | None) -> None:
    (tmp_path / "p.tv").write_text("load('x')\n")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(TvParamError) as err:
        load_job(path)
    report = str(err.value)
    assert err.value.code == "E406" and message in report, report
    if where is not None:
        assert f"job.yaml:{where}" in report, report
    if hint is not None:
        assert err.value.help is not None and hint in err.value.help, report


def test_bad_json_job_points_at_the_value(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"expression": "a",\n "bindings": {"a": {"path": "x", "role": 3}}}\n')
    with pytest.raises(TvParamError, match=r"`bindings.a.role` must be one of model, task, delta") as err:
        load_job(path)
    assert "job.json:2:42" in str(err.value)
    path.write_text('{"expression": "a",}')
    with pytest.raises(TvParamError, match="is not valid") as err:
        load_job(path)
    assert "job.json:1:" in str(err.value)


def test_mapping_errors_name_the_field_and_the_job() -> None:
    with pytest.raises(TvParamError) as err:
        job_from_mapping(
            {"expression": "a", "bindings": {"a": {"path": "x", "role": "tsk"}}}, source_name="cfg"
        )
    assert "`bindings.a.role`" in str(err.value) and "in cfg" in str(err.value)


def test_missing_job_and_program_files(tmp_path: Path) -> None:
    with pytest.raises(TvError, match="no such job file"):
        load_job(tmp_path / "nope.yaml")
    (tmp_path / "job.yaml").write_text("program: nope.tv\n")
    with pytest.raises(TvError, match="no such program file") as err:
        load_job(tmp_path / "job.yaml")
    assert "job.yaml:1:10" in str(err.value)


# -- OmegaConf and Hydra -------------------------------------------------------------------------------


OMEGA = """
lam: 0.4
tasks: [amazon_sent, yelp_lm]
merge:
  expression: base + lam*${tvlang.sum:${tasks}}
  bindings:
    base: ckpt/base
    amazon_sent: {path: ckpt/amazon_sent, role: task}
    yelp_lm: {path: ckpt/yelp_lm, role: task}
  params: {lam: "${lam}"}
"""


def test_omegaconf_node_runs_with_interpolations_resolved(work: Path) -> None:
    omegaconf = pytest.importorskip(
        "omegaconf", reason="the OmegaConf path needs omegaconf (the `config` extra)"
    )
    tvlang.config.register_resolver()
    tvlang.config.register_resolver()  # twice is harmless
    cfg = omegaconf.OmegaConf.create(OMEGA)
    cfg.lam = 0.25  # what a Hydra override does
    got = run_job(cfg.merge, base_dir=work)
    bindings = {"base": str(work / "ckpt" / "base")}
    bindings.update({n: tvlang.task_vector(str(work / "ckpt" / n)) for n in ("amazon_sent", "yelp_lm")})
    assert same(got, tvlang.evaluate("base + 0.25*(amazon_sent + yelp_lm)", bindings))
    cfg.merge.params.lam = "${missing}"
    with pytest.raises(TvParamError, match="cannot resolve the config"):
        run_job(cfg.merge, base_dir=work)


def test_sum_of_names() -> None:
    assert sum_of_names(["a", "b"]) == "(a + b)" and sum_of_names("a") == "(a)"
    with pytest.raises(TvParamError, match="not a valid name"):
        sum_of_names(["a", "b) + (c"])
    with pytest.raises(TvParamError, match="at least one"):
        sum_of_names([])


def test_hydra_example_multirun_sweeps_lam(work: Path) -> None:
    pytest.importorskip("hydra", reason="the Hydra example needs hydra-core")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    sweep = work / "multirun"
    cmd = [
        sys.executable,
        str(EXAMPLE / "hydra_app.py"),
        "-m",
        "merge.params.lam=0.2,0.6",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [params_of(sweep / str(i) / "merged.safetensors") for i in (0, 1)] == [{"lam": 0.2}, {"lam": 0.6}]


def test_job_kernels_field_and_override(tmp_path: Path) -> None:
    """`kernels:` in a job (and as a run_job override) picks the CPU kernels; both give the same bits."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for name in ("base", "ft"):
        save_file({"w": torch.randn(300, generator=g).bfloat16()}, str(tmp_path / f"{name}.safetensors"))
    spec = {
        "expression": "base + 0.3*(ft - base)",
        "bindings": {"base": "base.safetensors", "ft": "ft.safetensors"},
        "kernels": "eager",
    }
    job = job_from_mapping(spec, base_dir=tmp_path)
    assert job.options.kernels == "eager"
    eager = run_job(job, output=str(tmp_path / "eager.safetensors"))
    compiled = run_job(job, output=str(tmp_path / "compiled.safetensors"), kernels="auto")
    a, b = load_file(eager), load_file(compiled)
    assert torch.equal(a["w"].view(torch.int16), b["w"].view(torch.int16))


def test_every_option_is_declared_once_and_documented_with_its_default() -> None:
    """tvlang.options is the one place an option is declared: the job schema, the command line and
    docs/config.md's table all follow it (a default stated in the docs is the real one)."""
    import re
    from pathlib import Path

    from tvlang.cli import build_parser
    from tvlang.config import FIELDS
    from tvlang.options import SETTINGS, default

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| (.*) \|$", doc, re.M))
    job_options = [name for name in FIELDS if name in SETTINGS]
    assert set(SETTINGS) - set(job_options) == {"progress", "chunk"}  # set by callers, not job files
    for name in job_options:
        assert name in rows, f"docs/config.md has no row for `{name}`"
        stated = re.search(r"default `([^`]+)`", rows[name])
        if stated:
            assert stated.group(1) == str(default(name)), name
    helps = {
        a.dest: a.help or "" for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
    }  # type: ignore[union-attr]
    assert "default 256M" in helps["memory"] and "default 5G" in helps["shard_size"]
    assert {name for name, s in SETTINGS.items() if s.flag} <= set(helps)


def test_options_check_themselves_with_one_message() -> None:
    """A bad value is refused where the Options is made, with the same E402 message from every front-end."""
    from tvlang.options import Options

    for field, value, message in (
        ("kernels", "fast", "unknown kernel mode 'fast'"),
        ("threads", 0, "threads must be at least 1, not 0"),
        ("memory", "1G", "memory must be an integer"),
        ("dtype", "int8", "unknown output dtype 'int8'"),
        ("executor", "spark", "unknown executor 'spark'"),
    ):
        with pytest.raises(TvParamError, match=message) as err:
            Options(**{field: value})
        assert err.value.code == "E402"
    assert Options.from_text({"memory": "1G"}).memory == 1 << 30
