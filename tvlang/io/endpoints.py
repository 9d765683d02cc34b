"""Where a plan's chunks come from and go to: checkpoints on disk or state dicts in memory.

A *source* hands out chunk views of named tensors (``read``) and is told when a
chunk is done (``release``); where it is cheap, it also gathers scattered elements
of a tensor (``gather``: the sample a k-th largest value is bracketed with).  A
*sink* takes output chunks at their element offsets (``write``) and is committed
or aborted as a whole.  The runtime sees only these two shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tvlang.chunks import Chunk, is_torch, numel, to_torch
from tvlang.dtypes import FLOATS, ITEMSIZE, TensorMeta, code_of, torch_dtype
from tvlang.errors import TvInputError, TvOutputError
from tvlang.io.checkpoint import Checkpoint, CheckpointReader
from tvlang.io.safetensors import TensorInfo
from tvlang.source import Span

if TYPE_CHECKING:
    import torch


class Source(Protocol):
    """Files give numpy chunks of the storage dtype, memory gives torch tensors (:mod:`tvlang.chunks`)."""

    def read(self, name: str, start: int, stop: int) -> Chunk: ...
    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        """Drop elements ``[start, stop)`` from memory; ``before``/``after``: also the block this
        range shares with the range before/after it (:meth:`tvlang.io.ChunkReader.release`)."""
        ...

    def close(self) -> None: ...

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        """The elements at ``positions`` (ascending) of a tensor, or None where reading them costs
        about as much as reading the whole tensor (a computed input).  ``run``: the positions come
        in runs of that many neighbours, each starting at a multiple of ``run``
        (:func:`tvlang.backends.reductions.sample_positions`); a source may use it or not."""
        ...


class Sink(Protocol):
    def write(self, name: str, start: int, chunk: Chunk) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@contextlib.contextmanager
def all_or_none(sinks: Sequence[Sink]) -> Iterator[None]:
    """Commit every sink of ``sinks`` (a list the body may still append to) once the body is done,
    or abort every one if anything raises, Ctrl-C included: outputs appear together or not at all."""
    try:
        yield
        for sink in sinks:
            sink.commit()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def checkpoint_metas(ckpt: Checkpoint) -> dict[str, TensorMeta]:
    return {name: TensorMeta(info.dtype, tuple(info.shape)) for name, info in ckpt.tensors.items()}


KEEP_GATHERED = (
    4 << 20
)  # bytes: a smaller tensor's pages stay mapped after a gather; a larger one's go by windows


class CheckpointSource:
    """Chunk views of a checkpoint's tensors through memory maps (see :class:`tvlang.io.ChunkReader`)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.tensors: Mapping[str, TensorInfo] = ckpt.tensors
        self._reader: CheckpointReader = ckpt.reader()

    def read(self, name: str, start: int, stop: int) -> Chunk:
        return self._reader.read(self.tensors[name], start, stop)

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        self._reader.release(self.tensors[name], start, stop, before=before, after=after)

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        """From the mapping.  A small tensor's pages stay mapped for the pass that follows; a large
        one is gathered a window at a time, each window's pages dropped again (its passes fault them
        back in chunk by chunk), so memory stays flat.  Runs of ``run`` elements are taken as one
        item each (numpy's take then indexes a quarter as much for runs of four: the samples of the
        1 GiB TIES's inputs in 0.14 CPU-s against 0.21, benchmarks/sample_gather.py)."""
        info = self.tensors[name]
        size = ITEMSIZE[info.dtype]
        if run > 1 and positions.size % run:
            run = 1  # (not whole runs: a tensor sampled whole)
        index = positions[::run] // run if run > 1 else positions  # (runs start at multiples of run)
        item = np.dtype(f"V{run * size}")
        small = info.nbytes <= KEEP_GATHERED
        window = max(1, info.numel) if small else max(run, KEEP_GATHERED // size // run * run)
        parts = []
        for start in range(0, info.numel, window):
            stop = min(info.numel, start + window)
            end = start + (stop - start) // run * run  # (every run lies inside [start, end))
            lo, hi = np.searchsorted(index, (start // run, end // run))
            if hi > lo:
                chunk = self._reader.read(info, start, end)
                parts.append(np.take(chunk.view(item), index[lo:hi] - start // run).view(chunk.dtype))
                if not small:
                    self._reader.release(info, start, stop)
        if not parts:  # (no positions)
            return self._reader.read(info, 0, 0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        self._reader.close()


class RenamedSource:
    """A source read under other names: a range of a checkpoint's layers renumbered into a stacked
    output (``names``: output tensor name → the checkpoint's)."""

    def __init__(self, source: Source, names: Mapping[str, str]) -> None:
        self._source = source
        self._names = names

    def read(self, name: str, start: int, stop: int) -> Chunk:
        return self._source.read(self._names[name], start, stop)

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        self._source.release(self._names[name], start, stop, before=before, after=after)

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        return self._source.gather(self._names[name], positions, run)

    def close(self) -> None:
        self._source.close()


def memory_metas(state: Mapping[str, Any], label: str, device: str = "cpu") -> dict[str, TensorMeta]:
    """Header-like facts of an in-memory state dict, with the same validation a file gets.  Tensors
    must be on the CPU, or on ``device`` (a run on the GPU reads those in place)."""
    metas = {}
    for name, tensor in state.items():
        if not is_torch(tensor):
            raise TvInputError(
                f"`{label}`: entry `{name}` is a {type(tensor).__name__}, not a tensor", code="E307"
            )
        code = code_of(tensor.dtype)
        if code is None:
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
        metas[str(name)] = TensorMeta(code, tuple(tensor.shape))
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

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        if stop >= self._state[name].numel():
            self._flat.pop(name, None)

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        import torch

        flat = self._state[name].detach().reshape(-1)
        return flat[torch.from_numpy(positions.copy()).to(flat.device)]  # (positions may be read-only)

    def close(self) -> None:
        self._flat.clear()


class MemorySink:
    """Collects an output as a state dict of new tensors."""

    def __init__(self, tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> None:
        import torch

        self.result: dict[str, torch.Tensor] = {
            name: torch.empty(shape, dtype=torch_dtype(dtype)) for name, dtype, shape in tensors
        }
        self._flat = {name: t.view(-1) for name, t in self.result.items()}
        self._codes = {name: dtype for name, dtype, _ in tensors}

    def write(self, name: str, start: int, chunk: Chunk) -> None:
        self._flat[name][start : start + numel(chunk)].copy_(to_torch(chunk, self._codes[name]))

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        self.result.clear()


def into_tensors(into: Any) -> dict[str, torch.Tensor]:
    """The tensors a run writes into: an ``nn.Module``'s state dict (detached views of its own
    parameters and buffers, so writing them changes the module) or a mapping of preallocated tensors."""
    module = None
    if hasattr(into, "state_dict") and callable(into.state_dict):
        module, into = into, into.state_dict()
    if not isinstance(into, Mapping):
        raise TvOutputError(
            f"cannot merge into a {type(into).__name__}",
            help="give an nn.Module or a state dict of preallocated tensors",
            code="E510",
        )
    found = {}
    for name, tensor in into.items():
        if not is_torch(tensor):
            raise TvOutputError(f"entry `{name}` to merge into is a {type(tensor).__name__}", code="E510")
        found[str(name)] = tensor.detach()
    if module is not None and hasattr(module, "parameters") and hasattr(module, "buffers"):
        own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        copies = [k for k, t in found.items() if t.untyped_storage().data_ptr() not in own]
        if copies:
            raise TvOutputError(
                f"the module's state_dict() gives a copy of `{copies[0]}`, not the tensor itself: "
                "writing it would not change the module",
                help="merge into a state dict of the module's own tensors (named_parameters, buffers)",
                code="E510",
            )
    return found


def into_dtypes(targets: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The output dtype of each float tensor: the target's own (a run rounds once, to it)."""
    codes = {name: code_of(t.dtype) for name, t in targets.items()}
    return {name: code for name, code in codes.items() if code in FLOATS}


def _storage(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))


def check_into(
    targets: Mapping[str, torch.Tensor],
    tensors: Sequence[tuple[str, str, tuple[int, ...]]],
    output: str,
    span: Span | None = None,
) -> None:
    """Every tensor of the output has a target of its shape and kind, and every target is written
    (or shares its storage with one that is: tied weights); checked before anything is written."""

    def fail(message: str, help: str | None = None) -> TvOutputError:
        return TvOutputError(
            message, span, label=f"output `{output}` is written into the model", help=help, code="E510"
        )

    written = set()
    for name, dtype, shape in tensors:
        target = targets.get(name)
        if target is None:
            near = [k for k in targets if k.endswith(name) or name.endswith(k)]
            raise fail(
                f"the model has no tensor `{name}` ({len(tensors)} tensors computed, {len(targets)} in the model)",
                help=f"did you mean `{near[0]}`? names are matched as a state dict's"
                if near
                else "names are matched as the model's state_dict() keys",
            )
        if tuple(target.shape) != tuple(shape):
            raise fail(
                f"tensor `{name}` is {list(shape)} in the output but {list(target.shape)} in the model"
            )
        code = code_of(target.dtype)
        if (code in FLOATS) != (dtype in FLOATS) or (dtype not in FLOATS and code != dtype):
            raise fail(f"tensor `{name}` is {dtype} in the output but {target.dtype} in the model")
        if target.device.type == "meta":
            raise fail(
                f"tensor `{name}` of the model has no storage (device meta)",
                help="materialise the model first, e.g. model.to_empty(device='cpu')",
            )
        if not target.is_contiguous():
            raise fail(
                f"tensor `{name}` of the model is not contiguous", help="call .contiguous() on it first"
            )
        written.add(_storage(target))
    names = {name for name, _, _ in tensors}
    extra = [k for k, t in targets.items() if k not in names and _storage(t) not in written]
    if extra:
        raise fail(
            f"the model has {len(extra)} tensor{'s' if len(extra) != 1 else ''} that the output lacks: "
            + ", ".join(f"`{k}`" for k in extra[:3])
            + (", ..." if len(extra) > 3 else ""),
            help="merge every tensor of the model, or give a state dict of just the tensors to write",
        )


class IntoSink:
    """Writes each output chunk straight into a target tensor, in place, on its device and in its
    dtype: the model being merged into is the output, and no other copy is made."""

    def __init__(self, targets: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        self._flat = {name: targets[name].view(-1) for name in names}
        self._codes = {name: code_of(t.dtype) or "" for name, t in self._flat.items()}

    def write(self, name: str, start: int, chunk: Chunk) -> None:
        self._flat[name][start : start + numel(chunk)].copy_(to_torch(chunk, self._codes[name]))

    def target(self, name: str) -> torch.Tensor:
        """The flat tensor that ``name`` is written into: a backend that computes on the target's
        device copies its chunks there itself, without a trip through the host."""
        return self._flat[name]

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass
