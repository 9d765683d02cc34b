"""Vocabulary surgery: embedding and LM-head rows matched by token string, not by index.

A program with a ``vocab`` statement (docs/language.md#vocabularies) reads every model's
``tokenizer.json``, builds the output vocabulary (one model's, or the union of all of them), and
re-indexes each model's vocabulary tensors (``embed_tokens``, ``lm_head``, ...) into it before the
merge, as mergekit's ``tokenizer_source``/``tokenizer`` do.  Row ``j`` of a model's re-indexed
tensor is the model's own row for output token ``j`` when it has that token; otherwise a default
shared by every model that lacks it (mergekit's rules, in order):

1. a ``token`` statement: a named model's row for it (or for another token, or a row id), or zero;
2. the ``base=`` model's row, when it has the token;
3. the row of the one model that has it;
4. the mean of the rows of the models that have it (float64, rounded once to the receiving dtype);
5. zero, when no model has it.

``pad_to=N`` rounds the row count up to a multiple of N; the padding rows are the mean of the
model's re-indexed rows (a reduction pass over that tensor, done once).

Nothing is copied whole: :class:`VocabSource` gathers, for each chunk, only the rows it covers,
in runs of consecutive rows read straight from each model's memory map.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tvlang.chunks import Chunk, to_torch
from tvlang.dtypes import TensorMeta, torch_dtype
from tvlang.errors import TvInputError
from tvlang.io.checkpoint import Checkpoint, CheckpointReader
from tvlang.io.endpoints import Source
from tvlang.io.safetensors import TensorInfo
from tvlang.ir.node import InputRef, Origin
from tvlang.ir.vocab import TokenRule, VocabSpec
from tvlang.ops import work_buffer

if TYPE_CHECKING:
    import torch

# Tensors whose rows are indexed by token id: input embeddings and output heads, by name suffix.
VOCAB_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
# Files that describe a tokenizer: the template's are replaced by the output vocabulary's.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)
# Files copied from the vocabulary's model next to the new tokenizer.json, when it has them.
_KEPT = ("tokenizer_config.json", "special_tokens_map.json")

ZERO, MEAN, PAD = -1, -2, -3  # row sources besides a model's own row (src_model ≥ 0)
FEW_RUNS = 8  # a chunk's rows from one model in fewer runs than this are copied from its memory map


def is_vocab_tensor(name: str, shape: Sequence[int]) -> bool:
    """A tensor indexed by token id (2-D, named like an embedding or an output head)."""
    return len(shape) == 2 and (name == "output.weight" or name.endswith(VOCAB_SUFFIXES))


@dataclass
class _Model:
    ref: InputRef
    ckpt: Checkpoint
    path: str  # its tokenizer.json
    vocab: dict[str, int]  # token → id, every token (added ones included)
    added: dict[int, Any]  # id → the tokenizers library's AddedToken
    rows: int  # ids below this have rows (config.json's vocab_size, and every vocab tensor's rows)

    def has(self, token: str) -> int:
        i = self.vocab.get(token, -1)
        return i if 0 <= i < self.rows else -1


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - the `vocab` extra
        raise TvInputError(
            "matching rows by token needs the `tokenizers` library",
            help="pip install 'tvlang[vocab]'",
            code="E310",
        ) from None
    return tokenizers


def _read_json(path: str, what: str, ref: InputRef) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise TvInputError(
            f"`{ref.label}` has no {os.path.basename(path)}: its rows cannot be matched by token",
            ref.span,
            label=ref.path,
            help=f"a `vocab` program needs each model's {what}",
            code="E310",
        ) from None
    except (OSError, ValueError) as e:
        raise TvInputError(f"{path}: not a valid {what} ({e})", ref.span, code="E310") from None
    if not isinstance(doc, dict):
        raise TvInputError(f"{path}: not a valid {what} (not an object)", ref.span, code="E310")
    return doc


def _open_model(ref: InputRef, ckpt: Checkpoint) -> _Model:
    if not ckpt.is_dir:
        raise TvInputError(
            f"`{ref.label}` is a single .safetensors file, with no tokenizer: its rows cannot be matched by token",
            ref.span,
            help="give the model's Hugging Face directory (with tokenizer.json)",
            code="E310",
        )
    path = os.path.join(ckpt.path, "tokenizer.json")
    if not os.path.isfile(path):
        _read_json(path, "tokenizer.json", ref)  # the error that says what is missing
    try:
        tok = _tokenizers().Tokenizer.from_file(path)
    except Exception as e:  # the library's own error types
        raise TvInputError(
            f"{path}: the tokenizers library cannot read it ({e})", ref.span, code="E310"
        ) from None
    vocab = {str(t): int(i) for t, i in tok.get_vocab(with_added_tokens=True).items()}
    config = os.path.join(ckpt.path, "config.json")
    rows = max(vocab.values(), default=-1) + 1
    if os.path.isfile(config):
        size = _read_json(config, "config.json", ref).get("vocab_size")
        if isinstance(size, int) and size > 0:
            rows = size
    for name, info in ckpt.tensors.items():
        if is_vocab_tensor(name, info.shape):
            rows = min(rows, info.shape[0])
    return _Model(ref, ckpt, path, vocab, dict(tok.get_added_tokens_decoder()), rows)


def _strip(doc: dict[str, Any], rows: int) -> dict[str, Any]:
    """``doc`` without the tokens whose id has no row (mergekit strips the base tokenizer so)."""
    doc = json.loads(json.dumps(doc))
    doc["added_tokens"] = [a for a in doc.get("added_tokens") or [] if int(a.get("id", 0)) < rows]
    model = doc.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        gone = {t for t, i in vocab.items() if int(i) >= rows}
        model["vocab"] = {t: i for t, i in vocab.items() if t not in gone}
        merges = model.get("merges")
        if gone and isinstance(merges, list):
            model["merges"] = [
                m for m in merges if not any(p in gone for p in (m.split(" ") if isinstance(m, str) else m))
            ]
    elif isinstance(vocab, list):  # Unigram: ids are positions
        model["vocab"] = vocab[:rows]
    return doc


class VocabPlan:
    """The output vocabulary and, for each model, where each of its re-indexed rows comes from."""

    def __init__(
        self,
        spec: VocabSpec,
        refs: Sequence[InputRef],
        check: Callable[[InputRef, Checkpoint], None] | None = None,
    ) -> None:
        """``refs``: the models the program reads; ``check`` vets each checkpoint before any of its
        files is read (the allowed roots)."""
        self.spec = spec
        order: dict[str, InputRef] = {}
        for ref in [*([spec.base] if spec.base else []), *(r for r in refs if r.kind.is_model)]:
            order.setdefault(ref.key, ref)  # stored task vectors and adapters are not re-indexed (metas)
        for rule in spec.tokens:
            if rule.model is not None:
                order.setdefault(rule.model.key, rule.model)
        # models whose rows can stand in for a model that lacks a token (mergekit's merged models);
        # a vocabulary's model that is not merged gives its tokenizer only
        self.donors = len(order)
        if spec.source is not None:
            order.setdefault(spec.source.key, spec.source)
        self.models: list[_Model] = []
        self.index: dict[str, int] = {}
        for key, ref in order.items():
            if ref.origin is not Origin.CHECKPOINT or not ref.kind.is_model:
                raise TvInputError(
                    f"`{ref.label}` is not a checkpoint directory with a tokenizer: rows cannot be matched by token",
                    ref.span,
                    help="with `vocab`, every input is a model's Hugging Face directory",
                    code="E310",
                )
            ckpt = Checkpoint.open(key)
            if check is not None:
                check(ref, ckpt)
            self.index[key] = len(self.models)
            self.models.append(_open_model(ref, ckpt))
        self._build_tokenizer()
        self._build_rows()
        self._readers: dict[int, CheckpointReader] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pad_means: dict[tuple[int, str], torch.Tensor] = {}

    # -- the output vocabulary --------------------------------------------------------------------
    def _build_tokenizer(self) -> None:
        spec, tk = self.spec, _tokenizers()
        # the union grows the base's tokenizer (the first model when there is no base)
        first = self.models[self.index[spec.source.key]] if spec.source else self.models[0]
        self.vocab_model = first
        if max(first.vocab.values(), default=-1) < first.rows:
            tok = tk.Tokenizer.from_file(first.path)
        else:  # a padded tokenizer: without the tokens past its model's rows
            tok = tk.Tokenizer.from_str(
                json.dumps(_strip(_read_json(first.path, "tokenizer.json", first.ref), first.rows))
            )
        known = set(tok.get_vocab(with_added_tokens=True))
        if spec.source is None:  # the union: every model's tokens (base's first), then added tokens
            new: list[Any] = []
            for m in self.models:
                added = {a.content for a in m.added.values()}
                for t in sorted(m.vocab, key=m.vocab.__getitem__):
                    if t not in known and t not in added and m.has(t) >= 0:
                        known.add(t)
                        new.append(tk.AddedToken(t, special=False, normalized=True))
            tok.add_tokens(new)
            for m in self.models:
                for i, a in sorted(m.added.items()):
                    if a.content in known or i >= m.rows:
                        continue
                    known.add(a.content)
                    (tok.add_special_tokens if a.special else tok.add_tokens)([a])
        extra = [r.token for r in spec.tokens if r.token not in known]
        if extra:  # a `token` statement for a token the vocabulary lacks adds it (as mergekit does)
            tok.add_tokens([tk.AddedToken(t, special=False, normalized=True) for t in dict.fromkeys(extra)])
        # one model's vocabulary as it is: its tokenizer files are carried over unchanged
        self.unchanged = spec.source is not None and not extra and len(first.vocab) == len(known)
        self.tokenizer_json = tok.to_str()
        self.added_tokens = {
            str(i): {
                "content": a.content,
                "single_word": a.single_word,
                "lstrip": a.lstrip,
                "rstrip": a.rstrip,
                "normalized": a.normalized,
                "special": a.special,
            }
            for i, a in sorted(tok.get_added_tokens_decoder().items())
        }
        self.vocab: dict[str, int] = {
            str(t): int(i) for t, i in tok.get_vocab(with_added_tokens=True).items()
        }
        self.tokens = max(self.vocab.values(), default=-1) + 1
        pad = spec.pad_to or 1
        self.rows = -(-self.tokens // pad) * pad

    # -- where each row comes from ----------------------------------------------------------------
    def _build_rows(self) -> None:
        n, spec = self.rows, self.spec
        by_token = {r.token: r for r in spec.tokens}
        # have[k][j]: model k's row of output token j, or -1
        have = np.full((len(self.models), n), -1, dtype=np.int64)
        for k, m in enumerate(self.models):
            pairs = [
                (j, i) for t, i in m.vocab.items() if i < m.rows and (j := self.vocab.get(t)) is not None
            ]
            if pairs:
                js, ids = np.array(pairs, dtype=np.int64).T
                have[k, js] = ids
        # the default each token's rows take in a model that lacks it (or for every model, forced):
        # the one model that has it, else the base's row, else the mean of those that have it, else 0
        donors = have[: self.donors] >= 0
        count = donors.sum(axis=0)
        first = donors.argmax(axis=0)
        d_model = np.where(count >= 1, first, ZERO)
        d_row = np.where(count >= 1, have[first, np.arange(n)], 0)
        several = count >= 2
        if spec.base is not None:
            base = self.index[spec.base.key]
            on_base = several & donors[base]
            d_model[on_base], d_row[on_base] = base, have[base, on_base]
            several &= ~donors[base]
        d_model[several] = MEAN
        self.means: dict[int, tuple[tuple[int, int], ...]] = {
            j: tuple((k, int(have[k, j])) for k in np.flatnonzero(donors[:, j]).tolist())
            for j in np.flatnonzero(several).tolist()
        }
        forced = np.zeros(n, dtype=bool)
        for t, rule in by_token.items():
            j = self.vocab[t]
            d_model[j], d_row[j] = self._rule_row(rule)
            self.means.pop(j, None)
            forced[j] = rule.force
        d_model[self.tokens :] = PAD
        self.src_model: list[np.ndarray] = []
        self.src_row: list[np.ndarray] = []
        for k in range(len(self.models)):
            own = (have[k] >= 0) & ~forced
            self.src_model.append(np.where(own, k, d_model))
            self.src_row.append(np.where(own, have[k], d_row))

    def _rule_row(self, rule: TokenRule) -> tuple[int, int]:
        if rule.model is None:
            return ZERO, 0
        k = self.index[rule.model.key]
        m = self.models[k]
        if isinstance(rule.index, int):
            row, what = rule.index, f"row {rule.index}"
        else:
            name = rule.token if rule.index is None else rule.index
            row, what = m.vocab.get(name, -1), f"token {name!r}"
        if not 0 <= row < m.rows:
            raise TvInputError(
                f"`{m.ref.label}` has no {what}"
                + (f" (it has {m.rows} rows)" if isinstance(rule.index, int) else ""),
                rule.span,
                label="its row is asked for here",
                code="E311",
            )
        return k, row

    # -- what the planner and the runtime see ----------------------------------------------------
    def metas(self, ref: InputRef, metas: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
        """An input's tensors as re-indexed: vocabulary tensors get the output's rows."""
        out = dict(metas)
        if ref.key not in self.index:
            if any(is_vocab_tensor(n, m.shape) for n, m in metas.items()):
                raise TvInputError(
                    f"`{ref.label}` holds embedding rows but is not a model with a tokenizer",
                    ref.span,
                    help="with `vocab`, stored task vectors and adapters cannot change embeddings",
                    code="E310",
                )
            return out
        for name, meta in metas.items():
            if is_vocab_tensor(name, meta.shape):
                out[name] = TensorMeta(meta.dtype, (self.rows, *meta.shape[1:]))
        return out

    def source(self, ref: InputRef, inner: Source) -> Source:
        k = self.index.get(ref.key)
        return inner if k is None else VocabSource(self, k, inner)

    def reader(self, k: int) -> CheckpointReader:
        reader = self._readers.get(k)
        if reader is None:
            with self._lock:
                reader = self._readers.get(k)
                if reader is None:
                    reader = self._readers[k] = self.models[k].ckpt.reader()
        return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def gather(self, k: int, name: str, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows ``r0:r1`` of model ``k``'s re-indexed ``name`` into ``out`` (rows × cols, its dtype)."""
        import torch

        models, rows = self.src_model[k][r0:r1], self.src_row[k][r0:r1]
        for src in np.unique(models).tolist():
            pos = np.flatnonzero(models == src)
            if src >= 0:
                self._take_rows(src, name, pos, rows[pos], out)
            elif src == ZERO:
                out.index_fill_(0, torch.from_numpy(pos), 0)
            elif src == MEAN:
                for j in pos.tolist():
                    acc = torch.zeros(out.shape[1], dtype=torch.float64)
                    for m, r in self.means[r0 + j]:
                        acc += self._rows(m, name, r, r + 1)[0]
                    out[j].copy_(acc / len(self.means[r0 + j]))
            else:
                out[int(pos[0]) :].copy_(self.pad_mean(k, name, out.dtype).expand(len(pos), -1))

    def _take_rows(self, k: int, name: str, pos: np.ndarray, src: np.ndarray, out: torch.Tensor) -> None:
        """``out[pos] = model k's rows src``, run by run (a run: consecutive rows to consecutive rows).
        A few long runs are copied from the memory map.  Many short ones (a shuffled vocabulary) are
        ``pread`` from the file: faulting scattered rows into a mapping would map far more than the
        rows (the kernel maps whole folios around each fault: ~2 MiB per row measured here)."""
        brk = np.flatnonzero((np.diff(pos) != 1) | (np.diff(src) != 1)) + 1
        bounds = itertools.pairwise([0, *brk.tolist(), len(pos)])
        copy = self._copy_rows if len(brk) < FEW_RUNS else self._pread_rows
        for a, b in bounds:
            p0, s0 = int(pos[a]), int(src[a])
            copy(k, name, s0, s0 + b - a, out[p0 : p0 + b - a])

    def _pread_rows(self, k: int, name: str, a: int, b: int, out: torch.Tensor) -> None:
        import torch

        info = self._info(k, name)
        dtype = torch_dtype(info.dtype)
        row_bytes = info.shape[1] * dtype.itemsize
        target = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
        buf = target.view(torch.uint8).numpy().data
        offset, want = info.offset + a * row_bytes, (b - a) * row_bytes
        got = os.preadv(self._fd(info.path), [buf], offset)
        if got != want:
            raise TvInputError(f"{info.path}: short read of `{name}` (file changed?)", code="E301")
        if target is not out:
            out.copy_(target)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def _rows(self, k: int, name: str, a: int, b: int) -> torch.Tensor:
        import torch

        out = torch.empty((b - a, self._info(k, name).shape[1]), dtype=torch.float64)
        self._copy_rows(k, name, a, b, out)
        return out

    def _copy_rows(self, k: int, name: str, a: int, b: int, out: torch.Tensor) -> None:
        info = self._info(k, name)
        cols = info.shape[1]
        reader = self.reader(k)
        out.copy_(to_torch(reader.read(info, a * cols, b * cols), info.dtype).view(b - a, cols))
        self._release(reader, info, a, b)

    @staticmethod
    def _release(reader: CheckpointReader, info: TensorInfo, a: int, b: int) -> None:
        """Drop the pages rows ``a:b`` touched, those shared with other rows too: rows are gathered
        out of order, so a page kept "for a neighbour" would stay mapped (a later read refaults it)."""
        cols = info.shape[1]
        size = torch_dtype(info.dtype).itemsize
        lo = (info.offset + a * cols * size) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = -(-(info.offset + b * cols * size) // mmap.PAGESIZE) * mmap.PAGESIZE
        reader.release(
            info, max(0, (lo - info.offset) // size), min(info.numel, -(-(hi - info.offset) // size))
        )

    def _info(self, k: int, name: str) -> TensorInfo:
        info = self.models[k].ckpt.tensors.get(name)
        if info is None:
            raise TvInputError(
                f"`{self.models[k].ref.label}` has no tensor `{name}` to take rows from",
                self.models[k].ref.span,
                code="E303",
            )
        return info

    def pad_mean(self, k: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The mean of model ``k``'s re-indexed token rows of ``name``: a reduction pass over them,
        in float64 and blocks of rows, rounded once to ``dtype``."""
        import torch

        key = (k, name)
        mean = self._pad_means.get(key)
        if mean is None:
            cols = self.models[k].ckpt.tensors[name].shape[1]
            acc = torch.zeros(cols, dtype=torch.float64)
            step = max(1, (1 << 18) // max(1, cols))
            block = torch.empty((step, cols), dtype=dtype)
            for r in range(0, self.tokens, step):
                e = min(self.tokens, r + step)
                self.gather(k, name, r, e, block[: e - r])
                acc += block[: e - r].to(torch.float64).sum(dim=0)
            mean = (acc / self.tokens).to(dtype)
            self._pad_means[key] = mean
        return mean

    # -- the output's files -----------------------------------------------------------------------
    def sidecars(self, template: Sequence[str], directory: str) -> list[str]:
        """The template's side files with its tokenizer replaced by the output vocabulary's
        (written into ``directory``) and config.json's ``vocab_size`` set to the output's rows."""
        out = [p for p in template if os.path.basename(p) not in (*TOKENIZER_FILES, "config.json")]
        source_dir = self.vocab_model.ckpt.path
        if self.unchanged:
            out += [
                os.path.join(source_dir, n)
                for n in TOKENIZER_FILES
                if os.path.isfile(os.path.join(source_dir, n))
            ]
        else:
            path = os.path.join(directory, "tokenizer.json")
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.tokenizer_json)
            out.append(path)
        for name in () if self.unchanged else _KEPT:
            src = os.path.join(source_dir, name)
            if not os.path.isfile(src):
                continue
            doc = _read_json(src, name, self.vocab_model.ref)
            if name == "tokenizer_config.json":  # transformers reads the added tokens from here too
                doc["added_tokens_decoder"] = self.added_tokens
            dst = os.path.join(directory, name)
            with open(dst, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, ensure_ascii=False)
            out.append(dst)
        config = next((p for p in template if os.path.basename(p) == "config.json"), None)
        if config is not None:
            doc = _read_json(config, "config.json", self.vocab_model.ref)
            doc["vocab_size"] = self.rows
            dst = os.path.join(directory, "config.json")
            with open(dst, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
            out.append(dst)
        return sorted(out, key=os.path.basename)

    def describe(self) -> str:
        """``tvlang plan``'s line: the output vocabulary and the rows every vocabulary tensor gets."""
        was = self.vocab_model.rows
        return (
            f"vocab: {self.spec.describe}: {len(self.vocab):,} tokens, {self.rows:,} rows"
            + (f" (`{self.vocab_model.ref.label}` has {was:,})" if was != self.rows else "")
            + f", embeddings and heads re-indexed by token in {len(self.models)} model(s)"
        )


class VocabSource:
    """An input whose vocabulary tensors are re-indexed into the output vocabulary, a chunk's rows
    at a time (into a reused per-thread buffer); every other tensor is read from ``inner``."""

    def __init__(self, plan: VocabPlan, k: int, inner: Source) -> None:
        import torch  # noqa: F401  (rows are gathered with it: loaded before the run, which gives it one thread)

        self.plan, self.k, self.inner = plan, k, inner
        self.tensors = plan.models[k].ckpt.tensors

    def _vocab(self, name: str) -> bool:
        info = self.tensors.get(name)
        return info is not None and is_vocab_tensor(name, info.shape)

    def read(self, name: str, start: int, stop: int) -> Chunk:
        if not self._vocab(name):
            return self.inner.read(name, start, stop)
        info = self.tensors[name]
        cols = info.shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        block = work_buffer(f"vocab-{id(self)}", torch_dtype(info.dtype), (r1 - r0) * cols).view(
            r1 - r0, cols
        )
        self.plan.gather(self.k, name, r0, r1, block)
        return block.view(-1)[start - r0 * cols : stop - r0 * cols]

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        if not self._vocab(name):
            self.inner.release(name, start, stop, before=before, after=after)

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> Chunk | None:
        return None if self._vocab(name) else self.inner.gather(name, positions, run)

    def close(self) -> None:
        self.inner.close()


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """Where the output's generated tokenizer files wait until the writer copies them."""
    return tempfile.TemporaryDirectory(prefix="tvlang-vocab-")


__all__ = ["VOCAB_SUFFIXES", "TokenRule", "VocabPlan", "VocabSource", "VocabSpec", "is_vocab_tensor"]
