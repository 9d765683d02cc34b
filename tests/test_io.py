"""Tests for tvlang.io: safetensors headers, chunk reads, streaming writes, checkpoints."""

from __future__ import annotations

import gc
import json
import math
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tvlang.io.safetensors as st_mod
from tvlang.chunks import to_torch
from tvlang.dtypes import DTYPES, FLOATS, ITEMSIZE
from tvlang.errors import TvInputError, TvOutputError
from tvlang.io import (
    DTYPE_CODES,
    TORCH_DTYPES,
    Checkpoint,
    CheckpointWriter,
    ChunkReader,
    SafetensorsWriter,
    TensorInfo,
    is_pickle_path,
    read_header,
)

Plan = list[tuple[str, str, tuple[int, ...]]]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def random_tensor(code: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities, subnormals included) of the given dtype."""
    dtype = TORCH_DTYPES[code]
    n = math.prod(shape)
    if code == "BOOL":
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def plan_of(tensors: dict[str, torch.Tensor]) -> Plan:
    return [(name, DTYPE_CODES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def chunk_jobs(tensors: dict[str, torch.Tensor], rng: random.Random, max_chunk: int = 13) -> list:
    """Every tensor cut into random-length chunks, all of them shuffled."""
    jobs = []
    for name, t in tensors.items():
        flat = t.reshape(-1)
        start = 0
        while start < flat.numel():
            stop = min(flat.numel(), start + rng.randint(1, max_chunk))
            jobs.append((name, start, flat[start:stop].clone()))
            start = stop
    rng.shuffle(jobs)
    return jobs


def write_from_two_threads(writer: SafetensorsWriter | CheckpointWriter, jobs: list) -> None:
    barrier = threading.Barrier(2)

    def run(part: list) -> None:
        barrier.wait()
        for name, start, chunk in part:
            writer.write(name, start, chunk)

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(run, jobs[0::2]), pool.submit(run, jobs[1::2])]:
            f.result()


def load_with_library(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def read(reader: ChunkReader, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """A chunk as a tensor (readers give numpy arrays of the storage dtype)."""
    return to_torch(reader.read(info, start, stop), info.dtype)


def read_all(reader: ChunkReader, info: TensorInfo, step: int = 7) -> torch.Tensor:
    parts = [read(reader, info, s, min(s + step, info.numel)) for s in range(0, info.numel, step)]
    flat = torch.cat(parts) if parts else read(reader, info, 0, 0)
    return flat.reshape(info.shape)


def craft(
    header: dict | None = None, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None
) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    n = len(body) if length is None else length
    return n.to_bytes(8, "little") + body + data


def siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


# ------------------------------------------------------------------------------------------
# dtype tables
# ------------------------------------------------------------------------------------------


def test_dtype_tables() -> None:
    assert len(TORCH_DTYPES) == 12
    assert {DTYPE_CODES[d]: d for d in DTYPE_CODES} == TORCH_DTYPES
    assert TORCH_DTYPES["F8_E4M3"] is torch.float8_e4m3fn and TORCH_DTYPES["F8_E5M2"] is torch.float8_e5m2
    assert all(TORCH_DTYPES[c].is_floating_point for c in FLOATS)
    assert not any(TORCH_DTYPES[c].is_floating_point for c in set(TORCH_DTYPES) - FLOATS)


def test_the_dtype_table_agrees_with_torch_and_numpy() -> None:
    """tvlang.dtypes is the one table: its sizes and storage types match what torch and numpy hold."""
    import numpy as np

    from tvlang.dtypes import KERNEL_DTYPES, OUTPUT_NAMES, code_of, torch_dtype

    for code, d in DTYPES.items():
        assert torch_dtype(code).itemsize == np.dtype(d.numpy).itemsize == d.itemsize == ITEMSIZE[code]
        assert code_of(torch_dtype(code)) == code
        assert (d.c is None) == (d.triton is None)  # both backends take the same dtypes
    assert {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"} == KERNEL_DTYPES
    assert {OUTPUT_NAMES[n] for n in ("bf16", "bfloat16", "fp16", "half", "fp32", "float", "fp64")} == {
        "F64",
        "F32",
        "F16",
        "BF16",
    }
    assert code_of(torch.complex64) is None


def test_is_pickle_path() -> None:
    for p in ["a.bin", "x/pytorch_model.BIN", "m.pt", "m.pth", "m.ckpt"]:
        assert is_pickle_path(p)
    for p in ["model.safetensors", "config.json", "bin"]:
        assert not is_pickle_path(p)


# ------------------------------------------------------------------------------------------
# SafetensorsWriter
# ------------------------------------------------------------------------------------------


def test_round_trip_all_dtypes_two_threads(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, code in enumerate(TORCH_DTYPES):
        tensors[f"w.{code}"] = random_tensor(code, (17, 3 + i % 3), gen)
        tensors[f"scalar.{code}"] = random_tensor(code, (), gen)
        tensors[f"empty.{code}"] = random_tensor(code, (0, 5), gen)
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, plan_of(tensors), {"format": "pt", "ünï": "cödé"}) as w:
        write_from_two_threads(w, chunk_jobs(tensors, random.Random(1)))
    got, meta = load_with_library(path)
    assert meta == {"format": "pt", "ünï": "cödé"}
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same_bits(got[name], t), name
    # and our own reader agrees
    infos, meta2 = read_header(path)
    assert list(infos) == list(tensors)  # laid out in plan order
    assert meta2 == meta
    with ChunkReader(path) as r:
        for name, info in infos.items():
            assert same_bits(read_all(r, info), tensors[name]), name


@pytest.mark.parametrize("name_len", range(1, 10))
def test_header_layout(tmp_path: Path, name_len: int) -> None:
    path = tmp_path / "x.safetensors"
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    with SafetensorsWriter(path, [("n" * name_len, "I16", (2, 3))]) as w:
        w.write("n" * name_len, 0, t.reshape(-1))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    assert len(raw) == 8 + n + t.numel() * 2
    text = raw[8 : 8 + n].decode()
    assert json.loads(text) == {"n" * name_len: {"dtype": "I16", "shape": [2, 3], "data_offsets": [0, 12]}}
    assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))  # padded with spaces only
    assert raw[8 + n :] == t.numpy().tobytes()


def test_empty_plan(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    SafetensorsWriter(path, []).commit()
    assert path.stat().st_size % 8 == 0
    assert read_header(path) == ({}, {})
    assert load_with_library(path)[0] == {}


def test_writer_temp_and_rename(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", "F32", (4,))])
    tmp = Path(w.temp_path)
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.safetensors.tvlang-tmp-")
    assert not path.exists() and tmp.exists()
    w.write("a", 0, torch.ones(4))
    assert not path.exists()
    w.commit()
    assert siblings(path) == ["x.safetensors"]
    w.abort()  # no-op after commit
    assert path.exists()


def test_writer_abort_and_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", "F32", (4,))])
    w.abort()
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), SafetensorsWriter(path, [("a", "F32", (4,))]) as w:
        w.write("a", 0, torch.ones(4))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_garbage_collected_leaves_nothing(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (4,))])
    del w
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_chunks(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (2, 3))])
    with pytest.raises(ValueError, match="float32"):
        w.write("a", 0, torch.zeros(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="1-D"):
        w.write("a", 0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        w.write("a", 0, torch.zeros(12)[::2])
    with pytest.raises(ValueError, match="outside"):
        w.write("a", 4, torch.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        w.write("a", -1, torch.zeros(1))
    with pytest.raises(ValueError, match="not in the plan"):
        w.write("b", 0, torch.zeros(1))
    w.abort()
    with pytest.raises(ValueError, match="aborted"):
        w.write("a", 0, torch.zeros(6))


@pytest.mark.parametrize(
    "plan",
    [
        [("a", "F32", (1,)), ("a", "F32", (1,))],
        [("a", "F17", (1,))],
        [("a", "F32", (-1,))],
        [("__metadata__", "F32", (1,))],
    ],
)
def test_writer_rejects_bad_plans(tmp_path: Path, plan: Plan) -> None:
    with pytest.raises(ValueError):
        SafetensorsWriter(tmp_path / "x.safetensors", plan)
    assert os.listdir(tmp_path) == []


def test_writer_incomplete_commit_fails_and_cleans_up(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (4,)), ("b", "F32", (2,))])
    w.write("a", 0, torch.ones(3))
    w.write("b", 0, torch.ones(2))
    with pytest.raises(ValueError, match=r"'a' \(3/4\)"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_writer_checks_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage:
        free = 100

    monkeypatch.setattr(st_mod.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(TvOutputError, match="only 100 are free"):
        SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (1000,))])
    assert os.listdir(tmp_path) == []


def test_writer_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TvOutputError) as e:
        SafetensorsWriter(tmp_path / "nope" / "x.safetensors", [("a", "F32", (1,))])
    assert e.value.code == "E500"


# ------------------------------------------------------------------------------------------
# ChunkReader
# ------------------------------------------------------------------------------------------


def test_read_library_file_at_odd_boundaries(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = {
        "embed": random_tensor("BF16", (31, 7), gen),
        "mask": random_tensor("BOOL", (13,), gen),
        "f64": random_tensor("F64", (5, 5), gen),
        "i8": random_tensor("I8", (33,), gen),
        "f8": random_tensor("F8_E5M2", (9,), gen),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(3, 0),
    }
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos, meta = read_header(path)
    assert meta == {"format": "pt"}
    assert set(infos) == set(tensors)
    assert [i.offset for i in infos.values()] == sorted(i.offset for i in infos.values())
    with ChunkReader(path) as r:
        base = r._bytes.ctypes.data
        for name, info in infos.items():
            for step in (1, 3, 7, 64):
                assert same_bits(read_all(r, info, step), tensors[name]), (name, step)
            if info.numel:
                view = read(r, info, 1 if info.numel > 1 else 0, info.numel)
                isz = info.torch_dtype.itemsize
                assert view.data_ptr() == base + info.offset + (1 if info.numel > 1 else 0) * isz  # zero-copy
            r.release(info, 0, info.numel)
            assert same_bits(read_all(r, info), tensors[name])  # pages fault back in after release


def test_scalar_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_file({"s": torch.tensor(7, dtype=torch.int32), "e": torch.zeros(0)}, str(path))
    infos, _ = read_header(path)
    with ChunkReader(path) as r:
        assert infos["s"].shape == () and infos["s"].numel == 1
        assert r.read(infos["s"], 0, 1).tolist() == [7]
        assert r.read(infos["s"], 0, 0).shape == (0,)
        assert r.read(infos["e"], 0, 0).shape == (0,)
        r.release(infos["e"], 0, 0)
        r.release(infos["s"], 0, 1)


@pytest.mark.parametrize(("code", "misalign"), [("F32", 1), ("F32", 2), ("F64", 4), ("BF16", 1)])
def test_misaligned_data_is_copied(tmp_path: Path, code: str, misalign: int) -> None:
    t = random_tensor(code, (11,), torch.Generator().manual_seed(3))
    body = json.dumps({"t": {"dtype": code, "shape": [11], "data_offsets": [0, t.numel() * t.itemsize]}})
    body += " " * ((misalign - 8 - len(body)) % 8)  # data starts at 8k + misalign
    path = tmp_path / "m.safetensors"
    path.write_bytes(craft(raw=body.encode(), data=t.view(torch.uint8).numpy().tobytes()))
    infos, _ = read_header(path)
    assert infos["t"].offset % 8 == misalign
    with ChunkReader(path) as r:
        got = read(r, infos["t"], 2, 9)
        assert got.data_ptr() % t.itemsize == 0
        assert same_bits(got, t[2:9])
        assert same_bits(read_all(r, infos["t"], 4), t)


def test_reader_bounds_and_close(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32)}, str(path))
    other = tmp_path / "y.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32)}, str(other))
    info = read_header(path)[0]["a"]
    r = ChunkReader(path)
    for start, stop in [(-1, 2), (3, 2), (0, 11)]:
        with pytest.raises(ValueError):
            r.read(info, start, stop)
    with pytest.raises(ValueError, match="not in"):
        r.read(read_header(other)[0]["a"], 0, 1)
    view = r.read(info, 2, 5)
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read(info, 0, 1)
    r.release(info, 0, 10)  # harmless after close
    gc.collect()
    assert view.tolist() == [2.0, 3.0, 4.0]  # the mapping outlives the reader while views exist


def test_reader_two_threads(tmp_path: Path) -> None:
    t = torch.randn(300_000)
    path = tmp_path / "x.safetensors"
    save_file({"t": t}, str(path))
    info = read_header(path)[0]["t"]
    out = torch.empty_like(t)
    step = 10_000
    with ChunkReader(path) as r:

        def work(first: int) -> None:
            for s in range(first * step, t.numel(), 2 * step):
                out[s : s + step] = read(r, info, s, min(s + step, t.numel()))
                r.release(info, s, min(s + step, t.numel()))

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(work, [0, 1]))
    assert torch.equal(out, t)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_keeps_rss_flat(tmp_path: Path) -> None:
    n = 16 * 2**20  # 64 MiB of float32
    step = 2**20
    path = tmp_path / "big.safetensors"
    with SafetensorsWriter(path, [("t", "F32", (n,))]) as w:
        chunk = torch.arange(step, dtype=torch.float32)
        for s in range(0, n, step):
            w.write("t", s, chunk)
    info = read_header(path)[0]["t"]

    def sweep(release: bool) -> int:
        with ChunkReader(path) as r:
            r.read(info, 0, step).sum()  # warm up torch's code pages
            r.release(info, 0, step)
            base = peak = _rss_file_kib()
            for s in range(0, n, step):
                assert r.read(info, s, s + step)[-1].item() == step - 1
                r.read(info, s, s + step).sum()
                if release:
                    r.release(info, s, s + step)
                peak = max(peak, _rss_file_kib())
            return (peak - base) * 1024

    assert sweep(release=True) < 12 * 2**20
    assert sweep(release=False) > 48 * 2**20  # the measurement does see mapped pages


def test_releases_drop_whole_2_mib_blocks(tmp_path: Path) -> None:
    """A fault maps a large folio whole (often as one 2 MiB mapping, which a partial drop would
    split): a release drops from the 2 MiB boundary at or below its start to the one at or below
    its end, and a range that ends the tensor up to the next boundary, clipped to the file."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3000), "b": torch.zeros(5), "c": torch.zeros(2**20)}, str(path))
    infos = read_header(path)[0]
    calls: list[tuple[int, int]] = []

    class Recorder:
        def madvise(self, advice: int, start: int, length: int) -> None:
            calls.append((start, start + length))

    folio = 2 << 20
    with ChunkReader(path) as r:
        size = r._size
        r._mm = Recorder()  # type: ignore[assignment]
        c = infos["c"]
        r.release(c, 1000, 600_000)  # inside: whole blocks only
        r.release(c, 600_000, c.numel)  # its end: out to the next boundary, clipped to the file
        r.release(infos["b"], 0, 5)  # a tiny tensor: every block it touches
        # a chunk whose neighbours are still being read keeps the blocks it shares with them
        r.release(c, 1000, c.numel, before=False)
        r.release(c, 1000, 600_000, after=True)  # ... and takes the one after once that is done
        r._mm = None
    begin, end = c.offset + 4000, c.offset + 2_400_000
    assert calls[0] == (begin // folio * folio, end // folio * folio)
    assert calls[1] == (end // folio * folio, min(size, -(-(c.offset + c.nbytes) // folio) * folio))
    b = infos["b"]
    assert calls[2] == (b.offset // folio * folio, min(size, -(-(b.offset + b.nbytes) // folio) * folio))
    assert calls[3] == (-(-begin // folio) * folio, min(size, -(-(c.offset + c.nbytes) // folio) * folio))
    assert calls[4] == (begin // folio * folio, -(-end // folio) * folio)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_small_tensors_leave_no_pages_mapped(tmp_path: Path) -> None:
    """Reading then releasing small tensors, each between large ones, leaves the mapping about empty
    even where the page cache holds the file in large folios (a fault maps a folio whole)."""
    path = tmp_path / "norms.safetensors"
    plan = [(f"{i:02d}{kind}", "F32", (n,)) for i in range(24) for kind, n in (("n", 1536), ("w", 2**20))]
    with SafetensorsWriter(path, plan) as w:
        for name, _, (n,) in plan:
            w.write(name, 0, torch.full((n,), float(name[:2])))
    fd = os.open(path, os.O_RDONLY)
    try:  # into large folios, as a sequential read leaves a file: drop it, read it back
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 16 << 20):
            pass
    finally:
        os.close(fd)
    infos = read_header(path)[0]
    norms = [infos[name] for name, _, _ in plan if name.endswith("n")]

    def sweep(release: bool) -> int:
        with ChunkReader(path) as r:
            base = _rss_file_kib()
            for info in norms:
                assert float(r.read(info, 0, info.numel)[7]) == float(info.name[:2])
                if release:
                    r.release(info, 0, info.numel)
            return (_rss_file_kib() - base) * 1024

    kept = sweep(release=False)
    if kept < 12 * 2**20:
        pytest.skip(f"the page cache holds this file in small folios here ({kept >> 10} KiB mapped)")
    assert sweep(release=True) < 2 * 2**20


def test_map_larger_than_memory(tmp_path: Path) -> None:
    """A private writable map would be charged in full and fail past RAM + swap."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
        pytest.skip("strict overcommit")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    path = tmp_path / "sparse.safetensors"
    try:
        with open(path, "wb") as f:
            f.truncate(2 * total)
    except OSError:
        pytest.skip("no sparse files here")
    info = TensorInfo("t", "F32", (4,), str(path), 2 * total - 16, 16)
    with ChunkReader(path) as r:
        assert r.read(info, 0, 4).tolist() == [0.0] * 4


# ------------------------------------------------------------------------------------------
# read_header: the corrupt corpus
# ------------------------------------------------------------------------------------------

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
D8 = bytes(8)
DA = json.dumps(A)


def entry(**kw: object) -> dict:
    return {**A, **kw}


CORRUPT: dict[str, tuple[bytes, str, bool]] = {
    # name: (file bytes, message fragment, names tensor 'a')
    "too_short": (b"\x05\x00\x00", "too short", False),
    "header_len_zero": ((0).to_bytes(8, "little") + b"{}", "length is 0", False),
    "header_len_over_limit": (craft(raw=b"{}", length=100_000_001), "limit", False),
    "header_len_past_eof": (craft(raw=b"{}", length=1000), "exceeds", False),
    "not_utf8": (craft(raw=b'{"\xff": 1}'), "UTF-8", False),
    "not_json": (craft(raw=b'{"a": '), "not valid JSON", False),
    "deeply_nested_json": (craft(raw=b"[" * 200_000), "not valid JSON", False),
    "huge_int_literal": (craft(raw=b'{"a": {"shape": [' + b"9" * 5000 + b"]}}"), "not valid JSON", False),
    "not_object": (craft(raw=b"[1, 2]"), "not a JSON object but an array", False),
    "duplicate_key": (craft(raw=f'{{"a": {DA}, "a": {DA}}}'.encode(), data=D8), "'a' twice", False),
    "entry_not_object": (craft({"a": [1, 2]}), "not an object", True),
    "missing_field": (craft({"a": {"dtype": "F32", "shape": [2]}}, D8), "missing data_offsets", True),
    "extra_field": (craft({"a": entry(extra=1)}, D8), "unexpected extra", True),
    "unknown_dtype": (craft({"a": entry(dtype="F4")}, D8), "unsupported dtype 'F4'", True),
    "dtype_not_str": (craft({"a": entry(dtype=3)}, D8), "unsupported dtype", True),
    "shape_not_list": (craft({"a": entry(shape=2)}, D8), "shape", True),
    "shape_negative": (craft({"a": entry(shape=[-2])}, D8), "shape", True),
    "shape_float": (craft({"a": entry(shape=[2.0])}, D8), "shape", True),
    "shape_bool": (craft({"a": entry(shape=[True, 2])}, D8), "shape", True),
    "offsets_one_int": (craft({"a": entry(data_offsets=[8])}, D8), "data_offsets", True),
    "offsets_three_ints": (craft({"a": entry(data_offsets=[0, 8, 8])}, D8), "data_offsets", True),
    "offsets_not_ints": (craft({"a": entry(data_offsets=["0", 8])}, D8), "data_offsets", True),
    "offsets_reversed": (craft({"a": entry(data_offsets=[8, 0])}, D8), "data_offsets", True),
    "offsets_negative": (craft({"a": entry(data_offsets=[-8, 0])}, D8), "data_offsets", True),
    "size_mismatch": (craft({"a": entry(shape=[3])}, D8), "needs 12", True),
    "overlap": (
        craft({"b": entry(), "a": entry(data_offsets=[4, 12])}, bytes(12)),
        "overlaps tensor 'b'",
        True,
    ),
    "hole": (craft({"b": entry(), "a": entry(data_offsets=[12, 20])}, bytes(20)), "hole", True),
    "leading_hole": (craft({"a": entry(data_offsets=[4, 12])}, bytes(12)), "hole", True),
    "truncated": (craft({"a": A}, bytes(4)), "truncated", True),
    "trailing_bytes": (craft({"a": A}, bytes(12)), "4 trailing bytes", False),
    "metadata_not_object": (craft({"__metadata__": ["x"], "a": A}, D8), "__metadata__", False),
    "metadata_null": (craft({"__metadata__": None, "a": A}, D8), "__metadata__", False),
    "metadata_value_not_str": (craft({"__metadata__": {"k": 1}, "a": A}, D8), "__metadata__", False),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_header(tmp_path: Path, case: str) -> None:
    data, fragment, names_tensor = CORRUPT[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(TvInputError) as e:
        read_header(path)
    assert e.value.code == "E301"
    assert str(path) in e.value.message
    assert fragment in e.value.message
    if names_tensor:
        assert "tensor 'a'" in e.value.message
    assert "error[E301]" in str(e.value)


def test_valid_corpus_baseline(tmp_path: Path) -> None:
    """The corpus's valid base really is valid, so each case tests only its own defect."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(
        craft({"__metadata__": {"k": "v"}, "b": entry(), "a": entry(data_offsets=[8, 16])}, bytes(16))
    )
    infos, meta = read_header(path)
    assert list(infos) == ["b", "a"] and meta == {"k": "v"}
    assert infos["a"].offset == path.stat().st_size - 8


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TvInputError, match="no such file") as e:
        read_header(tmp_path / "nope.safetensors")
    assert e.value.code == "E300"
    assert isinstance(e.value, OSError)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(TvInputError, match="not a regular file"):
        read_header(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "m.pt", "m.pth", "m.ckpt"])
def test_pickle_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04")
    for opener in (read_header, Checkpoint.open):
        with pytest.raises(TvInputError) as e:
            opener(path)
        assert e.value.code == "E302"
        assert "never unpickles" in e.value.message and str(path) in e.value.message
        assert e.value.help and "save_file" in e.value.help and "weights_only=True" in e.value.help


def _valid_file() -> bytes:
    return craft(
        {
            "__metadata__": {"k": "v"},
            "x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
            "y": entry(data_offsets=[12, 20]),
        },
        bytes(range(20)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=120),
        st.tuples(st.integers(0, 200), st.integers(0, 255)).map(
            lambda m: (lambda b: b[: m[0]] + bytes([m[1]]) + b[m[0] + 1 :])(_valid_file())
        ),
        st.integers(0, 200).map(lambda k: _valid_file()[:k]),
    )
)
def test_fuzz_never_crashes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        infos, _ = read_header(path)
    except TvInputError as e:
        assert str(path) in e.message
        return
    with ChunkReader(path) as r:  # whatever is accepted can be read in full, inside the file
        for info in infos.values():
            assert info.offset + info.nbytes <= len(data)
            read_all(r, info)


# ------------------------------------------------------------------------------------------
# Checkpoint
# ------------------------------------------------------------------------------------------


def _model_tensors(seed: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": random_tensor("BF16", (40, 16), gen),  # 1280 B
        "model.layers.0.attn.q.weight": random_tensor("BF16", (16, 16), gen),  # 512 B
        "model.layers.0.attn.k.weight": random_tensor("F16", (16, 8), gen),  # 256 B
        "model.layers.0.norm.weight": random_tensor("F32", (16,), gen),  # 64 B
        "model.layers.1.attn.q.weight": random_tensor("BF16", (16, 16), gen),
        "model.layers.1.mask": random_tensor("BOOL", (16,), gen),
        "model.layers.1.scale": random_tensor("F8_E4M3", (7,), gen),
        "model.layers.1.step": random_tensor("I64", (), gen),
        "model.norm.weight": random_tensor("F32", (16,), gen),
        "lm_head.weight": random_tensor("BF16", (40, 16), gen),
    }


def _expected_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def test_single_file_checkpoint(tmp_path: Path) -> None:
    tensors = _model_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    ck = Checkpoint.open(path)
    assert not ck.is_dir and ck.files == [str(path)]
    assert ck.tensors == read_header(path)[0]
    assert ck.sidecar_files() == []
    with ck.reader() as r:
        for name, info in ck.tensors.items():
            assert same_bits(read_all(r, info, 100), tensors[name])


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = _model_tensors()
    limit = 1100  # the two 1280-byte tensors are larger than a shard: each gets its own
    out = tmp_path / "merged"
    with CheckpointWriter(out, plan_of(tensors), {"tvlang": "1"}, max_shard_bytes=limit) as w:
        assert not out.exists()
        write_from_two_threads(w, chunk_jobs(tensors, random.Random(5), max_chunk=200))
    expected = _expected_shards(tensors, limit)
    n = len(expected)
    assert n >= 4
    assert ["model.embed_tokens.weight"] in expected and ["lm_head.weight"] in expected
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == [*names, "model.safetensors.index.json"]
    assert siblings(out) == ["merged"]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * t.itemsize for t in tensors.values())}
    assert index["weight_map"] == {t: names[i] for i, shard in enumerate(expected) for t in shard}
    for i, shard in enumerate(expected):
        got, meta = load_with_library(out / names[i])
        assert set(got) == set(shard)
        assert meta == {"format": "pt", "tvlang": "1"}
        for name in shard:
            assert same_bits(got[name], tensors[name])
        assert sum(t.numel() * t.itemsize for t in got.values()) <= limit or len(shard) == 1

    ck = Checkpoint.open(out)
    assert ck.is_dir and list(ck.tensors) == list(tensors)  # shard order, then file order
    assert ck.metadata == {"format": "pt", "tvlang": "1"}
    assert ck.files == [str(out / n) for n in names]
    with ck.reader() as r:
        for name, info in ck.tensors.items():
            assert same_bits(read_all(r, info, 50), tensors[name])
            r.release(info, 0, info.numel)


