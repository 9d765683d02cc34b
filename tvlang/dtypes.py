"""Element types: the one table every layer reads.

Each safetensors dtype code has one :class:`DType` entry saying its size, whether it is a float,
how numpy stores it (numpy has no bfloat16 or float8: those are raw 16- and 8-bit integers), which
torch dtype holds it, how a generated kernel spells its pointer type (C, Triton; None where no
kernel takes it) and the names users write for it (``--dtype bf16``, mergekit's ``bfloat16``).

Nothing here imports torch: :func:`torch_dtype` and :func:`code_of` resolve torch's dtypes when
a caller that already holds torch tensors asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One storage type: its names in safetensors, numpy, torch and the generated kernels."""

    code: str  # the safetensors code
    itemsize: int
    is_float: bool
    numpy: str  # the numpy dtype that stores it (bit patterns for bfloat16 and float8)
    torch: str  # the attribute of the torch module
    c: str | None = None  # a generated C kernel's element type (None: no kernel takes it)
    triton: str | None = None  # a generated Triton kernel's element type
    names: tuple[str, ...] = ()  # what users write for it as an output dtype

    @property
    def wide(self) -> bool:
        """Inputs or outputs this wide make a merge accumulate in float64."""
        return self.is_float and self.itemsize >= 4


DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        DType(
            "F64", 8, True, "float64", "float64", "double", "tl.float64", ("fp64", "f64", "float64", "double")
        ),
        DType(
            "F32", 4, True, "float32", "float32", "float", "tl.float32", ("fp32", "f32", "float32", "float")
        ),
        DType(
            "F16", 2, True, "float16", "float16", "_Float16", "tl.float16", ("fp16", "f16", "float16", "half")
        ),
        DType("BF16", 2, True, "uint16", "bfloat16", "uint16_t", "tl.bfloat16", ("bf16", "bfloat16")),
        DType("F8_E4M3", 1, True, "uint8", "float8_e4m3fn", "uint8_t", "tl.uint8"),  # bytes, decoded
        DType("F8_E5M2", 1, True, "uint8", "float8_e5m2", "uint8_t", "tl.uint8"),  # by the kernels
        DType("I64", 8, False, "int64", "int64"),
        DType("I32", 4, False, "int32", "int32"),
        DType("I16", 2, False, "int16", "int16"),
        DType("I8", 1, False, "int8", "int8"),
        DType("U8", 1, False, "uint8", "uint8"),
        DType("BOOL", 1, False, "bool", "bool"),
    )
}

ITEMSIZE: dict[str, int] = {code: d.itemsize for code, d in DTYPES.items()}
FLOATS: frozenset[str] = frozenset(code for code, d in DTYPES.items() if d.is_float)
WIDE: frozenset[str] = frozenset(code for code, d in DTYPES.items() if d.wide)
KERNEL_DTYPES: frozenset[str] = frozenset(code for code, d in DTYPES.items() if d.c is not None)
OUTPUT_NAMES: dict[str, str] = {name: code for code, d in DTYPES.items() for name in d.names}


def torch_dtype(code: str) -> torch.dtype:
    """torch's dtype for a code (imports torch: only for callers that hold torch tensors)."""
    import torch

    dtype: torch.dtype = getattr(torch, DTYPES[code].torch)
    return dtype


def code_of(dtype: Any) -> str | None:
    """The code of a torch dtype (``torch.bfloat16`` → ``"BF16"``), None for one no file holds."""
    return _BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))


_BY_TORCH_NAME = {d.torch: code for code, d in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """What a header says of a tensor: its dtype code and shape (no data).  The readers produce
    it, the planner plans from it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


__all__ = [
    "DTYPES",
    "FLOATS",
    "ITEMSIZE",
    "KERNEL_DTYPES",
    "OUTPUT_NAMES",
    "WIDE",
    "DType",
    "TensorMeta",
    "code_of",
    "torch_dtype",
]
