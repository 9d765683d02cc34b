"""Checkpoints: one ``.safetensors`` file or a Hugging Face model directory.

A directory holds either ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {tensor: shard}}``), next to
non-weight files (config, tokenizer, ...) that an output model must carry along.
Opening reads headers only; data is read in chunks through :class:`CheckpointReader`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from tvlang.chunks import Chunk
from tvlang.dtypes import DTYPES
from tvlang.errors import TvInputError, TvOutputError
from tvlang.io.safetensors import (
    MAX_HEADER_BYTES,
    ChunkReader,
    SafetensorsWriter,
    TensorInfo,
    Transaction,
    check_free_space,
    fsync_dir,
    is_pickle_path,
    parse_json_object,
    pickle_refusal,
    plan_tensors,
    read_header,
    remove_old,
    swap_into_place,
    temp_sibling,
)

__all__ = ["CONFIG_NAME", "INDEX_NAME", "SINGLE_NAME", "Checkpoint", "CheckpointReader", "CheckpointWriter"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")  # older and newer transformers

# Weight files of any framework: copying them next to new weights would let a loader
# pick up the *input's* weights, so they are never sidecars.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".npz",
    ".npy",
    ".index.json",
)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A model on disk, as its tensors' locations; only headers are read on open."""

    path: str
    is_dir: bool
    tensors: dict[str, TensorInfo]  # shards in name order, tensors in file order within each
    metadata: dict[str, str]  # of the first file
    files: list[str] = field(default_factory=list)  # the safetensors files, in order

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls._open_dir(path)
        if is_pickle_path(path):
            raise pickle_refusal(path)
        if not os.path.lexists(path):
            raise TvInputError(f"{path}: no such file or directory", code="E300")
        tensors, metadata = read_header(path)
        return cls(path, False, tensors, metadata, [path])

    @classmethod
    def _open_dir(cls, path: str) -> Checkpoint:
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            return cls._open_indexed(path, index)
        names = sorted(os.listdir(path))
        weights = [n for n in names if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n))]
        if SINGLE_NAME in weights:
            weights = [SINGLE_NAME]
        if len(weights) == 1:
            file = os.path.join(path, weights[0])
            tensors, metadata = read_header(file)
            return cls(path, True, tensors, metadata, [file])
        if len(weights) > 1:
            raise TvInputError(
                f"{path}: holds {len(weights)} .safetensors files ({', '.join(weights[:4])}"
                f"{', ...' if len(weights) > 4 else ''}) but no {INDEX_NAME} saying which tensor is where",
                help=f"pass one of the files, or add a {INDEX_NAME}",
                code="E301",
            )
        pickles = [n for n in names if is_pickle_path(n) or n.endswith(".bin.index.json")]
        if pickles:
            raise pickle_refusal(os.path.join(path, pickles[0]))
        raise TvInputError(f"{path}: directory holds no .safetensors file", code="E300")

    @classmethod
    def _open_indexed(cls, path: str, index: str) -> Checkpoint:
        weight_map = _read_weight_map(index)
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        files: list[str] = []
        for shard in sorted(by_shard):
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise TvInputError(f"{index}: lists shard {shard!r}, but {file} does not exist", code="E300")
            infos, meta = read_header(file)
            if not files:
                metadata = meta
            files.append(file)
            for name, info in infos.items():
                if name in tensors:
                    raise TvInputError(
                        f"{path}: tensor {name!r} is in both {tensors[name].path} and {file}", code="E301"
                    )
                if name not in by_shard[shard]:
                    where = f"lists it in {weight_map[name]!r}" if name in weight_map else "does not list it"
                    raise TvInputError(f"{file}: holds tensor {name!r}, but {index} {where}", code="E301")
                tensors[name] = info
            absent = by_shard[shard] - infos.keys()
            if absent:
                name = min(absent)
                raise TvInputError(
                    f"{index}: lists tensor {name!r} in {shard!r}, but that shard does not hold it",
                    code="E301",
                )
        return cls(path, True, tensors, metadata, files)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.files)

    def sidecar_files(self) -> list[str]:
        """The directory's non-weight files (config, tokenizer, chat template, README, ...).

        Every regular top-level file except weights of any format, weight indexes and
        hidden files (dot files include tvlang's own temporaries); ``[]`` for a file.
        """
        if not self.is_dir:
            return []
        out = []
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if name.startswith(".") or name.lower().endswith(_WEIGHT_SUFFIXES):
                continue
            if os.path.isfile(full):
                out.append(full)
        return out


