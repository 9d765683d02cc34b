"""Chunks: what the runtime hands between sources, kernels and sinks, without importing torch.

A chunk is a 1-D contiguous array of one tensor's elements.  Files are read as numpy arrays of
the storage dtype (:data:`tvlang.dtypes.DTYPES` ``.numpy``: bfloat16 and float8 are their 16- and
8-bit patterns), the compiled kernels take their addresses, and the writers write their bytes, so a
merge of files on the compiled CPU kernels never imports torch (it costs about a second and
200 MB of resident memory, most of a small merge).  In-memory state dicts, live models and the GPU
hand out torch tensors; both kinds are accepted everywhere.  The eager (torch) paths convert a
numpy chunk with :func:`to_torch`, zero-copy, and only then import torch.

>>> import numpy as np
>>> a = np.array([0x3F80, 0x4000], dtype=np.uint16)  # bfloat16 1.0 and 2.0
>>> is_torch(a), numpy_dtype("BF16") == a.dtype, widen(a, "BF16").tolist()
(False, True, [1.0, 2.0])
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from tvlang.dtypes import DTYPES, KERNEL_DTYPES

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs

Chunk: TypeAlias = "np.ndarray[Any, Any] | torch.Tensor"

_NUMPY = {code: np.dtype(d.numpy) for code, d in DTYPES.items()}
# The float codes a numpy storage type names alone (float64, float32, float16, uint16 for bfloat16);
# uint8 is U8 or either float8, so only the plan can say which.
_FLOAT_CODE = {
    _NUMPY[code]: code
    for code in KERNEL_DTYPES
    if [_NUMPY[c] for c in KERNEL_DTYPES].count(_NUMPY[code]) == 1
}
# Every storage type names one code but uint8 (U8 or a float8): taken as U8 unless told otherwise.
_GUESS = {**{_NUMPY[code]: code for code in DTYPES if not code.startswith("F8")}, **_FLOAT_CODE}


def numpy_dtype(code: str) -> np.dtype[Any]:
    """The numpy storage dtype of a dtype code."""
    return _NUMPY[code]


def is_torch(x: object) -> TypeIs[torch.Tensor]:
    """Whether ``x`` is a torch tensor (never imports torch: without it, nothing is one)."""
    # (getattr: another thread may be importing torch, its module still without Tensor: then no
    # tensor exists yet either)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def storage_code(x: Chunk) -> str | None:
    """The kernel dtype code a chunk's storage says by itself: a torch tensor's dtype, or a numpy
    type that only one kernel dtype uses; None otherwise (uint8: U8 or a float8; the plan knows)."""
    if is_torch(x):
        from tvlang.dtypes import code_of

        code = code_of(x.dtype)
        return code if code in KERNEL_DTYPES else None
    return _FLOAT_CODE.get(x.dtype)


def holds(x: Chunk, code: str) -> bool:
    """Whether the chunk ``x`` is stored as ``code``'s dtype (numpy: its storage type)."""
    if is_torch(x):
        from tvlang.dtypes import code_of

        return code_of(x.dtype) == code
    return bool(x.dtype == _NUMPY[code])


def address(x: Chunk) -> int:
    """The address of a contiguous CPU chunk's first element."""
    if is_torch(x):
        assert x.is_contiguous() and x.device.type == "cpu"
        return int(x.data_ptr())
    assert x.flags.c_contiguous
    return int(x.ctypes.data)


def numel(x: Chunk) -> int:
    return int(x.numel()) if is_torch(x) else int(x.size)


def to_torch(x: Chunk, code: str | None = None) -> torch.Tensor:
    """A torch view of a chunk (numpy storage reinterpreted as ``code``'s dtype, no copy; without
    ``code``, the one its storage type names: uint8 is U8, never a float8).

    File views are read-only; torch has no such flag and warns, but views are never written."""
    if is_torch(x):
        return x
    import torch

    from tvlang.dtypes import torch_dtype

    code = code or _GUESS[x.dtype]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(x)
    return t.view(torch_dtype(code)) if t.dtype != torch_dtype(code) else t


def storage(x: Chunk) -> np.ndarray[Any, Any]:
    """A numpy view of a chunk's storage (a torch tensor's bytes are copied off a GPU first)."""
    if not is_torch(x):
        return x
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    from tvlang.dtypes import code_of

    code = code_of(t.dtype)
    assert code is not None, t.dtype
    import torch

    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return raw.view(_NUMPY[code])


_local = threading.local()


def work_array(name: str, dtype: str, n: int) -> np.ndarray[Any, Any]:
    """A per-thread numpy buffer reused across chunks (``dtype``: a numpy name), the numpy twin of
    :func:`tvlang.ops.work_buffer`: no temporaries on the hot path."""
    buffers: dict[tuple[str, str], np.ndarray[Any, Any]] = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=dtype)
        buffers[(name, dtype)] = buf
    return buf[:n]


def widen(x: np.ndarray[Any, Any], code: str, dtype: str = "float64") -> np.ndarray[Any, Any]:
    """The values of numpy storage of ``code`` as a new float array (exact: every value fits)."""
    if code == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32).astype(dtype)
    if code.startswith("F8"):  # rare: torch knows float8
        return to_torch(x, code).to(getattr(sys.modules["torch"], dtype)).numpy()
    return x.astype(dtype)


__all__ = [
    "Chunk",
    "address",
    "holds",
    "is_torch",
    "numel",
    "numpy_dtype",
    "storage",
    "storage_code",
    "to_torch",
    "widen",
    "work_array",
]
