"""Reading and writing model weights: safetensors files and Hugging Face checkpoint directories.

Headers are validated up front, tensor data is read as zero-copy chunks of a memory map
and written as chunks at precomputed file offsets, so memory stays flat however large
the model is.
"""

from tvlang.io.checkpoint import Checkpoint, CheckpointReader, CheckpointWriter
from tvlang.io.safetensors import (
    DTYPE_CODES,
    TORCH_DTYPES,
    ChunkReader,
    SafetensorsWriter,
    TensorInfo,
    is_pickle_path,
    read_header,
)

__all__ = [
    "DTYPE_CODES",
    "TORCH_DTYPES",
    "Checkpoint",
    "CheckpointReader",
    "CheckpointWriter",
    "ChunkReader",
    "SafetensorsWriter",
    "TensorInfo",
    "is_pickle_path",
    "read_header",
]