def test_single_shard_directory(tmp_path: Path) -> None:
    tensors = _model_tensors()
    out = tmp_path / "m"
    with CheckpointWriter(out, plan_of(tensors)) as w:
        for name, t in tensors.items():
            w.write(name, 0, t.reshape(-1))
    assert os.listdir(out) == ["model.safetensors"]
    got, meta = load_with_library(out / "model.safetensors")
    assert meta == {"format": "pt"}
    assert all(same_bits(got[k], v) for k, v in tensors.items())
    assert Checkpoint.open(out).files == [str(out / "model.safetensors")]


def test_single_file_output(tmp_path: Path) -> None:
    tensors = _model_tensors()
    out = tmp_path / "m.safetensors"
    with CheckpointWriter(out, plan_of(tensors), {"a": "b"}, max_shard_bytes=10) as w:
        for name, t in tensors.items():
            w.write(name, 0, t.reshape(-1))
    assert siblings(out) == ["m.safetensors"]
    got, meta = load_with_library(out)
    assert meta == {"a": "b"} and all(same_bits(got[k], v) for k, v in tensors.items())


def _hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    save_file(_model_tensors(), str(d / "model.safetensors"), metadata={"format": "pt"})
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "README.md",
        # not sidecars:
        "pytorch_model.bin",
        "training_args.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "pytorch_model.bin.index.json",
        ".gitattributes",
    ]:
        (d / name).write_text(f"contents of {name}")
    (d / "original").mkdir()
    (d / "original" / "params.json").write_text("{}")
    return d


def test_sidecars_listed_and_copied(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path)
    ck = Checkpoint.open(d)
    sidecars = ck.sidecar_files()
    assert [os.path.basename(p) for p in sidecars] == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "chat_template.jinja",
            "README.md",
        ]
    )
    out = tmp_path / "out"
    tensors = _model_tensors()
    with (
        CheckpointWriter(out, plan_of(tensors), sidecars=sidecars, max_shard_bytes=3000) as w,
        ck.reader() as r,
    ):
        for name, info in ck.tensors.items():
            w.write(name, 0, r.read(info, 0, info.numel))
    for p in sidecars:
        assert (out / os.path.basename(p)).read_text() == Path(p).read_text()
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert Checkpoint.open(out).sidecar_files() == [str(out / os.path.basename(p)) for p in sidecars]


def test_sidecar_clash_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "model.safetensors").write_text("x")
    with pytest.raises(ValueError, match="clash"):
        CheckpointWriter(tmp_path / "out", [("a", "F32", (1,))], sidecars=[str(bad / "model.safetensors")])
    with pytest.raises(TvInputError, match="no such file"):
        CheckpointWriter(tmp_path / "out", [("a", "F32", (1,))], sidecars=[str(bad / "config.json")])
    assert siblings(bad) == ["src"]


