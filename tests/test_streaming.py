"""Write-behind and readahead (tvlang.io.streaming): hints that change speed, never bytes."""

from __future__ import annotations

import itertools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tvlang.io.streaming as streaming
from tvlang.cli import main
from tvlang.io import ChunkReader, SafetensorsWriter, read_header
from tvlang.synth import llama_shapes, make_family

LINUX = os.uname().sysname == "Linux"


def _data_file(tmp_path: Path, nbytes: int = 1 << 20) -> int:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(nbytes))
    return os.open(path, os.O_RDWR)


@pytest.mark.skipif(not LINUX, reason="sync_file_range and posix_fadvise are Linux calls")
def test_hints_succeed_on_linux(tmp_path: Path) -> None:
    fd = _data_file(tmp_path)
    try:
        assert streaming.start_writeback(fd, 0, 4096)
        assert streaming.wait_writeback(fd, 0, 4096)
        assert streaming.drop_cached(fd, 0, 4096)
        assert streaming.prefetch(fd, 4096, 8192)
        assert not streaming.prefetch(fd, 0, 0)  # nothing asked, nothing done
    finally:
        os.close(fd)
    background, throttle = streaming.dirty_thresholds() or (0, 0)
    assert 0 < background <= throttle


def test_hints_degrade_without_the_syscalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another operating system: no sync_file_range, no posix_fadvise; every hint says False."""
    monkeypatch.setattr(streaming, "_sync_file_range", None)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    fd = _data_file(tmp_path)
    try:
        assert not streaming.start_writeback(fd, 0, 4096)
        assert not streaming.wait_writeback(fd, 0, 4096)
        assert not streaming.drop_cached(fd, 0, 4096)
        assert not streaming.prefetch(fd, 0, 4096)
        behind = streaming.WriteBehind(fd, 1 << 20, window=4096)
        assert not behind.engaged
        behind.wrote(0, 1 << 20)
        behind.close()
    finally:
        os.close(fd)


def test_failing_syscall_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses the call (returns -1) slows nothing down and breaks nothing."""
    calls: list[tuple[int, int, int]] = []

    def refuse(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes, flags))
        return -1

    monkeypatch.setattr(streaming, "_sync_file_range", refuse)
    monkeypatch.setenv(streaming.ENV, "1")
    fd = _data_file(tmp_path)
    try:
        behind = streaming.WriteBehind(fd, 1 << 20, window=8192)
        for off in range(0, 1 << 16, 4096):
            behind.wrote(off, 4096)
        behind.close()
    finally:
        os.close(fd)
    assert calls and all(flags & streaming.SYNC_FILE_RANGE_WRITE for _, _, flags in calls)


def test_write_behind_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each region is queued once; beyond the window the oldest are waited for, then dropped."""
    log: list[tuple[str, int, int]] = []
    monkeypatch.setattr(streaming, "_sync_file_range", lambda fd, off, n, flags: 0)
    monkeypatch.setattr(streaming, "start_writeback", lambda fd, off, n: log.append(("start", off, n)))
    monkeypatch.setattr(streaming, "wait_writeback", lambda fd, off, n: log.append(("wait", off, n)) or True)
    monkeypatch.setattr(streaming, "drop_cached", lambda fd, off, n: log.append(("drop", off, n)))
    monkeypatch.setenv(streaming.ENV, "1")
    behind = streaming.WriteBehind(-1, 10 * 100, window=250)
    for i in range(10):
        behind.wrote(100 * i, 100)
    behind.close()
    behind.close()  # idempotent
    behind.wrote(2000, 100)  # after close: nothing queued, nothing waited for
    assert [e for e in log if e[0] == "start"][:10] == [("start", 100 * i, 100) for i in range(10)]
    waited = [off for kind, off, _ in log if kind == "wait"]
    assert waited == [100 * i for i in range(8)]  # at most 250 bytes (two regions) left queued
    assert [off for kind, off, _ in log if kind == "drop"] == waited


def test_write_behind_engages_past_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs open together count together: a sweep's outputs pass the threshold jointly."""
    monkeypatch.delenv(streaming.ENV, raising=False)
    monkeypatch.setattr(streaming, "_sync_file_range", lambda fd, off, n, flags: 0)
    monkeypatch.setattr(streaming, "dirty_thresholds", lambda: (1000, 2000))
    monkeypatch.setattr(streaming._Pending, "open_bytes", 0)
    first = streaming.WriteBehind(-1, 600)
    assert not first.engaged
    second = streaming.WriteBehind(-1, 600)
    assert first.engaged and second.engaged
    second.close()
    assert not first.engaged
    first.close()
    assert streaming._Pending.open_bytes == 0
    monkeypatch.setenv(streaming.ENV, "0")
    assert not streaming.WriteBehind(-1, 10**12).engaged


def test_readahead_steps() -> None:
    asked: list[tuple[int, int]] = []
    ahead = streaming.Readahead(1000, lambda off, n: asked.append((off, n)) or True, ahead=100)
    for pos in range(0, 1000, 10):
        ahead.reached(pos)
    ahead.reached(0)  # a second pass over data already asked for asks nothing
    # contiguous, non-overlapping requests that cover the file, each at least half the window
    assert asked[0] == (0, 100)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(asked))
    assert asked[-1][0] + asked[-1][1] == 1000
    assert all(n >= 50 for _, n in asked[:-1])
    ahead.close()
    ahead._requested = 0
    ahead.reached(0)  # closed: asks nothing
    assert asked[-1][0] + asked[-1][1] == 1000


