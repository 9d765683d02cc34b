"""The ray executor on a local cluster of two worker processes: the same bytes as a local run,
worker deaths retried, a unit that keeps failing leaves nothing that looks complete."""

from __future__ import annotations

import _thread
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

import tvlang
from tvlang.cli import main
from tvlang.errors import TvError
from tvlang.executors.ray import FAULT_ENV, cut_units, run_unit
from tvlang.io.checkpoint import Checkpoint, CheckpointWriter
from tvlang.io.endpoints import CheckpointSource
from tvlang.synth import llama_shapes, make_family

ray = pytest.importorskip("ray", reason="the ray executor's tests need Ray: pip install 'tvlang[ray]'")

SHARD = "16K"  # the tiny models below become 4-6 output shards, so several units


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """Two worker processes on this machine; Ray's state in a private temporary directory, deleted
    at the end (so nothing is left in /tmp/ray for the next run to find)."""
    temp = tempfile.mkdtemp(prefix="tvray")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_DEDUP_LOGS", "0")
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray for a throwaway cluster
        ray.init(
            address="local",  # a cluster of its own, never one that happens to run here
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _temp_dir=temp,
        )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ray-family")
    return make_family(
        str(d),
        ("base", "m1", "m2"),
        llama_shapes(hidden=32, layers=2, vocab=96),
        dtype=torch.bfloat16,
        layout="dir",
        base_shards=3,
    )