def _shard_dir(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.zeros(4)}, str(d / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 36},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    return d, index


def _write_index(d: Path, index: dict | str) -> None:
    text = index if isinstance(index, str) else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)


def test_indexed_directory(tmp_path: Path) -> None:
    d, index = _shard_dir(tmp_path)
    _write_index(d, index)
    ck = Checkpoint.open(d)
    assert list(ck.tensors) == ["a", "b", "c"]
    assert ck.tensors["c"].path == str(d / "model-00002-of-00002.safetensors")
    with ck.reader() as r:
        assert r.read(ck.tensors["b"], 0, 3).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda ix: ix["weight_map"].update(d="model-00003-of-00003.safetensors"), "does not exist"),
        (lambda ix: ix["weight_map"].update(d="model-00002-of-00002.safetensors"), "does not hold it"),
        (lambda ix: ix["weight_map"].pop("b"), "does not list it"),
        (lambda ix: ix["weight_map"].update(b="model-00002-of-00002.safetensors"), "lists it in"),
        (lambda ix: ix["weight_map"].update(c="../elsewhere.safetensors"), "not a file name"),
        (lambda ix: ix.update(weight_map=[]), "weight_map"),
        (lambda ix: ix.update(weight_map={}), "no tensors"),
        (lambda ix: ix.pop("weight_map"), "weight_map"),
    ],
)
def test_bad_index(tmp_path: Path, mutate: Callable[[dict], object], fragment: str) -> None:
    d, index = _shard_dir(tmp_path)
    mutate(index)
    _write_index(d, index)
    with pytest.raises(TvInputError, match=fragment) as e:
        Checkpoint.open(d)
    assert str(d) in e.value.message