@pytest.mark.skipif(not LINUX, reason="madvise(MADV_WILLNEED) is checked on Linux")
def test_prefetch_mapped(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "m.bin"
    path.write_bytes(os.urandom(3 * mmap.PAGESIZE + 100))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert streaming.prefetch_mapped(mm, 100, 10**9)  # unaligned start, clipped end
    assert not streaming.prefetch_mapped(mm, 0, 0)
    mm.close()
    assert not streaming.prefetch_mapped(mm, 0, 10)  # a closed map: refused, not raised


@pytest.mark.parametrize("threads", [1, 2])
def test_writer_bits_do_not_depend_on_write_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """Forced on with a tiny window, from two threads in any order: the same file, committed the
    same way, and every output's bytes released from the process-wide count."""
    monkeypatch.setattr(streaming, "WINDOW", 8192)
    x = torch.randn(50_000).to(torch.bfloat16)
    files = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(streaming.ENV, mode)
        before = streaming._Pending.open_bytes
        path = tmp_path / f"out{mode}.safetensors"
        w = SafetensorsWriter(path, [("x", "BF16", (50_000,))])
        chunks = list(range(0, 50_000, 3000))[::-1]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda s, w=w: w.write("x", s, x[s : s + 3000]), chunks))
        w.commit(durable=mode == "1")
        assert streaming._Pending.open_bytes == before
        files[mode] = path.read_bytes()
    assert files["0"] == files["1"]
    with safe_open(tmp_path / "out1.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("x"), x)


def test_aborted_writer_releases_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(streaming.ENV, "1")
    before = streaming._Pending.open_bytes
    with (
        pytest.raises(RuntimeError),
        SafetensorsWriter(tmp_path / "o.safetensors", [("x", "F32", (4,))]) as w,
    ):
        w.write("x", 0, torch.ones(2))
        raise RuntimeError("stop")
    assert streaming._Pending.open_bytes == before
    assert os.listdir(tmp_path) == []


def test_reader_readahead_and_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader hints each chunk's successor through its map and holds no extra descriptor."""
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(streaming, "prefetch_mapped", lambda mm, off, n: asked.append((off, n)) or True)
    monkeypatch.setattr(streaming, "AHEAD", 4096)
    path = tmp_path / "in.safetensors"
    x = torch.arange(10_000, dtype=torch.float32)
    with SafetensorsWriter(path, [("x", "F32", (10_000,))]) as w:
        w.write("x", 0, x)
    info = read_header(path)[0]["x"]
    fds = len(os.listdir("/proc/self/fd")) if LINUX else 0
    reader = ChunkReader(path)
    if LINUX:  # the map's own descriptor (Python's mmap keeps a duplicate), nothing for the hints
        assert len(os.listdir("/proc/self/fd")) <= fds + 1
    got = np.concatenate([reader.read(info, s, min(10_000, s + 1000)).copy() for s in range(0, 10_000, 1000)])
    assert (got == x.numpy()).all()
    assert asked and asked[0][0] == info.offset
    reader.close()
    if LINUX:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_cli_merge_identical_with_write_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's level: a two-output sweep with write-behind forced on (tiny window) and off."""
    paths = make_family(str(tmp_path / "in"), ["base", "ft"], llama_shapes(64, 2, 256))
    monkeypatch.setattr(streaming, "WINDOW", 4096)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(streaming.ENV, mode)
        target = tmp_path / f"out{mode}"
        rc = main(
            [
                "eval",
                "base + lam*(ft - base)",
                "--bind",
                f"base={paths['base']}",
                "--bind",
                f"ft={paths['ft']}",
                "--set",
                "lam=0.5,1.5",
                "-o",
                str(target),
                "-q",
            ]
        )
        assert rc == 0
        out[mode] = {p.name: p.read_bytes() for p in sorted(target.rglob("*.safetensors"))}
    assert len(out["1"]) == 2 and out["0"] == out["1"]


def _suite() -> object:
    """benchmarks/suite.py, loaded by path (it is a script, not a package)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("_suite_under_test", root / "suite.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return module


@pytest.mark.skipif(not LINUX or shutil.which("dd") is None, reason="the floors use Linux's /proc and dd")
def test_suite_floor_helpers_at_tiny_sizes(tmp_path: Path) -> None:
    suite: Any = _suite()
    files = []
    for i in range(2):
        p = tmp_path / f"in{i}.bin"
        p.write_bytes(os.urandom(100_000))
        files.append(str(p))
    assert suite.dd_read_s(files, block=4096) >= 0
    assert suite.dd_read_parallel_s(files, block=4096) >= 0
    assert suite.dd_write_s(str(tmp_path / "w"), 10_000, block=4096, files=3) >= 0
    assert suite.dd_write_s(str(tmp_path / "w"), 8192, block=4096, flag="oflag=direct") >= 0
    assert sorted(os.listdir(tmp_path)) == ["in0.bin", "in1.bin"]  # the floor's files are removed
    dirty = suite.dirty_limit()
    assert 0 < dirty["background"] <= dirty["limit"] < dirty["mem_total"]
    why = suite.can_drop_caches()
    assert why is None or "root" in why or "writable" in why
    tiny = tmp_path / "tiny.safetensors"
    suite.tiny_checkpoint(str(tiny))
    assert read_header(tiny)[0]["w"].shape == (4, 4)