def files(path: str) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself), by relative name."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def both(tmp_path: object, run: Callable[[str, str], None]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """``run(executor, out)`` with the local executor and with Ray; both outputs' files.  The outputs
    have one name (the model card is titled by it), in two directories."""
    outs = {}
    for executor in ("local", "ray"):
        out = os.path.join(str(tmp_path), executor, "merged")
        run(executor, out)
        outs[executor] = files(out)
    return outs["local"], outs["ray"]


def test_linear_sweep_from_the_cli_is_byte_identical(
    cluster: None, models: dict[str, str], tmp_path: object
) -> None:
    prog = os.path.join(str(tmp_path), "sweep.tv")
    with open(prog, "w") as f:
        f.write(
            f'base = load("{models["base"]}")\n'
            "param lam = [0.3, 0.7]\n"
            f'output merged = base + lam*(load("{models["m1"]}") - base) + 0.2*(load("{models["m2"]}") - base)\n'
        )

    def run(executor: str, out: str) -> None:
        assert main(["run", prog, "-o", out, "--executor", executor, "--shard-size", SHARD, "-q"]) == 0

    local, distributed = both(tmp_path, run)
    shards = [n for n in local if n.endswith(".safetensors")]
    assert len(shards) >= 8  # two outputs of several shards each: several units
    assert distributed == local


def test_seeded_dare_is_byte_identical(
    cluster: None, models: dict[str, str], tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(executor: str, out: str) -> None:
        tvlang.evaluate(
            "base + dare(m1 - base, 0.7, seed=5) + dare_ties(m1 - base, m2 - base, density=0.5, seed=2)",
            models,
            out=out,
            executor=executor,
            shard_size=16 * 1024,
            progress=True,
        )

    local, distributed = both(tmp_path, run)
    assert distributed == local
    summary = capsys.readouterr().err.splitlines()[-1]  # progress, aggregated on the driver
    assert (
        summary.startswith("ray: ")
        and " units on " in summary
        and "peak resident memory per worker" in summary
    )


def test_model_wide_ties_from_a_job_file_is_byte_identical(
    cluster: None, models: dict[str, str], tmp_path: object
) -> None:
    def run(executor: str, out: str) -> None:
        job = os.path.join(str(tmp_path), f"{executor}.json")
        with open(job, "w") as f:
            f.write(
                '{"expression": "base + ties(m1 - base, m2 - base, density=0.3, scope=\\"model\\")",'
                f' "bindings": {{"base": "{models["base"]}", "m1": "{models["m1"]}", "m2": "{models["m2"]}"}},'
                f' "output": "{out}", "shard_size": 16384, "executor": "{executor}"}}'
            )
        assert main(["run", job, "-q"]) == 0

    local, distributed = both(tmp_path, run)
    assert distributed == local


def test_nonfinite_warnings_are_gathered_from_every_unit(
    cluster: None, models: dict[str, str], tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from tvlang.synth import make_state, save_checkpoint

    shapes = llama_shapes(hidden=32, layers=2, vocab=96)
    state = make_state(shapes, 7, torch.bfloat16)
    names = sorted(state)
    state[names[3]].view(-1)[:5] = float("nan")
    state[names[-2]].view(-1)[7] = float("inf")  # in another unit
    bad = os.path.join(str(tmp_path), "bad")
    save_checkpoint(state, bad)
    lines = {}
    for executor in ("local", "ray"):
        out = os.path.join(str(tmp_path), executor)
        tvlang.evaluate(
            "base + 0.5*(bad - base)",
            {"base": models["base"], "bad": bad},
            out=out,
            executor=executor,
            nonfinite="warn",
            shard_size=16 * 1024,
        )
        lines[executor] = capsys.readouterr().err.splitlines()
    assert len(lines["local"]) == 2 and lines["ray"] == lines["local"]


def test_ctrl_c_cancels_the_units_in_flight_and_leaves_no_output(
    cluster: None, models: dict[str, str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = "model.layers.0.mlp.up_proj.weight"
    monkeypatch.setenv(FAULT_ENV, f"{tensor}~6")  # its unit stalls for 6 s after a chunk of it
    out = os.path.join(str(tmp_path), "merged")
    ctrl_c = threading.Timer(2.0, _thread.interrupt_main)  # as if SIGINT reached the driver
    began = time.perf_counter()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            tvlang.evaluate("base + 0.5*(m1 - base)", models, out=out, executor="ray", shard_size=16 * 1024)
    finally:
        ctrl_c.cancel()
    assert time.perf_counter() - began < 6  # it stopped at once, without waiting for the stalled unit
    assert os.listdir(str(tmp_path)) == []


def test_a_worker_killed_mid_unit_is_retried(
    cluster: None, models: dict[str, str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = os.path.join(str(tmp_path), "killed-once")
    tensor = "model.layers.0.mlp.up_proj.weight"

    def run(executor: str, out: str) -> None:
        if executor == "ray":  # the first attempt of the unit writing this tensor exits after a chunk of it
            monkeypatch.setenv(FAULT_ENV, f"{tensor}@{marker}")
        tvlang.evaluate("base + 0.5*(m1 - base)", models, out=out, executor=executor, shard_size=16 * 1024)

    local, distributed = both(tmp_path, run)
    assert os.path.exists(marker)  # the worker did die
    assert distributed == local


def test_a_unit_that_keeps_failing_leaves_no_output(
    cluster: None, models: dict[str, str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = "model.layers.1.self_attn.o_proj.weight"
    monkeypatch.setenv(FAULT_ENV, tensor)  # every attempt dies
    # No retry left: the first death is final (retries are the test above; each death here would
    # cost a cold worker start, seconds on this machine).
    monkeypatch.setattr("tvlang.executors.ray.RETRIES", 0)
    out = os.path.join(str(tmp_path), "merged")
    with pytest.raises(TvError) as err:
        tvlang.evaluate("base + 0.5*(m1 - base)", models, out=out, executor="ray", shard_size=16 * 1024)
    assert err.value.code == "E504"
    assert "failed for good" in err.value.message and f"`{tensor}`" in err.value.message
    assert "Ray ran it 1 time " in str(err.value)
    assert os.listdir(str(tmp_path)) == []  # no output, no temporary directory


def test_ray_needs_files_on_both_ends(models: dict[str, str], tmp_path: object) -> None:
    state = {"w": torch.ones(4)}
    with pytest.raises(TvError, match="in memory") as err:
        tvlang.evaluate("base + 0.5*(ft - base)", {"base": state, "ft": state}, executor="ray")
    assert err.value.code == "E402"
    with pytest.raises(TvError, match="unknown executor") as err:
        tvlang.evaluate(
            "base", {"base": models["base"]}, out=os.path.join(str(tmp_path), "o"), executor="spark"
        )
    assert err.value.code == "E402"


def test_a_worker_that_sees_other_files_refuses_to_run(models: dict[str, str], tmp_path: object) -> None:
    """A unit carries the driver's view of its inputs and outputs; a worker whose shared storage
    shows something else stops with an error that says so (no cluster needed: a unit is plain data)."""
    plan = tvlang.compile("base + 0.5*(m1 - base)", bindings=models).plan()
    sources = [CheckpointSource(Checkpoint.open(inp.location)) for inp in plan.inputs]
    out = os.path.join(str(tmp_path), "merged")
    writer = CheckpointWriter(out, plan.outputs[0].tensors, max_shard_bytes=16 * 1024)
    try:
        units, _ = cut_units(plan, sources, [writer])
        assert len(units) > 2 and sorted(n for u in units for n in u.tensors) == sorted(
            t.name for t in plan.tasks
        )
        unit = units[1]
        name, info = next(iter(unit.inputs[1].tensors.items()))
        moved = replace(
            unit.inputs[1], tensors={**unit.inputs[1].tensors, name: replace(info, offset=info.offset + 2)}
        )
        with pytest.raises(TvError, match="does not see input `m1` as the driver does") as err:
            run_unit(replace(unit, inputs=(unit.inputs[0], moved, *unit.inputs[2:])), {}, "error", None)
        assert err.value.code == "E312" and f"`{name}`" in err.value.message
        elsewhere = replace(unit.shards[0], path=os.path.join(str(tmp_path), "not-shared"))
        with pytest.raises(TvError, match="cannot write") as err:
            run_unit(replace(unit, shards=(elsewhere,)), {}, "error", None)
        assert err.value.code == "E504"
    finally:
        writer.abort()
        for source in sources:
            source.close()
    assert not os.path.exists(out)


def test_job_files_check_the_executor() -> None:
    from tvlang.config import job_from_mapping

    job = job_from_mapping(
        {"expression": "a", "bindings": {"a": "/m/a"}, "executor": "ray", "address": "auto"}
    )
    assert (job.options.executor, job.options.address) == ("ray", "auto")
    with pytest.raises(TvError, match="executor") as err:
        job_from_mapping({"expression": "a", "bindings": {"a": "/m/a"}, "executor": "spark"})
    assert err.value.code == "E406"