def test_index_not_json(tmp_path: Path) -> None:
    d, _ = _shard_dir(tmp_path)
    _write_index(d, '{"weight_map": {"a": "x", "a": "y"}}')
    with pytest.raises(TvInputError, match="twice"):
        Checkpoint.open(d)
    _write_index(d, "{nope")
    with pytest.raises(TvInputError, match="not valid JSON"):
        Checkpoint.open(d)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    d, index = _shard_dir(tmp_path)
    save_file({"c": torch.zeros(4), "a": torch.zeros(1)}, str(d / "model-00002-of-00002.safetensors"))
    _write_index(d, index)
    with pytest.raises(TvInputError, match="'a'"):
        Checkpoint.open(d)


def test_unindexed_directories(tmp_path: Path) -> None:
    d, _ = _shard_dir(tmp_path)
    with pytest.raises(TvInputError, match=r"2 \.safetensors files.*no model\.safetensors\.index\.json"):
        Checkpoint.open(d)
    save_file({"z": torch.zeros(1)}, str(d / "model.safetensors"))
    assert list(Checkpoint.open(d).tensors) == ["z"]  # model.safetensors is preferred

    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.zeros(1)}, str(other / "weights.safetensors"))
    assert list(Checkpoint.open(other).tensors) == ["w"]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    (pickled / "config.json").write_text("{}")
    with pytest.raises(TvInputError, match="never unpickles") as e:
        Checkpoint.open(pickled)
    assert e.value.code == "E302"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TvInputError, match=r"no \.safetensors") as e:
        Checkpoint.open(empty)
    assert e.value.code == "E300"
    with pytest.raises(TvInputError, match="no such file") as e:
        Checkpoint.open(tmp_path / "missing")
    assert e.value.code == "E300"


def test_checkpoint_reader_dispatch(tmp_path: Path) -> None:
    d, index = _shard_dir(tmp_path)
    _write_index(d, index)
    ck = Checkpoint.open(d)
    r = ck.reader()
    r.release(ck.tensors["c"], 0, 4)  # never opened: nothing to do
    assert r.read(ck.tensors["c"], 1, 3).tolist() == [0.0, 0.0]
    stranger = tmp_path / "s.safetensors"
    save_file({"q": torch.zeros(1)}, str(stranger))
    with pytest.raises(ValueError, match="not a file of this checkpoint"):
        r.read(read_header(stranger)[0]["q"], 0, 1)
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read(ck.tensors["a"], 0, 1)


# ------------------------------------------------------------------------------------------
# CheckpointWriter: temp + rename, overwrite
# ------------------------------------------------------------------------------------------


def _write_ones(w: CheckpointWriter, plan: Plan) -> None:
    for name, code, shape in plan:
        w.write(name, 0, torch.ones(math.prod(shape), dtype=TORCH_DTYPES[code]))


PLAN: Plan = [("a", "F32", (4,)), ("b", "F32", (4,))]


def test_directory_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = CheckpointWriter(out, PLAN, max_shard_bytes=16)
    (tmp,) = os.listdir(tmp_path)
    assert tmp.startswith(".out.tvlang-tmp-") and not out.exists()
    _write_ones(w, PLAN)
    assert not out.exists()
    w.abort()
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyError), CheckpointWriter(out, PLAN) as w:
        _write_ones(w, PLAN)
        raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_directory_writer_incomplete(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path / "out", PLAN, max_shard_bytes=16)
    w.write("a", 0, torch.ones(4))
    with pytest.raises(ValueError, match="'b'"):
        w.commit()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["out", "out.safetensors"])
