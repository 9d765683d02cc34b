"""Reading and writing model weights: safetensors files and Hugging Face checkpoint directories.

Headers are validated up front, tensor data is read as zero-copy chunks of a memory map
and written as chunks at precomputed file offsets, so memory stays flat however large
the model is.
"""

from typing import Any

from tvlang.io import safetensors
from tvlang.io.checkpoint import Checkpoint, CheckpointReader, CheckpointWriter
from tvlang.io.safetensors import (
    ChunkReader,
    SafetensorsWriter,
    TensorInfo,
    is_pickle_path,
    read_header,
)


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPES`` and ``DTYPE_CODES`` import torch: made when first asked for."""
    if name in ("TORCH_DTYPES", "DTYPE_CODES"):
        return getattr(safetensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointReader",
    "CheckpointWriter",
    "ChunkReader",
    "SafetensorsWriter",
    "TensorInfo",
    "is_pickle_path",
    "read_header",
]
