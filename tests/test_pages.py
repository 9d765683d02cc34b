"""Dropping mapped pages in batches (tvlang.io.pages): the same pages go as with one madvise per
range, at the end of the outermost batch, by one process_madvise call where the system has it
and range by range where it does not."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from tvlang.io import pages
from tvlang.io.safetensors import ChunkReader, SafetensorsWriter, read_header

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")

MiB = 1 << 20


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for k in range(3):
        path = tmp_path / f"m{k}.safetensors"
        with SafetensorsWriter(path, [("t", "F32", (8 * MiB,))]) as w:
            for s in range(0, 8 * MiB, MiB):
                w.write("t", s, np.full(MiB, k + s / MiB, dtype=np.float32))
        paths.append(path)
    return paths


@pytest.mark.parametrize("batched_call", [True, False], ids=["process_madvise", "madvise each"])
def test_a_batch_drops_every_reader_s_pages_when_it_ends(
    files: list[Path], batched_call: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not batched_call:
        monkeypatch.setattr(pages._batcher, "usable", False)
    readers = [ChunkReader(p) for p in files]
    infos = [read_header(p)[0]["t"] for p in files]
    try:
        base = _rss_file()
        for k, (r, info) in enumerate(zip(readers, infos, strict=True)):
            assert float(r.read(info, 0, info.numel).sum()) == pytest.approx(MiB * (8 * k + 28))
        assert _rss_file() - base > 64 * MiB  # 96 MiB mapped
        with pages.Batch():
            with pages.Batch():  # an inner batch joins the outer one
                for r, info in zip(readers, infos, strict=True):
                    r.release(info, 0, info.numel)
            assert _rss_file() - base > 64 * MiB  # nothing dropped before the outer batch ends
        assert _rss_file() - base < 8 * MiB
        for k, (r, info) in enumerate(zip(readers, infos, strict=True)):  # data faults back in, unchanged
            assert float(r.read(info, MiB, 2 * MiB)[0]) == k + 1
    finally:
        for r in readers:
            r.close()


def test_outside_a_batch_each_release_drops_at_once(files: list[Path]) -> None:
    info = read_header(files[0])[0]["t"]
    with ChunkReader(files[0]) as r:
        base = _rss_file()
        float(r.read(info, 0, info.numel).sum())
        assert _rss_file() - base > 24 * MiB
        r.release(info, 0, info.numel)
        assert _rss_file() - base < 4 * MiB


def test_a_refused_batch_call_falls_back_and_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without process_madvise (or refusing MADV_DONTNEED there) answers ENOSYS/EINVAL:
    that batch is dropped range by range, and so is every later one."""
    batcher = pages._Batcher()
    if not batcher.usable:
        pytest.skip("process_madvise is not tried on this system")

    def refuse(*args: object) -> int:
        import ctypes

        ctypes.set_errno(38)  # ENOSYS
        return -1

    batcher.syscall = refuse
    mm = mmap.mmap(-1, 4 * MiB)
    try:
        assert not batcher.drop([(mm, 0, 0, MiB), (mm, 0, MiB, MiB)])
        assert not batcher.usable
    finally:
        mm.close()


def test_the_batched_call_drops_exactly_the_ranges_given() -> None:
    """Private anonymous memory reads back as zeros where its pages were dropped: the one call
    drops the ranges it is given, at the addresses given, and nothing between them."""
    if not pages._batcher.usable:
        pytest.skip("process_madvise is not tried on this system")
    mm = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(mm, np.uint8)
    a[:] = 1
    address = a.ctypes.data
    if not pages._batcher.drop([(mm, address, 0, 4 * MiB), (mm, address + 6 * MiB, 6 * MiB, MiB)]):
        pytest.skip("this kernel refuses MADV_DONTNEED through process_madvise (ranges go one by one)")
    assert int(a[: 4 * MiB].sum()) == 0 and int(a[6 * MiB : 7 * MiB].sum()) == 0
    assert int(a[4 * MiB : 6 * MiB].sum()) == 2 * MiB and int(a[7 * MiB :].sum()) == MiB
    del a
    mm.close()


def test_a_batch_longer_than_the_call_takes_goes_range_by_range() -> None:
    """process_madvise takes at most 1024 ranges: a longer batch is dropped one range at a time,
    and the batched call stays on for the next one."""
    page = mmap.PAGESIZE
    mm = mmap.mmap(-1, 2048 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(mm, np.uint8)
    a[:] = 1
    usable = pages._batcher.usable
    with pages.Batch():
        for k in range(0, 2048, 2):  # every other page: 1024 ranges would fit, 1025 do not
            pages.drop(mm, a.ctypes.data, k * page, page)
        pages.drop(mm, a.ctypes.data, 2047 * page, page)
    left = a.reshape(2048, page).sum(axis=1)
    assert (left[0:2048:2] == 0).all() and (left[1:2046:2] == page).all() and left[2047] == 0
    assert pages._batcher.usable == usable
    del a, left
    mm.close()
