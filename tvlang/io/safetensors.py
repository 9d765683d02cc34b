"""The safetensors format, read and written by hand.

The ``safetensors`` library reads and writes whole tensors; tvlang streams
chunks of tensors that may be larger than memory, so this module owns the
format itself:

* :func:`read_header` parses and fully validates a header without touching
  tensor data, so every later read can trust offsets and sizes.
* :class:`ChunkReader` hands out zero-copy views of element ranges through a
  memory map and drops pages behind the cursor so resident memory stays flat.
* :class:`SafetensorsWriter` plans the header up front and ``pwrite``\\ s chunks
  at their final offsets, from any thread, into a temporary file that only
  :meth:`~SafetensorsWriter.commit` renames into place (the library cannot
  write a chunk to a file offset).

Format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``),
then the data area, which the tensors tile exactly; offsets are relative to it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import platform
import re
import shutil
import stat
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from tvlang.chunks import Chunk, is_torch, numpy_dtype, storage
from tvlang.dtypes import DTYPES, ITEMSIZE, code_of, torch_dtype
from tvlang.errors import TvInputError, TvOutputError
from tvlang.io import pages, streaming

if TYPE_CHECKING:
    import torch

_T = TypeVar("_T", bound="Transaction")

__all__ = [
    "MAX_HEADER_BYTES",
    "ChunkReader",
    "SafetensorsWriter",
    "TensorInfo",
    "check_free_space_together",
    "is_pickle_path",
    "read_header",
    "remove_stale_temporaries",
]


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPES`` (code → torch dtype) and ``DTYPE_CODES`` (its inverse), made when first asked
    for: they import torch, which reading and writing files never needs."""
    if name == "TORCH_DTYPES":
        return {code: torch_dtype(code) for code in DTYPES}
    if name == "DTYPE_CODES":
        return {torch_dtype(code): code for code in DTYPES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The same limit as the reference implementation: a larger header is an attack or an accident.
MAX_HEADER_BYTES = 100_000_000

# Pickle-based checkpoint formats: loading one can execute arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_PAGE = mmap.PAGESIZE
# The largest folio the page cache holds a file in (x86-64, arm64 with 4 KiB pages): a fault maps
# the whole folio around the byte it touches, so a tensor's edges map its neighbours' pages too.
_FOLIO = 2 << 20

# E3xx: inputs.  E5xx: outputs.
_E_MISSING = "E300"
_E_MALFORMED = "E301"
_E_PICKLE = "E302"
_E_OUTPUT = "E500"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read any element range without the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------


def is_pickle_path(path: str | os.PathLike[str]) -> bool:
    """True for the pickle-based formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ...)."""
    return os.fspath(path).lower().endswith(_PICKLE_SUFFIXES)


def pickle_refusal(path: str) -> TvInputError:
    """The error for a pickle checkpoint: tvlang never unpickles, say how to convert once."""
    return TvInputError(
        f"{path}: is a pickle checkpoint; tvlang never unpickles (loading a pickle can run arbitrary code)",
        help=(
            'convert it to safetensors once, e.g. `python -c "import torch, safetensors.torch as st; '
            f"st.save_file(torch.load('{path}', weights_only=True), 'model.safetensors')\"`"
        ),
        notes=(
            "for a Hugging Face model directory: "
            "`AutoModel.from_pretrained(d).save_pretrained(out, safe_serialization=True)`",
            "tensors that share memory (tied weights) must be cloned before `save_file`",
        ),
        code=_E_PICKLE,
    )


def _malformed(path: str, what: str, tensor: str | None = None) -> TvInputError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return TvInputError(
        f"{where}{what}",
        help="the file is truncated, corrupt or not a safetensors file",
        code=_E_MALFORMED,
    )


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate keys (plain ``json`` keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json_object(raw: bytes, path: str, what: str) -> dict[str, Any]:
    """Decode strict UTF-8 JSON that must be an object without duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _malformed(path, f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _malformed(path, f"{what} has the key {e.key!r} twice") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _malformed(path, f"{what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _malformed(path, f"{what} is not a JSON object but {_json_kind(value)}")
    return value


def _json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _open_regular(path: str) -> int:
    """Open a regular file read-only; FIFOs and devices are refused instead of blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TvInputError(f"{path}: no such file", code=_E_MISSING) from None
    except OSError as e:
        raise TvInputError(f"{path}: cannot open: {e.strerror}", code=_E_MISSING) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TvInputError(f"{path}: not a regular file", code=_E_MISSING)
    return fd


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        part = os.pread(fd, n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and fully validate the header of a ``.safetensors`` file; no tensor data is read.

    Returns the tensors ordered by offset and the ``__metadata__`` (``{}`` when absent).
    Any defect raises :class:`TvInputError` naming the file (and tensor): later reads
    trust these offsets blindly, so nothing may get through.
    """
    path = os.fspath(path)
    if is_pickle_path(path):
        raise pickle_refusal(path)
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        prefix = _pread_exact(fd, 8, 0)
        if len(prefix) < 8:
            raise _malformed(path, f"file is {size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n == 0:
            raise _malformed(path, "header length is 0")
        if n > MAX_HEADER_BYTES:
            raise _malformed(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise _malformed(path, f"header length {n} exceeds the {size - 8} bytes after the length")
        raw = _pread_exact(fd, n, 8)
        if len(raw) != n:
            raise _malformed(path, "file shrank while reading the header")
    finally:
        os.close(fd)
    header = parse_json_object(raw, path, "header")
    return _validate_header(header, path, data_start=8 + n, data_len=size - 8 - n)


def _validate_header(
    header: dict[str, Any], path: str, data_start: int, data_len: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _malformed(path, "__metadata__ is not an object of strings to strings")

    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _malformed(path, f"entry is {_json_kind(entry)}, not an object", name)
        if entry.keys() != _ENTRY_FIELDS:
            missing = sorted(_ENTRY_FIELDS - entry.keys())
            extra = sorted(entry.keys() - _ENTRY_FIELDS)
            what = "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unexpected {', '.join(extra)}"] if extra else [])
            )
            raise _malformed(path, f"entry must have exactly dtype, shape, data_offsets ({what})", name)
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _malformed(path, f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})", name)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _malformed(path, f"shape {shape!r} is not a list of non-negative integers", name)
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _malformed(
                path, f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end", name
            )
        begin, end = offsets
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise _malformed(
                path, f"holds {end - begin} bytes but {dtype} of shape {shape} needs {expected}", name
            )
        if end > data_len:
            raise _malformed(
                path, f"data ends at {end} but the data area has only {data_len} bytes (truncated?)", name
            )
        entries.append((begin, end, name, dtype, tuple(shape)))

    # The tensors must tile [0, data_len) exactly: no overlap (aliasing), no hole (hidden bytes).
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: ties keep file order
    cursor, previous = 0, None
    for begin, end, name, _, _ in entries:
        if begin < cursor:
            raise _malformed(path, f"data overlaps tensor {previous!r}", name)
        if begin > cursor:
            raise _malformed(path, f"{begin - cursor} unused bytes before its data (a hole)", name)
        cursor, previous = end, name
    if cursor != data_len:
        raise _malformed(path, f"{data_len - cursor} trailing bytes after the last tensor")

    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return tensors, dict(metadata)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _map_noreserve_flag() -> int:
    """``MAP_NORESERVE`` (missing from Python < 3.13's ``mmap``): its value differs by architecture."""
    flag = getattr(mmap, "MAP_NORESERVE", None)
    if flag is not None:
        return int(flag)
    if platform.system() != "Linux":
        return 0
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "aarch64", "arm64", "riscv64", "s390x") or machine.startswith(
        ("i386", "i686", "arm")
    ):
        return 0x4000
    return 0


_MAP_NORESERVE = _map_noreserve_flag()


def _map_file(fd: int) -> tuple[mmap.mmap, np.ndarray[Any, Any]]:
    """Map a whole file and wrap it as one uint8 array without copying.

    A private writable mapping (what ``ACCESS_COPY`` gives) makes writable views (a torch view
    of a read-only one warns), but the kernel charges its full size against the
    commit limit: a file larger than RAM + swap fails with ENOMEM (measured: 60 GiB on a
    24 GiB machine). ``MAP_NORESERVE`` drops that charge; we never write, so no page is
    ever copied. Under strict overcommit (mode 2) we fall back to a read-only shared map.
    """
    try:
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    return mm, np.frombuffer(mm, dtype=np.uint8)


class ChunkReader:
    """Zero-copy chunk views of tensors in one safetensors file, through a memory map.

    Every page a plain map touches stays resident (counted in RSS and cgroup limits), so
    :meth:`release` drops pages behind the cursor with ``MADV_DONTNEED``. Views must be
    treated as read-only. :meth:`close` drops the reader's reference; the mapping itself is
    unmapped when the last view of it dies, so outstanding views never dangle.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = _open_regular(self.path)
        try:
            if os.fstat(fd).st_size == 0:
                raise _malformed(self.path, "file is empty")
            self._mm: mmap.mmap | None
            self._mm, self._bytes = _map_file(fd)
            self._address = int(self._bytes.ctypes.data)
        finally:
            os.close(fd)  # the map keeps its own descriptor
        self._size = len(self._mm)
        self._ahead = streaming.Readahead(self._size, functools.partial(streaming.prefetch_mapped, self._mm))
        self._real: str | None = None

    def _check(self, info: TensorInfo, start: int, stop: int) -> None:
        if info.path != self.path:
            if self._real is None:
                self._real = os.path.realpath(self.path)
            if os.path.realpath(info.path) != self._real:
                raise ValueError(f"tensor {info.name!r} is in {info.path}, not in {self.path}")
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"range [{start}, {stop}) outside tensor {info.name!r} of {info.numel} elements")
        if info.offset + info.nbytes > self._size:
            raise ValueError(f"tensor {info.name!r} lies beyond the end of {self.path} (file changed?)")

    def read(self, info: TensorInfo, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Elements ``[start, stop)`` of the flattened tensor as a 1-D numpy array of the storage
        dtype (:func:`tvlang.chunks.numpy_dtype`; :func:`tvlang.chunks.to_torch` makes it a tensor).

        A view of the mapping when the data is aligned to the item size (always, for files
        whose data area starts at a multiple of 8); otherwise an aligned copy.
        """
        data = self._bytes  # before the check: close() clears _mm first, then _bytes
        if self._mm is None:
            raise ValueError(f"reader of {self.path} is closed")
        self._check(info, start, stop)
        dtype = numpy_dtype(info.dtype)
        size = dtype.itemsize
        begin = info.offset + start * size
        self._ahead.reached(begin)
        raw = data[begin : begin + (stop - start) * size]
        if begin % size == 0:  # the mapping is page-aligned, so the address is too
            return raw.view(dtype)
        out = np.empty(stop - start, dtype=dtype)
        out.view(np.uint8)[:] = raw
        return out

    def release(
        self, info: TensorInfo, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        """Drop elements ``[start, stop)`` from this process's memory, in whole 2 MiB blocks.

        A fault maps a large folio (up to 2 MiB) whole, often as one 2 MiB mapping, and
        dropping part of such a mapping splits it, with a flush of every other core's TLB
        that cannot wait for the next. So the range dropped runs from the 2 MiB boundary at or
        below ``start`` (the block it shares with the range before, which a scan has finished;
        above it when not ``before``) to the one at or below ``stop`` (the rest goes with the
        range after), and at the tensor's end, or with ``after``, up to the next boundary. A
        small tensor would otherwise leave its neighbours' pages mapped until the file is closed
        (measured: 10 MiB a layer norm over five inputs). A neighbour still in use simply faults
        its pages back in. A no-op once closed.
        """
        mm = self._mm
        if mm is None:
            return
        self._check(info, start, stop)
        size = ITEMSIZE[info.dtype]
        begin, end = info.offset + start * size, info.offset + stop * size
        lo = begin // _FOLIO * _FOLIO if before else -(-begin // _FOLIO) * _FOLIO
        if after is None:
            after = stop == info.numel
        hi = min(self._size, -(-end // _FOLIO) * _FOLIO) if after else end // _FOLIO * _FOLIO
        if hi > lo:
            pages.drop(mm, self._address, lo, hi - lo)  # (with other readers', inside a pages.Batch)

    def close(self) -> None:
        # Not mm.close(): live views (numpy's, and torch's made from them) would point at
        # unmapped memory. Dropping our references unmaps as soon as no view remains.
        self._mm = None
        self._bytes = np.empty(0, dtype=np.uint8)
        self._ahead.close()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class PlannedTensor(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def plan_tensors(tensors: Sequence[tuple[str, str, Sequence[int]]]) -> list[PlannedTensor]:
    """Validate a write plan (unique names, known dtypes, non-negative shapes) and size it."""
    planned: list[PlannedTensor] = []
    seen: set[str] = set()
    for name, dtype, shape in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} planned twice")
        seen.add(name)
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        dims = tuple(shape)
        if not all(_is_int(d) and d >= 0 for d in dims):
            raise ValueError(f"tensor {name!r}: shape {dims!r} is not non-negative integers")
        planned.append(PlannedTensor(name, dtype, dims, math.prod(dims) * ITEMSIZE[dtype]))
    return planned


def encode_header(planned: Sequence[PlannedTensor], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON, space-padded so the data area starts at a multiple of 8."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in planned:
        offsets = [offset, offset + t.nbytes]
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": offsets}
        offset += t.nbytes
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def temp_sibling(path: str, tag: str = "tmp") -> str:
    """A hidden, unique name next to `path`: same filesystem, so a rename is atomic."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tvlang-{tag}-{os.getpid()}-{os.urandom(4).hex()}")


_TEMP_NAME = re.compile(r"^\.(?P<tail>.+)\.tvlang-(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: str) -> list[tuple[str, int]]:
    """Delete the temporaries that runs killed before they could clean up (``kill -9``, a power
    cut) left next to ``path``; returns each removed path with the process that left it.

    A temporary belongs to a dead run when its owner process no longer exists on this machine. The
    renamed-away previous output (``old``) is removed only when ``path`` exists again: otherwise
    it is the only copy of that output, and stays."""
    head, tail = os.path.split(path.rstrip(os.sep) or os.sep)
    try:
        names = os.listdir(head or ".")
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or m["tail"] != tail or _alive(int(m["pid"])):
            continue
        if m["tag"] == "old" and not os.path.lexists(path):
            continue
        stale = os.path.join(head, name)
        try:
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.unlink(stale)
        except OSError:
            continue
        removed.append((stale, int(m["pid"])))
    return removed


def swap_into_place(tmp: str, path: str) -> str | None:
    """Rename the finished ``tmp`` to ``path``, so that ``path`` never holds a partial output: an
    existing ``path`` is renamed away first (and back if the second rename fails).  Returns where
    the old one went, for the caller to delete once its own clean-up is disarmed; raises OSError."""
    old = None
    if os.path.lexists(path):
        old = temp_sibling(path, "old")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        if old is not None:
            os.rename(old, path)
        raise
    return old


def remove_old(old: str | None) -> None:
    """Delete what :func:`swap_into_place` renamed away."""
    if old is None:
        return
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


def check_free_space_together(outputs: Sequence[tuple[str, int]]) -> None:
    """Outputs that share a filesystem must fit on it together (a sweep's ten outputs, not each)."""
    need: dict[int, tuple[str, int, list[str]]] = {}
    for path, nbytes in outputs:
        directory = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(directory):  # the nearest existing ancestor: parents are made later
            directory = os.path.dirname(directory)
        try:
            device = os.stat(directory).st_dev
        except OSError:
            continue
        where, total, paths = need.get(device, (directory, 0, []))
        need[device] = (where, total + nbytes, [*paths, path])
    for where, total, paths in need.values():
        what = (
            paths[0]
            if len(paths) == 1
            else f"{len(paths)} outputs ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
        )
        check_free_space(where, total, what)


def check_free_space(directory: str, nbytes: int, path: str) -> None:
    """Fail before the work rather than at the end of it when the disk cannot hold the output."""
    try:
        free = shutil.disk_usage(directory or ".").free
    except OSError:
        return
    if nbytes > free:
        raise TvOutputError(
            f"{path}: needs {nbytes} bytes but only {free} are free on its filesystem", code=_E_OUTPUT
        )


def _discard(fd: int, tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


class _Slot(NamedTuple):
    offset: int  # absolute byte offset in the file
    numel: int
    dtype: str  # the dtype code


class Transaction:
    """A context manager that commits on success and aborts on an exception (writers share it)."""

    _state: str

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _named(code: str) -> str:
    """A dtype code as users read it (``F32`` → ``float32``)."""
    return DTYPES[code].torch


class SafetensorsWriter(Transaction):
    """Streams one ``.safetensors`` file whose layout is fixed before any data exists.

    The header is written first and the file ``ftruncate``\\ d to its final size, so each
    chunk has a known offset and is ``pwrite``\\ n there as soon as it is computed, from
    any thread, in any order. All of it happens under a hidden temporary sibling; only
    :meth:`commit` renames it into place, so a failed run never leaves a partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tensors: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        planned = plan_tensors(tensors)
        header = encode_header(planned, metadata)
        self._planned, self._header_len = planned, len(header)
        self._slots: dict[str, _Slot] = {}
        offset = len(header)
        for t in planned:
            self._slots[t.name] = _Slot(offset, math.prod(t.shape), t.dtype)
            offset += t.nbytes
        self.size = offset
        self._written = dict.fromkeys(self._slots, 0)
        # Guards _state and counts writes in flight, so that abort/commit never close the
        # descriptor under a pwrite (whose fd number could by then name another file).
        self._cond = threading.Condition()
        self._inflight = 0
        self._state = "open"
        self._tmp = temp_sibling(self.path)
        check_free_space(os.path.dirname(self.path), self.size, self.path)
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise TvOutputError(f"{self.path}: cannot create: {e.strerror}", code=_E_OUTPUT) from None
        self._finalizer = weakref.finalize(self, _discard, self._fd, self._tmp)
        self._behind = streaming.WriteBehind(self._fd, self.size)
        weakref.finalize(self, self._behind.close)
        try:
            self._pwrite(memoryview(header), 0)
            os.ftruncate(self._fd, self.size)
        except OSError as e:
            self.abort()
            raise TvOutputError(f"{self.path}: cannot write: {e.strerror}", code=_E_OUTPUT) from None
        except BaseException:  # Ctrl-C, SIGTERM
            self.abort()
            raise

    @property
    def temp_path(self) -> str:
        """Where the data is being written until :meth:`commit`."""
        return self._tmp

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        while buf:  # pwrite may write less than asked (Linux caps one call near 2 GiB)
            n = os.pwrite(self._fd, buf, offset)
            buf, offset = buf[n:], offset + n

    def write(self, name: str, start: int, chunk: Chunk) -> None:
        """Write elements ``[start, start + len(chunk))`` of tensor `name`; thread-safe.

        `chunk` must be 1-D, contiguous and of the planned dtype: a numpy array of its storage
        dtype, or a torch tensor (one on another device is copied to the CPU first).
        """
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the plan")
        if is_torch(chunk):
            if code_of(chunk.dtype) != slot.dtype:
                raise ValueError(
                    f"{self.path}: tensor {name!r} is {_named(slot.dtype)}, chunk is {chunk.dtype}"
                )
            if chunk.dim() != 1 or not chunk.is_contiguous():
                raise ValueError(f"{self.path}: chunk of {name!r} must be 1-D and contiguous")
            chunk = storage(chunk)
        elif chunk.dtype != numpy_dtype(slot.dtype):
            raise ValueError(f"{self.path}: tensor {name!r} is {_named(slot.dtype)}, chunk is {chunk.dtype}")
        elif chunk.ndim != 1 or not chunk.flags.c_contiguous:
            raise ValueError(f"{self.path}: chunk of {name!r} must be 1-D and contiguous")
        n = chunk.size
        if not 0 <= start <= start + n <= slot.numel:
            raise ValueError(f"{self.path}: [{start}, {start + n}) outside {name!r} of {slot.numel} elements")
        data = memoryview(chunk.data).cast("B")  # zero-copy bytes
        with self._cond:
            if self._state != "open":
                raise ValueError(f"{self.path}: writer is {self._state}")
            self._inflight += 1
        done = False
        try:
            offset = slot.offset + start * ITEMSIZE[slot.dtype]
            self._pwrite(data, offset)
            self._behind.wrote(offset, len(data))
            done = True
        except OSError as e:
            raise TvOutputError(f"{self.path}: cannot write: {e.strerror}", code=_E_OUTPUT) from None
        finally:
            with self._cond:
                self._inflight -= 1
                if done:
                    self._written[name] += n
                self._cond.notify_all()

    def layout(self) -> dict[str, tuple[int, int, str]]:
        """Each tensor's (byte offset in the file, elements, dtype code): what another process needs to
        ``pwrite`` it into :attr:`temp_path` (a distributed run's worker)."""
        return {name: (slot.offset, slot.numel, slot.dtype) for name, slot in self._slots.items()}

    def record_written(self, name: str, count: int) -> None:
        """Count ``count`` elements of ``name`` that another process wrote into :attr:`temp_path`
        and reported complete, so that :meth:`commit`'s check covers them too."""
        with self._cond:
            if self._state != "open":
                raise ValueError(f"{self.path}: writer is {self._state}")
            self._written[name] += count

    def rewrite_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the header's ``__metadata__`` with facts known only once the data is written
        (an adapter's per-tensor errors).  The new header must not be longer than the first: plan
        it with placeholders of the final width; a shorter one is padded with spaces."""
        header = encode_header(self._planned, metadata)
        raw = header[8:].rstrip(b" ")
        room = self._header_len - 8
        if len(raw) > room:
            raise ValueError(f"{self.path}: new metadata needs {len(raw)} header bytes, {room} were planned")
        raw += b" " * (room - len(raw))
        with self._cond:
            if self._state != "open":
                raise ValueError(f"{self.path}: writer is {self._state}")
        try:
            self._pwrite(memoryview(room.to_bytes(8, "little") + raw), 0)
        except OSError as e:
            raise TvOutputError(f"{self.path}: cannot write: {e.strerror}", code=_E_OUTPUT) from None

    def incomplete(self) -> list[str]:
        """Tensors whose written element count differs from their size (a bug upstream)."""
        return [name for name, slot in self._slots.items() if self._written[name] != slot.numel]

    def _close_to_writes(self, state: str, timeout: float | None = None) -> bool:
        """Refuse new writes and wait for those in flight; False if already closed.

        An abort waits at most ``timeout``: a Ctrl-C can land between a write's count going up
        and its ``finally``, in the very thread that is now aborting, and nobody would ever
        bring the count down again (the file is being discarded anyway)."""
        with self._cond:
            if self._state != "open":
                return False
            self._state = state
            self._cond.wait_for(lambda: self._inflight == 0, timeout=timeout)
            return True

    def commit(self, durable: bool = False) -> None:
        """Close and rename into place (``durable``: fsync file and directory first).

        Raises ValueError, and deletes the temporary file, when some tensor did not get
        exactly its number of elements: a hole would silently read back as zeros.
        """
        if not self._close_to_writes("committed"):
            raise ValueError(f"{self.path}: writer is already {self._state}")
        self._behind.close()
        missing = self.incomplete()
        if missing:
            self._state = "aborted"
            self._finalizer()
            shown = ", ".join(
                f"{name!r} ({self._written[name]}/{self._slots[name].numel})" for name in missing[:5]
            )
            raise ValueError(f"{self.path}: not every element was written exactly once: {shown}")
        self._finalizer.detach()
        try:
            try:
                if durable:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
            os.replace(self._tmp, self.path)
            if durable:
                fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            _discard(-1, self._tmp)
            self._state = "aborted"
            raise TvOutputError(f"{self.path}: cannot write: {e.strerror}", code=_E_OUTPUT) from None

    def abort(self) -> None:
        """Close and delete the temporary file; idempotent, and a no-op after commit."""
        if self._close_to_writes("aborted", timeout=5.0):
            self._behind.close()
            self._finalizer()


def fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