def test_existing_output(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    with CheckpointWriter(out, PLAN) as w:
        _write_ones(w, PLAN)
    before = Checkpoint.open(out).tensors
    with pytest.raises(TvOutputError, match="already exists") as e:
        CheckpointWriter(out, PLAN)
    assert e.value.code == "E500"

    plan2: Plan = [("c", "F16", (3,))]
    w = CheckpointWriter(out, plan2, overwrite=True)
    _write_ones(w, plan2)
    assert Checkpoint.open(out).tensors.keys() == before.keys()  # old one intact until commit
    w.commit()
    assert list(Checkpoint.open(out).tensors) == ["c"]
    assert siblings(out) == [name]


def test_output_appearing_before_commit(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    w = CheckpointWriter(out, PLAN)
    _write_ones(w, PLAN)
    out.write_bytes(b"someone else's")
    with pytest.raises(TvOutputError, match="already exists"):
        w.commit()
    assert out.read_bytes() == b"someone else's"
    assert siblings(out) == ["out.safetensors"]


def test_overwrite_refusals(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("precious")
    with pytest.raises(TvOutputError, match="does not look like a model"):
        CheckpointWriter(notes, PLAN, overwrite=True)
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(TvOutputError, match="is a directory"):
        CheckpointWriter(tmp_path / "d.safetensors", PLAN, overwrite=True)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(TvOutputError, match="is a file"):
        CheckpointWriter(tmp_path / "plain", PLAN, overwrite=True)
    with pytest.raises(TvOutputError, match="cannot create its directory"):
        CheckpointWriter(tmp_path / "plain" / "sub" / "out", PLAN)
    assert (notes / "todo.txt").read_text() == "precious"


@pytest.mark.parametrize("name", ["out", "out.safetensors"])
def test_missing_parents_are_created_and_removed_on_abort(tmp_path: Path, name: str) -> None:
    target = tmp_path / "a" / "b" / name
    CheckpointWriter(target, PLAN).abort()
    assert not (tmp_path / "a").exists()
    with CheckpointWriter(target, PLAN) as w:
        w.write("a", 0, torch.ones(4))
        w.write("b", 0, torch.ones(4))
    assert target.exists()


def test_overwrite_input_in_place(tmp_path: Path) -> None:
    """Merging into the input's own path: the open maps keep the old data readable."""
    d = _hf_dir(tmp_path)
    ck = Checkpoint.open(d)
    sidecars = ck.sidecar_files()
    plan = plan_of(_model_tensors())
    with ck.reader() as r, CheckpointWriter(d, plan, sidecars=sidecars, overwrite=True) as w:
        for name, info in ck.tensors.items():
            half = info.numel // 2
            w.write(name, 0, r.read(info, 0, half))
            w.write(name, half, r.read(info, half, info.numel))
    again = Checkpoint.open(d)
    assert list(again.tensors) == [name for name, _, _ in plan]
    with again.reader() as r:
        for name, t in _model_tensors().items():
            assert same_bits(read_all(r, again.tensors[name], 64), t)
    assert len(again.sidecar_files()) == len(sidecars)
    assert siblings(d) == ["base"]


@pytest.mark.parametrize("name", ["out", "out.safetensors"])
def test_durable_commit(tmp_path: Path, name: str) -> None:
    d = _hf_dir(tmp_path)
    out = tmp_path / name
    w = CheckpointWriter(out, PLAN, max_shard_bytes=16, sidecars=Checkpoint.open(d).sidecar_files())
    _write_ones(w, PLAN)
    w.commit(durable=True)
    assert list(Checkpoint.open(out).tensors) == ["a", "b"]
    with pytest.raises(ValueError, match="already committed"):
        w.commit()