def _copy_config(src: str, dst: str, dtype: str) -> None:
    """Copy a model's ``config.json``, saying the dtype the output's weights are in.  A file that
    is not a JSON object is copied as it is: it is the template's, and a loader reports it."""
    with open(src, "rb") as f:
        raw = f.read(MAX_HEADER_BYTES + 1)
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    keys = [k for k in _CONFIG_DTYPE_KEYS if isinstance(config, dict) and k in config]
    if not isinstance(config, dict) or not keys:
        shutil.copy2(src, dst)
        return
    name = DTYPES[dtype].torch
    for key in keys:
        config[key] = name
    with open(dst, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    shutil.copystat(src, dst)


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise TvInputError(f"{index}: cannot read: {e.strerror}", code="E300") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise TvInputError(f"{index}: larger than {MAX_HEADER_BYTES} bytes", code="E301")
    doc = parse_json_object(raw, index, "index")
    weight_map: Any = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TvInputError(f'{index}: "weight_map" is not an object of tensor names to files', code="E301")
    if not weight_map:
        raise TvInputError(f'{index}: "weight_map" lists no tensors', code="E301")
    for shard in set(weight_map.values()):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise TvInputError(f"{index}: shard {shard!r} is not a file name in the directory", code="E301")
    return weight_map


class CheckpointReader:
    """Chunk reads across shard files: one :class:`ChunkReader` per file, opened on first use."""

    def __init__(self, files: Iterable[str]) -> None:
        self._files = frozenset(files)
        self._readers: dict[str, ChunkReader] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _reader(self, path: str) -> ChunkReader:
        reader = self._readers.get(path)
        if reader is not None:
            return reader
        with self._lock:
            if self._closed:
                raise ValueError("checkpoint reader is closed")
            if path not in self._files:
                raise ValueError(f"{path} is not a file of this checkpoint")
            reader = self._readers.get(path)
            if reader is None:
                reader = self._readers[path] = ChunkReader(path)
            return reader

    def read(self, info: TensorInfo, start: int, stop: int) -> np.ndarray[Any, Any]:
        """See :meth:`ChunkReader.read`."""
        return self._reader(info.path).read(info, start, stop)

    def release(
        self, info: TensorInfo, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        """See :meth:`ChunkReader.release`; nothing to do for a file never read."""
        reader = self._readers.get(info.path)
        if reader is not None:
            reader.release(info, start, stop, before=before, after=after)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class CheckpointWriter(Transaction):
    """Writes one output checkpoint, atomically.

    A path ending in ``.safetensors`` is a single file; anything else an HF directory with
    ``model.safetensors``, or shards and an index when the tensors exceed
    ``max_shard_bytes`` (filled in the given order; a tensor larger than the limit gets a
    shard to itself), plus copies of `sidecars`. Everything goes to a hidden temporary
    sibling that :meth:`commit` renames into place; an existing `path` is an error unless
    `overwrite`, and even then it is replaced only at commit. Directory outputs get
    ``"format": "pt"`` in their metadata, which ``transformers`` requires.

    `config_dtype` (a safetensors dtype code such as ``"F32"``) is written into a copied
    ``config.json`` (its ``torch_dtype`` and ``dtype`` keys, where present), so that
    ``transformers`` loads the model in the dtype it was written in.

    `generated` are text files written into a directory output (its model card, ``README.md``); a
    sidecar of the same name is then not copied.

    `max_shard_bytes`, `sidecars`, `config_dtype` and `generated` mean nothing for a single file and
    are ignored.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tensors: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        *,
        max_shard_bytes: int = 5 * 2**30,
        sidecars: Sequence[str | os.PathLike[str]] = (),
        overwrite: bool = False,
        config_dtype: str | None = None,
        generated: Mapping[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        path = os.fspath(path)
        self.path = path.rstrip(os.sep) or os.sep
        self.is_dir = not self.path.endswith(".safetensors")
        self.overwrite = overwrite
        self._check_target()
        planned = plan_tensors(tensors)
        self.total_size = sum(t.nbytes for t in planned)
        self._state = "open"
        self._tmpdir: str | None = None
        self._writers: list[SafetensorsWriter] = []
        self._copied: list[str] = []
        self._route: dict[str, SafetensorsWriter] = {}
        self.weight_map: dict[str, str] = {}
        self._created_dirs: list[str] = []
        self._config_dtype = config_dtype
        self._make_parents()
        if not self.is_dir:
            try:
                writer = SafetensorsWriter(self.path, tensors, metadata)
            except BaseException:
                self.abort()
                raise
            self._writers.append(writer)
            self._route = dict.fromkeys((t.name for t in planned), writer)
            return

        try:
            check_free_space(os.path.dirname(self.path), self.total_size, self.path)
        except BaseException:
            self.abort()
            raise
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for t in planned:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((t.name, t.dtype, t.shape))
            size += t.nbytes
        n = len(shards)
        names = [SINGLE_NAME] if n == 1 else [_shard_name(i + 1, n) for i in range(n)]
        shard_metadata = {"format": "pt", **(metadata or {})}

        # The clean-up is armed before the directory exists: a signal (Ctrl-C, SIGTERM) right after
        # the mkdir must not leave it behind.
        tmpdir = temp_sibling(self.path)
        self._tmpdir = tmpdir
        self._finalizer = weakref.finalize(self, shutil.rmtree, tmpdir, ignore_errors=True)
        try:
            try:
                os.mkdir(tmpdir)
            except OSError as e:
                raise TvOutputError(f"{self.path}: cannot create: {e.strerror}", code="E500") from None
            files = dict(generated or {})
            sidecars = [s for s in sidecars if os.path.basename(os.fspath(s)) not in files]
            self._copy_sidecars(sidecars, reserved={*names, INDEX_NAME, *files})
            self._write_files(files)
            for name, shard in zip(names, shards, strict=True):
                writer = SafetensorsWriter(os.path.join(tmpdir, name), shard, shard_metadata)
                self._writers.append(writer)
                for tensor, _, _ in shard:
                    self._route[tensor] = writer
                    self.weight_map[tensor] = name
        except BaseException:
            self.abort()
            raise

    def _make_parents(self) -> None:
        """Create the missing directories above the output (removed again on abort)."""
        parent = os.path.dirname(self.path)
        missing = []
        while parent and not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        if not missing:
            return
        try:
            os.makedirs(missing[0], exist_ok=True)
        except OSError as e:
            raise TvOutputError(
                f"{self.path}: cannot create its directory {missing[0]}: {e.strerror}", code="E500"
            ) from None
        self._created_dirs = missing

    def _remove_created_parents(self) -> None:
        for directory in self._created_dirs:  # deepest first; stops at one another writer filled
            try:
                os.rmdir(directory)
            except OSError:
                break

    def _check_target(self) -> None:
        """Refuse early what commit would refuse: an existing path of the wrong kind."""
        if not os.path.lexists(self.path):
            return
        if not self.overwrite:
            raise TvOutputError(
                f"{self.path}: already exists",
                help="choose another output path or allow overwriting",
                code="E500",
            )
        if os.path.isdir(self.path) != self.is_dir:
            kind = "a directory" if os.path.isdir(self.path) else "a file"
            raise TvOutputError(
                f"{self.path}: exists and is {kind}; refusing to replace it with "
                f"{'a directory' if self.is_dir else 'a file'}",
                code="E500",
            )
        if self.is_dir and not os.path.islink(self.path):
            entries = os.listdir(self.path)
            if entries and not any(e.endswith(".safetensors") for e in entries):
                raise TvOutputError(
                    f"{self.path}: exists and holds no .safetensors file; refusing to replace a directory "
                    "that does not look like a model",
                    code="E500",
                )

    def _copy_sidecars(self, sidecars: Sequence[str | os.PathLike[str]], reserved: set[str]) -> None:
        assert self._tmpdir is not None
        for sidecar in sidecars:
            src = os.fspath(sidecar)
            name = os.path.basename(src)
            if name in reserved:
                raise ValueError(f"sidecar {src} would clash with an output file of that name")
            reserved.add(name)
            if not os.path.isfile(src):
                raise TvInputError(f"{src}: no such file (to copy into {self.path})", code="E300")
            dst = os.path.join(self._tmpdir, name)
            try:
                if name == CONFIG_NAME and self._config_dtype is not None:
                    _copy_config(src, dst, self._config_dtype)
                else:
                    shutil.copy2(src, dst)
                self._copied.append(dst)
            except OSError as e:
                raise TvOutputError(f"{self.path}: cannot copy {src}: {e.strerror}", code="E500") from None

    @property
    def files(self) -> tuple[SafetensorsWriter, ...]:
        """The weight files being written (one per shard), in order: a distributed run's workers
        write them through their temporary paths."""
        return tuple(self._writers)

    def _write_files(self, files: Mapping[str, str]) -> None:
        assert self._tmpdir is not None
        for name, text in files.items():
            if os.path.basename(name) != name or name.startswith("."):
                raise ValueError(f"generated file {name!r} is not a plain file name")
            dst = os.path.join(self._tmpdir, name)
            try:
                with open(dst, "w", encoding="utf-8") as f:
                    f.write(text)
                self._copied.append(dst)
            except OSError as e:
                raise TvOutputError(f"{self.path}: cannot write {name}: {e.strerror}", code="E500") from None

    def write(self, name: str, start: int, chunk: Chunk) -> None:
        """See :meth:`SafetensorsWriter.write`; thread-safe."""
        writer = self._route.get(name)
        if writer is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the plan")
        writer.write(name, start, chunk)

    def commit(self, durable: bool = False) -> None:
        """Finish every file and move the output into place (``durable``: fsync all of it)."""
        if self._state != "open":
            raise ValueError(f"{self.path}: writer is already {self._state}")
        try:
            self._check_target()
            if not self.is_dir:
                self._writers[0].commit(durable)
            else:
                for writer in self._writers:
                    writer.commit(durable)
                self._write_index(durable)
                self._install(durable)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"

    def _write_index(self, durable: bool) -> None:
        assert self._tmpdir is not None
        if len(self._writers) < 2:
            return
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        try:
            with open(os.path.join(self._tmpdir, INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise TvOutputError(f"{self.path}: cannot write the index: {e.strerror}", code="E500") from None

    def _install(self, durable: bool) -> None:
        """Rename the finished directory in; an old one is renamed away first, then deleted."""
        assert self._tmpdir is not None
        try:
            if durable:
                for copied in self._copied:
                    fd = os.open(copied, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(self._tmpdir)
            old = swap_into_place(self._tmpdir, self.path)
            if durable:
                fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            raise TvOutputError(
                f"{self.path}: cannot move the output into place: {e.strerror}", code="E500"
            ) from None
        self._finalizer.detach()
        remove_old(old)

    def abort(self) -> None:
        """Delete everything written so far; idempotent, and a no-op after commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        for writer in self._writers:
            writer.abort()
        if self._tmpdir is not None:
            self._finalizer()
        self._remove_created_parents()
