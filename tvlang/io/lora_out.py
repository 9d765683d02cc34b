"""Task vectors written as PEFT LoRA adapters: a truncated SVD per 2-D weight.

``tvlang run prog.tv -o adapter/ --as-lora 16`` computes each output as a task vector ``D``
(a model output ``M`` becomes ``M - base``) and hands it to :class:`LoraWriter` chunk by chunk:

- a 2-D ``X.weight`` of a linear layer is gathered into one float64 buffer (the only dense copy,
  one tensor at a time per worker) and factored as ``D ≈ B @ A`` with ``A = √S·Vᵀ`` (r × in) and
  ``B = U·√S`` (out × r), the rank-r truncated SVD with the scale split evenly, as mergekit's
  ``extract_lora`` does; ``lora_alpha = r``, so PEFT's scale is 1;
- the bias of such a layer goes into ``lora_B.bias`` (PEFT's ``lora_bias``), exactly;
- embeddings, the LM head, norms and other parameters are saved whole as PEFT ``modules_to_save``
  (``base + D``, rounded once), streamed chunk by chunk;
- anything else (integer buffers, parameters that are not ``weight``/``bias`` of a module) is
  skipped, with a note.

The SVD is exact (LAPACK, float64) for small matrices and randomized (Halko, Martinsson & Tropp
2011: a Gaussian sketch of r + 10 columns, two power iterations, float64) when r + 10 is under
half the smaller dimension: on a 2048 × 2048 float64 matrix it took 0.06 s against 4 s for the
full SVD, and a whole 93M-parameter model 1.7 s against 13.8 s (``benchmarks/RESULTS.md``).  It is exact whenever the true rank is at most r + 10 and otherwise within a small
factor of the optimal truncation error; the sketch is seeded by the tensor's name, so the result
does not depend on threads or runs.  Either way the error is measured, not assumed: each tensor's
relative Frobenius error ‖D − B̃Ã‖/‖D‖, with the factors as rounded to the stored dtype, goes into
the adapter's ``__metadata__`` (``tvlang.lora.errors``) and the run summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tvlang.chunks import Chunk, to_torch
from tvlang.dtypes import FLOATS, torch_dtype
from tvlang.errors import TvError, TvOutputError
from tvlang.io.card import CARD_NAME
from tvlang.io.endpoints import Source
from tvlang.io.lora import CONFIG, PREFIX, WEIGHTS
from tvlang.io.safetensors import (
    SafetensorsWriter,
    Transaction,
    fsync_dir,
    remove_old,
    swap_into_place,
    temp_sibling,
)

if TYPE_CHECKING:
    import torch

OVERSAMPLE = 10  # extra sketch columns of the randomized SVD
POWER_ITERATIONS = 2
ERRORS_KEY = "tvlang.lora.errors"
FACTOR_DTYPE = "F32"  # A and B, unless --dtype says otherwise (PEFT computes LoRA in float32 anyway)
# Model types whose linear layers are GPT-2's Conv1D: weights stored (in × out), PEFT's fan_in_fan_out
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})
_EMBEDDINGS = frozenset({"wte", "wpe", "lm_head", "shared", "embed_in", "embed_out"})
_INPUT_EMBEDDINGS = (".embed_tokens.weight", ".wte.weight", ".word_embeddings.weight", ".embed_in.weight")
TIED_HEAD = "lm_head.weight"
_BLOCK = 1 << 18  # elements per block when a module saved whole is formed


def is_embedding(module: str) -> bool:
    """Token/position embeddings and the LM head (by the module's own name): saved whole, as
    mergekit's ``extract_lora`` does by default (``--embed-lora`` off)."""
    leaf = module.rsplit(".", 1)[-1]
    return leaf in _EMBEDDINGS or "embed" in leaf


@dataclass(frozen=True)
class AdapterEntry:
    """What one tensor of the task vector becomes in the adapter."""

    tensor: str  # its name in the model
    role: str  # "lora" (A, B), "bias" (lora_B.bias), "full" (modules_to_save) or "skip"
    shape: tuple[int, ...]
    dtype: str = FACTOR_DTYPE  # of what is written
    rank: int = 0
    transposed: bool = False  # stored (in × out), GPT-2's Conv1D: B @ A is the transpose
    note: str = ""
    aliases: tuple[str, ...] = ()  # other tensors saved with the same values (a head tied to it)

    @property
    def module(self) -> str:
        return self.tensor.rsplit(".", 1)[0]

    @property
    def out_in(self) -> tuple[int, int]:
        rows, cols = self.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def planned(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The adapter tensors it writes, with PEFT's names."""
        key = PREFIX + self.module
        if self.role == "lora":
            out, inner = self.out_in
            return [
                (key + ".lora_A.weight", self.dtype, (self.rank, inner)),
                (key + ".lora_B.weight", self.dtype, (out, self.rank)),
            ]
        if self.role == "bias":
            return [(key + ".lora_B.bias", self.dtype, self.shape)]
        if self.role == "full":
            return [(PREFIX + t, self.dtype, self.shape) for t in (self.tensor, *self.aliases)]
        return []


@dataclass(frozen=True)
class AdapterLayout:
    """Every tensor's role, decided from names, shapes and the base's ``config.json`` alone."""

    rank: int
    entries: tuple[AdapterEntry, ...]
    fan_in_fan_out: bool
    task_type: str | None

    @classmethod
    def plan(
        cls,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]],
        rank: int,
        *,
        base_dtypes: Mapping[str, str],
        dtype: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> AdapterLayout:
        """``tensors``: the output's (name, dtype, shape); ``base_dtypes``: the base's dtype of
        each tensor (what a module saved whole is written in, unless ``dtype`` is given)."""
        model_type = str((config or {}).get("model_type", ""))
        conv1d = model_type in CONV1D_MODEL_TYPES
        archs = (config or {}).get("architectures") or []
        causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        task_type = "CAUSAL_LM" if causal else None
        factor = dtype or FACTOR_DTYPE
        lora_modules = {
            name[: -len(".weight")]
            for name, dt, shape in tensors
            if dt in FLOATS
            and name.endswith(".weight")
            and len(shape) == 2
            and "." in name
            and not is_embedding(name[: -len(".weight")])
        }
        entries = []
        for name, dt, shape in tensors:
            module, _, leaf = name.rpartition(".")
            if dt not in FLOATS:
                entries.append(AdapterEntry(name, "skip", shape, note="not a float tensor"))
            elif math.prod(shape) == 0:
                entries.append(AdapterEntry(name, "skip", shape, note="empty"))
            elif module in lora_modules and leaf == "weight":
                r = min(rank, *shape)
                entries.append(AdapterEntry(name, "lora", shape, factor, r, conv1d))
            elif module in lora_modules and leaf == "bias" and len(shape) == 1:
                entries.append(AdapterEntry(name, "bias", shape, factor))
            elif module and leaf in ("weight", "bias") and module not in lora_modules:
                if name not in base_dtypes:
                    entries.append(AdapterEntry(name, "skip", shape, note="the base model lacks it"))
                else:
                    entries.append(AdapterEntry(name, "full", shape, dtype or base_dtypes[name]))
            else:
                entries.append(
                    AdapterEntry(name, "skip", shape, note="PEFT saves whole modules, not this parameter")
                )
        names = {name for name, _, _ in tensors}
        if causal and (config or {}).get("tie_word_embeddings", True) and TIED_HEAD not in names:
            entries = [_tie_head(e) for e in entries]
        return cls(rank, tuple(entries), conv1d, task_type)

    def lora(self) -> list[AdapterEntry]:
        return [e for e in self.entries if e.role == "lora"]

    def planned(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [t for e in self.entries for t in e.planned()]

    def target_modules(self) -> list[str]:
        """Module suffixes (``q_proj``), as mergekit writes them, when every module of the model
        with such a suffix is factored; the full module names otherwise."""
        lora = {e.module for e in self.lora()}
        suffixes = {m.rsplit(".", 1)[-1] for m in lora}
        others = {e.module for e in self.entries if e.module not in lora}
        if any(m.rsplit(".", 1)[-1] in suffixes for m in others):
            return sorted(lora)
        return sorted(suffixes)

    def adapter_config(self, base_model: str | None) -> dict[str, Any]:
        """``adapter_config.json``: PEFT LoRA with scale 1 everywhere (``lora_alpha = r``)."""
        ranks = [e.rank for e in self.lora()]
        r = max(ranks, default=self.rank)
        pattern = {e.module: e.rank for e in self.lora() if e.rank != r}
        saved = sorted(
            {m.rsplit(".", 1)[0] for e in self.entries if e.role == "full" for m in (e.tensor, *e.aliases)}
        )
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": self.target_modules(),
            "modules_to_save": saved or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": any(e.role == "bias" for e in self.entries),
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }


def _tie_head(entry: AdapterEntry) -> AdapterEntry:
    """A head tied to the input embeddings is not in the checkpoint, but it is a module of its own
    in the model: the adapter saves it too, with the embedding's values (a wrapped copy of the
    embedding would leave the head at the base's values)."""
    if entry.role == "full" and entry.tensor.endswith(_INPUT_EMBEDDINGS):
        return replace(entry, aliases=(TIED_HEAD,))
    return entry


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def factorize(
    d: torch.Tensor, rank: int, *, method: str = "auto", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the rank-``rank`` truncated SVD of ``d`` (float64, out × in) and
    the singular values split evenly between them (``A = √S·Vᵀ``, ``B = U·√S``).

    >>> import torch
    >>> d = torch.outer(torch.arange(1.0, 4.0, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    >>> a, b = factorize(d, 2)
    >>> a.shape, b.shape, bool(torch.allclose(b @ a, d))
    (torch.Size([2, 5]), torch.Size([3, 2]), True)
    """
    import torch

    m, n = d.shape
    rank = min(rank, m, n)
    k = min(rank + OVERSAMPLE, m, n)
    if method == "exact" or (method == "auto" and 2 * k >= min(m, n)):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        g = torch.Generator().manual_seed(seed)
        omega = torch.randn(n, k, generator=g, dtype=torch.float64)
        q = torch.linalg.qr(d @ omega).Q
        for _ in range(POWER_ITERATIONS):  # each one sharpens the sketch's spectrum (σ²ᵠ⁺¹ decay)
            q = torch.linalg.qr(d.T @ q).Q
            q = torch.linalg.qr(d @ q).Q
        ub, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)
        u = q @ ub
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root[None, :]).contiguous()


def _format_error(err: float) -> str:
    """Fixed width, so that the header planned with placeholders keeps its length."""
    err = 0.0 if err < 1e-99 else min(err, 9.999999)
    return f"{err:.6e}"


class LoraWriter(Transaction):
    """A sink that writes one output as a PEFT adapter directory, atomically: the chunks of each
    factored tensor are gathered, factored when the last one arrives, and the factors written;
    everything else streams through.  ``base`` reads the base model (modules saved whole are
    ``base + D``); ``card`` makes the model card from the adapter's section (errors included)."""

    def __init__(
        self,
        path: str,
        layout: AdapterLayout,
        *,
        base: Source,
        metadata: Mapping[str, str],
        config: Mapping[str, Any],
        card: Callable[[str], str],
        svd: str = "auto",
        overwrite: bool = False,
    ) -> None:
        import torch  # noqa: F401  (the SVDs need it: loaded before the run, which then gives it one thread)

        self.path = path.rstrip(os.sep) or os.sep
        self.layout = layout
        self.overwrite = overwrite
        self.svd = svd
        self.errors: dict[str, float] = {}
        self._base = base
        self._config = dict(config)
        self._card = card
        self._entries = {e.tensor: e for e in layout.entries}
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool: list[torch.Tensor] = []
        self._filled: dict[str, int] = {}
        self._lock = threading.Lock()
        self._state = "open"
        self._check_target()
        self._metadata = {"format": "pt", **metadata}
        placeholder = {e.tensor: _format_error(0.0) for e in layout.lora()}
        self._tmpdir = temp_sibling(self.path)
        # armed before the directory exists, as for checkpoints: a signal right after the mkdir
        # must not leave it behind
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, ignore_errors=True)
        try:
            os.mkdir(self._tmpdir)
        except OSError as e:
            self._finalizer.detach()
            raise TvOutputError(f"{self.path}: cannot create: {e.strerror}", code="E500") from None
        try:
            self._writer = SafetensorsWriter(
                os.path.join(self._tmpdir, WEIGHTS),
                layout.planned(),
                {**self._metadata, ERRORS_KEY: json.dumps(placeholder)},
            )
        except BaseException:
            self._finalizer()
            raise

    def _check_target(self) -> None:
        parent = os.path.dirname(self.path) or "."
        try:
            os.makedirs(parent, exist_ok=True)  # as for checkpoints: missing parents are created
        except OSError as e:
            raise TvOutputError(
                f"{self.path}: cannot create its directory {parent}: {e.strerror}", code="E500"
            ) from None
        if not os.path.lexists(self.path):
            return
        if not self.overwrite:
            raise TvOutputError(
                f"{self.path}: already exists",
                help="choose another output path or allow overwriting",
                code="E500",
            )
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            raise TvOutputError(
                f"{self.path}: exists and is not a directory; refusing to replace it", code="E500"
            )
        entries = os.listdir(self.path)
        if entries and CONFIG not in entries and not any(e.endswith(".safetensors") for e in entries):
            raise TvOutputError(
                f"{self.path}: exists and holds neither an adapter nor a model; refusing to replace it",
                code="E500",
            )

    # -- the sink --------------------------------------------------------------------------------
    def write(self, name: str, start: int, chunk: Chunk) -> None:
        import torch

        entry = self._entries.get(name)
        if entry is None or entry.role == "skip":
            return
        chunk = to_torch(chunk)
        if chunk.device.type != "cpu":  # from the GPU executor: the SVDs and the writes are on the CPU
            chunk = chunk.cpu()
        stop = start + chunk.numel()
        if entry.role == "bias":
            self._writer.write(entry.planned()[0][0], start, chunk.to(torch_dtype(entry.dtype)).contiguous())
        elif entry.role == "full":  # the module as the adapted model has it: base + D, rounded once
            base = to_torch(self._base.read(name, start, stop))
            for lo in range(0, stop - start, _BLOCK):  # float64 temporaries of a block, not of the chunk
                hi = min(stop - start, lo + _BLOCK)
                whole = (base[lo:hi].to(torch.float64) + chunk[lo:hi]).to(torch_dtype(entry.dtype))
                for key, _, _ in entry.planned():
                    self._writer.write(key, start + lo, whole)
            self._base.release(name, start, stop)
        else:
            self._gather(entry, start, chunk)

    def _gather(self, entry: AdapterEntry, start: int, chunk: torch.Tensor) -> None:
        numel = math.prod(entry.shape)
        with self._lock:
            buf = self._buffers.get(entry.tensor)
            if buf is None:
                buf = self._buffers[entry.tensor] = self._take(numel)
                self._filled[entry.tensor] = 0
        buf[start : start + chunk.numel()].copy_(chunk)  # buf: a pooled buffer of at least numel
        with self._lock:
            self._filled[entry.tensor] += chunk.numel()
            done = self._filled[entry.tensor] == numel
            if done:
                del self._buffers[entry.tensor]
        if done:
            try:
                self._factor(entry, buf[:numel].view(entry.shape))
            finally:
                with self._lock:
                    self._pool.append(buf)

    def _take(self, numel: int) -> torch.Tensor:
        """A float64 buffer of at least ``numel`` elements from the pool (one per tensor in flight, at
        most about one per worker), so buffers are reused rather than reallocated for every tensor."""
        import torch

        sizes = [b.numel() for b in self._pool]
        fits = [i for i, n in enumerate(sizes) if n >= numel]
        if fits:
            return self._pool.pop(min(fits, key=lambda i: sizes[i]))
        if self._pool:  # all too small for this tensor: let the largest go, and grow
            self._pool.pop(max(range(len(sizes)), key=lambda i: sizes[i]))
        return torch.empty(numel, dtype=torch.float64)

    def _factor(self, entry: AdapterEntry, stored: torch.Tensor) -> None:
        """Factor one tensor, write A and B, and measure the error of the factors as stored."""
        import torch

        norm = float(torch.linalg.vector_norm(stored))
        if not math.isfinite(norm):  # a NaN or ±inf anywhere makes the norm one (cheaper than isfinite)
            # a plain TvError: the runtime reads an OSError (TvInputError is one) from a sink as a write failure
            raise TvError(
                f"tensor `{entry.tensor}` of the task vector holds NaN/±inf: it has no SVD",
                help="check the inputs (run without --as-lora and --nonfinite error to see where)",
                code="E308",
            )
        d = stored.T if entry.transposed else stored  # out × in
        a, b = factorize(d, entry.rank, method=self.svd, seed=_seed(entry.tensor))
        dtype = torch_dtype(entry.dtype)
        a_out, b_out = a.to(dtype), b.to(dtype)
        a64, b64 = a_out.to(torch.float64), b_out.to(torch.float64)
        if entry.transposed:  # stored = Dᵀ: subtract Aᵀ Bᵀ, in place
            stored.addmm_(a64.T, b64.T, alpha=-1.0)
        else:
            stored.addmm_(b64, a64, alpha=-1.0)
        residual = float(torch.linalg.vector_norm(stored))
        (key_a, _, _), (key_b, _, _) = entry.planned()
        self._writer.write(key_a, 0, a_out.reshape(-1))
        self._writer.write(key_b, 0, b_out.reshape(-1))
        with self._lock:
            self.errors[entry.tensor] = residual / norm if norm > 0 else 0.0

    # -- the transaction -------------------------------------------------------------------------
    def commit(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.path}: writer is already {self._state}")
        try:
            if self._buffers:
                raise ValueError(f"{self.path}: tensors never completed: {', '.join(sorted(self._buffers))}")
            errors = {e.tensor: _format_error(self.errors.get(e.tensor, 0.0)) for e in self.layout.lora()}
            self._writer.rewrite_metadata({**self._metadata, ERRORS_KEY: json.dumps(errors)})
            self._writer.commit()
            for name, text in (
                (CONFIG, json.dumps(self._config, indent=2) + "\n"),
                (CARD_NAME, self._card(self.card_section())),
            ):
                with open(os.path.join(self._tmpdir, name), "w", encoding="utf-8") as f:
                    f.write(text)
            self._check_target()
            self._install()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"

    def _install(self) -> None:
        try:
            fsync_dir(self._tmpdir)
            old = swap_into_place(self._tmpdir, self.path)
        except OSError as e:
            raise TvOutputError(
                f"{self.path}: cannot move the output into place: {e.strerror}", code="E500"
            ) from None
        self._finalizer.detach()
        remove_old(old)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._writer.abort()
        self._buffers.clear()
        self._pool.clear()
        self._finalizer()

    # -- reporting -------------------------------------------------------------------------------
    def summary(self) -> list[str]:
        """The run summary: one line per factored tensor, then what was saved whole or skipped."""
        lora = self.layout.lora()
        full = [e for e in self.layout.entries if e.role == "full"]
        skipped = [e for e in self.layout.entries if e.role == "skip"]
        worst = max(self.errors.values(), default=0.0)
        lines = [
            f"adapter {self.path}: rank {self.layout.rank}, {len(lora)} tensors factored "
            f"(largest relative Frobenius error {worst:.3e}), {len(full)} saved whole, {len(skipped)} skipped"
        ]
        lines += [
            f"  {e.tensor}: rank {e.rank}, relative error {self.errors.get(e.tensor, 0.0):.3e}" for e in lora
        ]
        lines += [f"  {e.tensor}: skipped ({e.note})" for e in skipped]
        return lines

    def card_section(self) -> str:
        rows = [
            f"| `{e.tensor}` | {e.rank} | {self.errors.get(e.tensor, 0.0):.3e} |" for e in self.layout.lora()
        ]
        saved = sorted({e.module for e in self.layout.entries if e.role == "full"})
        skipped = [f"`{e.tensor}` ({e.note})" for e in self.layout.entries if e.role == "skip"]
        text = [
            "## Adapter",
            "",
            f"A PEFT LoRA adapter of rank {self.layout.rank} (`lora_alpha` = r, so its scale is 1): each "
            "2-D weight's task vector D is factored by a truncated SVD as B @ A. The error is "
            "‖D − B·A‖ / ‖D‖ (Frobenius), with A and B as stored.",
            "",
            "| tensor | rank | relative error |",
            "|---|---|---|",
            *rows,
            "",
            "Saved whole (`modules_to_save`): " + (", ".join(f"`{m}`" for m in saved) or "none") + ".",
        ]
        if skipped:
            text += ["", "Skipped: " + ", ".join(skipped) + "."]
        return "\n".join(text)


__all__ = [
    "ERRORS_KEY",
    "AdapterEntry",
    "AdapterLayout",
    "LoraWriter",
    "factorize",
    "is_embedding",
]
