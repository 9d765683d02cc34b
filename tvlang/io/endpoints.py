"""Where a plan's chunks come from and go to: checkpoints on disk or state dicts in memory.

A *source* hands out chunk views of named tensors (``read``) and is told when a
chunk is done (``release``); a *sink* takes output chunks at their element
offsets (``write``) and is committed or aborted as a whole.  The runtime sees
only these two shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from tvlang.errors import TvInputError
from tvlang.io.checkpoint import Checkpoint, CheckpointReader
from tvlang.io.safetensors import DTYPE_CODES, DTYPES, TensorInfo
from tvlang.plan.plan import TensorMeta


class Source(Protocol):
    def read(self, name: str, start: int, stop: int) -> torch.Tensor: ...
    def release(self, name: str, start: int, stop: int) -> None: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def write(self, name: str, start: int, chunk: torch.Tensor) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def checkpoint_metas(ckpt: Checkpoint) -> dict[str, TensorMeta]:
    return {name: TensorMeta(info.dtype, tuple(info.shape)) for name, info in ckpt.tensors.items()}


class CheckpointSource:
    """Chunk views of a checkpoint's tensors through memory maps (see :class:`tvlang.io.ChunkReader`)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.tensors: Mapping[str, TensorInfo] = ckpt.tensors
        self._reader: CheckpointReader = ckpt.reader()

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._reader.read(self.tensors[name], start, stop)

    def release(self, name: str, start: int, stop: int) -> None:
        self._reader.release(self.tensors[name], start, stop)

    def close(self) -> None:
        self._reader.close()


class RenamedSource:
    """A source read under other names: a range of a checkpoint's layers renumbered into a stacked
    output (``names``: output tensor name → the checkpoint's)."""

    def __init__(self, source: Source, names: Mapping[str, str]) -> None:
        self._source = source
        self._names = names

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._source.read(self._names[name], start, stop)

    def release(self, name: str, start: int, stop: int) -> None:
        self._source.release(self._names[name], start, stop)

    def close(self) -> None:
        self._source.close()


def memory_metas(state: Mapping[str, Any], label: str, device: str = "cpu") -> dict[str, TensorMeta]:
    """Header-like facts of an in-memory state dict, with the same validation a file gets.  Tensors
    must be on the CPU, or on ``device`` (a run on the GPU reads those in place)."""
    metas = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TvInputError(
                f"`{label}`: entry `{name}` is a {type(tensor).__name__}, not a tensor", code="E307"
            )
        if tensor.dtype not in DTYPE_CODES:
            raise TvInputError(
                f"`{label}`: tensor `{name}` has unsupported dtype {tensor.dtype}", code="E307"
            )
        if tensor.device.type not in ("cpu", device):
            where = (
                "the CPU backend reads CPU tensors"
                if device == "cpu"
                else f"this run uses {device} and the CPU"
            )
            raise TvInputError(
                f"`{label}`: tensor `{name}` is on {tensor.device}; {where}",
                help="move the state dict to the CPU first (`{k: v.cpu() for k, v in sd.items()}`)",
                code="E307",
            )
        metas[str(name)] = TensorMeta(DTYPE_CODES[tensor.dtype], tuple(tensor.shape))
    return metas


class MemorySource:
    """Chunk views of in-memory tensors: slices of each tensor's flat view, no copies
    (a non-contiguous tensor is made contiguous once, when first read)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state
        self._flat: dict[str, torch.Tensor] = {}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        flat = self._flat.get(name)
        if flat is None:
            flat = self._state[name].detach().contiguous().reshape(-1)
            self._flat[name] = flat
        return flat[start:stop]

    def release(self, name: str, start: int, stop: int) -> None:
        if stop >= self._state[name].numel():
            self._flat.pop(name, None)

    def close(self) -> None:
        self._flat.clear()


class MemorySink:
    """Collects an output as a state dict of new tensors."""

    def __init__(self, tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> None:
        self.result: dict[str, torch.Tensor] = {
            name: torch.empty(shape, dtype=DTYPES[dtype]) for name, dtype, shape in tensors
        }
        self._flat = {name: t.view(-1) for name, t in self.result.items()}

    def write(self, name: str, start: int, chunk: torch.Tensor) -> None:
        self._flat[name][start : start + chunk.numel()].copy_(chunk)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        self.result.clear()
