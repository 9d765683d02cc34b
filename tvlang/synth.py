"""Synthetic Llama-shaped checkpoints: deterministic, for the demo, the tests and the benchmarks.

A *family* is a base model plus fine-tuned variants that differ from it by
small, seeded deltas, the way real fine-tunes do.

Two generators:

- :func:`make_family` (with :func:`llama_shapes`, :func:`make_state`, :func:`save_checkpoint`) builds
  whole state dicts in memory: small models for the demo and the tests.
- :func:`write_family` (with :class:`LlamaSpec` and :func:`spec_for_bytes`) streams a family of any
  size to disk, a block of rows at a time, so memory stays at a few tens of MiB whatever the model
  size.  Every model is a Hugging Face directory (sharded or not) with a complete Llama
  ``config.json``, so tools that load configs (mergekit, transformers) accept it.  The bytes
  depend only on the spec, the dtype, the seed and the model's position in the family: not on
  the shard count, on the other members or on the machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from tvlang.dtypes import OUTPUT_NAMES, code_of, torch_dtype


def llama_shapes(
    hidden: int = 64, layers: int = 2, vocab: int = 256, intermediate: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-style decoder."""
    inter = intermediate or hidden * 8 // 3
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def gpt2_shapes(
    hidden: int = 64, layers: int = 2, vocab: int = 256, positions: int = 64
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a GPT-2 decoder as ``GPT2LMHeadModel`` saves it (Conv1D weights
    stored input-major; the head tied to the token embeddings, so not stored)."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.wpe.weight": (positions, hidden),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            shapes[p + f"{norm}.weight"] = (hidden,)
            shapes[p + f"{norm}.bias"] = (hidden,)
        for name, (fan_in, fan_out) in {
            "attn.c_attn": (hidden, 3 * hidden),
            "attn.c_proj": (hidden, hidden),
            "mlp.c_fc": (hidden, 4 * hidden),
            "mlp.c_proj": (4 * hidden, hidden),
        }.items():
            shapes[p + f"{name}.weight"] = (fan_in, fan_out)
            shapes[p + f"{name}.bias"] = (fan_out,)
    shapes["transformer.ln_f.weight"] = (hidden,)
    shapes["transformer.ln_f.bias"] = (hidden,)
    return shapes


def gpt2_config(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A ``config.json`` for ``GPT2LMHeadModel`` with the dimensions of :func:`gpt2_shapes`."""
    vocab, hidden = shapes["transformer.wte.weight"]
    positions = shapes["transformer.wpe.weight"][0]
    layers = sum(1 for n in shapes if n.endswith(".ln_1.weight"))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": positions,
        "n_ctx": positions,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": max(1, hidden // 16),
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def shapes_for_bytes(total_bytes: int, itemsize: int = 2, layers: int = 8) -> dict[str, tuple[int, ...]]:
    """Llama shapes whose tensors add up to about ``total_bytes``."""
    vocab = 32000
    # per layer ≈ 4h² + 3·h·(8h/3) = 12h²; embeddings + head = 2·vocab·h
    h = 64
    while (12 * (h + 64) ** 2 * layers + 2 * vocab * (h + 64)) * itemsize <= total_bytes:
        h += 64
    return llama_shapes(h, layers, vocab)


def make_state(
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    base: dict[str, torch.Tensor] | None = None,
    scale: float = 0.01,
) -> dict[str, torch.Tensor]:
    """A base state (``base=None``: N(0, 0.02) weights, norms at 1) or a fine-tune of ``base``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if base is None:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        else:
            ref = base[name].float()
            t = ref + torch.randn(shape, generator=g) * scale * (ref.abs().mean() + 1e-3)
        state[name] = t.to(dtype)
    return state


def save_checkpoint(state: dict[str, torch.Tensor], path: str, *, shards: int = 1) -> None:
    """Write ``state`` as ``path`` (a ``.safetensors`` file) or as an HF directory with ``shards`` shards,
    a config.json and a tokenizer.json."""
    if path.endswith(".safetensors"):
        save_file(state, path, metadata={"format": "pt"})
        return
    os.makedirs(path, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    first = next(iter(state.values()), None)
    dtype = first.dtype if first is not None else torch.bfloat16
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    spec = LlamaSpec.from_shapes(shapes)
    if "transformer.wte.weight" in shapes:
        config = gpt2_config(shapes, dtype)
    else:
        config = (
            spec.config(dtype)
            if spec is not None
            else {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE"}}, f)


def make_family(
    directory: str,
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype = torch.bfloat16,
    base_shards: int = 1,
    seed: int = 0,
    layout: str = "file",
) -> dict[str, str]:
    """Write ``names[0]`` as the base and the rest as fine-tunes of it under ``directory``.

    ``layout="file"``: ``NAME.safetensors``; ``"dir"``: HF directories (the base with
    ``base_shards`` shards).  Returns name → path.
    """
    os.makedirs(directory, exist_ok=True)
    base = make_state(shapes, seed, dtype)
    paths = {}
    for i, name in enumerate(names):
        state = base if i == 0 else make_state(shapes, seed + i, dtype, base=base)
        path = os.path.join(directory, name if layout == "dir" else name + ".safetensors")
        save_checkpoint(state, path, shards=base_shards if (i == 0 and layout == "dir") else 1)
        paths[name] = path
    return paths


def write_tokenizer(
    path: str, tokens: Sequence[str], *, added: Sequence[str] = (), special: Sequence[str] = ("<unk>",)
) -> None:
    """Write a small word-level tokenizer into the model directory ``path`` (``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``): ``tokens`` get ids 0, 1, …; ``added``
    follow as added tokens, and the ``special`` ones among all of them are special added tokens.
    ``tokens[0]`` is the unknown token.  Words are split on whitespace."""
    vocab = {t: i for i, t in enumerate(tokens)}
    entries = []
    for t in [*tokens, *added]:
        if t in special or t in added:
            vocab.setdefault(t, len(vocab))
            is_special = t in special
            entries.append(
                {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": not is_special, "special": is_special}
            )  # fmt: skip
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": entries,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {t: i for t, i in vocab.items() if t not in added},
            "unk_token": tokens[0],
        },
    }
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": tokens[0], "model_max_length": 4096}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"unk_token": tokens[0]}, f, indent=2)


def make_lora_adapter(
    path: str,
    shapes: dict[str, tuple[int, ...]],
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> None:
    """A PEFT-format LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) on the
    projections named in ``targets``, with small seeded bf16 A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or not any(f".{t}.weight" in name for t in targets):
            continue
        module = "base_model.model." + name[: -len(".weight")]
        tensors[module + ".lora_A.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.05).to(
            torch.bfloat16
        )
        tensors[module + ".lora_B.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.05).to(
            torch.bfloat16
        )
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets)}, f)


# ------------------------------------------------------------------------------------------
# Streaming generator: Llama specs of any size, written a block of rows at a time
# ------------------------------------------------------------------------------------------

SYNTH_DTYPES = ("F32", "BF16", "F16")  # what the generator writes


_BLOCK = 1 << 22  # elements per generated block; fixed, so the bytes never depend on memory settings


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"`` or ``torch.bfloat16`` → ``torch.bfloat16`` (likewise fp16, fp32)."""
    if isinstance(dtype, torch.dtype):
        if code_of(dtype) not in SYNTH_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    code = OUTPUT_NAMES.get(dtype.lower())
    if code not in SYNTH_DTYPES:
        names = [n for n, c in OUTPUT_NAMES.items() if c in SYNTH_DTYPES]
        raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(names)}")
    return torch_dtype(code)


@dataclass(frozen=True)
class LlamaSpec:
    """The dimensions of a Llama-style decoder (grouped-query attention, SwiGLU MLP, RMSNorm).

    >>> s = LlamaSpec(hidden=512, layers=2, vocab=1000, intermediate=1536, heads=8, kv_heads=2)
    >>> s.shapes()["model.layers.0.self_attn.k_proj.weight"], len(s.shapes())
    ((128, 512), 21)
    >>> LlamaSpec.from_shapes(s.shapes()) == s
    True
    """

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"heads {self.heads} must divide hidden {self.hidden}, kv_heads must divide heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes, in the order Hugging Face writes them."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def nbytes(self, dtype: torch.dtype | str = torch.bfloat16) -> int:
        """Bytes of tensor data in one checkpoint (headers not counted)."""
        return self.numel() * as_dtype(dtype).itemsize

    def config(self, dtype: torch.dtype | str = torch.bfloat16) -> dict[str, Any]:
        """A complete ``config.json`` for ``LlamaForCausalLM`` with these dimensions."""
        name = str(as_dtype(dtype)).removeprefix("torch.")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": name,
            "dtype": name,
            "transformers_version": "4.46.0",
        }

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> LlamaSpec | None:
        """The spec whose :meth:`shapes` are these (untied Llama names), or None if there is none."""
        try:
            vocab, h = shapes["model.embed_tokens.weight"]
            layers = sum(1 for k in shapes if k.endswith(".input_layernorm.weight"))
            inter = shapes["model.layers.0.mlp.gate_proj.weight"][0]
            kv_dim = shapes["model.layers.0.self_attn.k_proj.weight"][0]
        except (KeyError, ValueError, IndexError):
            return None
        head_dim = next((d for d in (64, 128, 32, 16, 8, 4, 2, 1) if h % d == 0 and kv_dim % d == 0), 1)
        try:
            spec = cls(h, layers, vocab, inter, h // head_dim, kv_dim // head_dim)
        except (ValueError, ZeroDivisionError):
            return None
        return spec if spec.shapes() == shapes else None


def llama_spec(hidden: int, layers: int | None = None, vocab: int = 32000) -> LlamaSpec:
    """Llama-like proportions for a hidden size (a multiple of 64): head dim 64, a quarter as many
    key/value heads as query heads (grouped-query attention), MLP width 8/3 of hidden rounded up
    to a multiple of 256, and about one layer per 128 of hidden (4 to 32) unless ``layers`` is given.

    >>> llama_spec(2048)
    LlamaSpec(hidden=2048, layers=16, vocab=32000, intermediate=5632, heads=32, kv_heads=8)
    """
    if hidden <= 0 or hidden % 64:
        raise ValueError(f"hidden must be a positive multiple of 64, not {hidden}")
    heads = hidden // 64
    kv = max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)
    inter = -(-(8 * hidden // 3) // 256) * 256
    depth = layers if layers is not None else max(4, min(32, round(hidden / 128)))
    return LlamaSpec(hidden, depth, vocab, inter, heads, kv)


def spec_for_bytes(
    total_bytes: int,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    vocab: int = 32000,
    layers: int | None = None,
) -> LlamaSpec:
    """The :func:`llama_spec` whose checkpoint is as large as possible but at most ``total_bytes``
    (of tensor data, in ``dtype``): the widest hidden size (a multiple of 256, so that the heads
    split evenly into 4:1 query groups; below 256 for tiny targets) that fits, then as many layers as fit (unless ``layers``
    is given).  A spec is within one layer of the target.

    >>> s = spec_for_bytes(10**9)
    >>> (s.hidden, s.layers, 0.9 < s.nbytes() / 10**9 <= 1)
    (1536, 16, True)
    """

    def fits(s: LlamaSpec) -> bool:
        return s.nbytes(dtype) <= total_bytes

    hidden = 256
    while fits(llama_spec(hidden + 256, layers, vocab)):
        hidden += 256
    while hidden > 64 and not fits(llama_spec(hidden, layers, vocab)):  # tiny targets: narrower still
        hidden -= 64
    spec = llama_spec(hidden, layers, vocab)
    if not fits(spec):
        raise ValueError(f"{total_bytes} bytes is too small for a Llama model with a vocabulary of {vocab}")
    if layers is None:
        while fits(llama_spec(hidden, spec.layers + 1, vocab)):
            spec = llama_spec(hidden, spec.layers + 1, vocab)
    return spec


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _base_block(name: str, shape: tuple[int, ...], rows: slice, layers: int, seed: int) -> torch.Tensor:
    """Rows ``rows`` of the base tensor ``name`` in float32."""
    n = rows.stop - rows.start
    cols = shape[1] if len(shape) > 1 else 1
    g = _generator(seed, "base", name, rows.start)
    x = torch.randn((n, cols) if len(shape) > 1 else (n,), generator=g)
    if len(shape) == 1:  # RMSNorm gains: around 1, spread as trained ones are
        return x.mul_(0.1).add_(1.0)
    std = 0.02 / math.sqrt(2 * layers) if ("o_proj" in name or "down_proj" in name) else 0.02
    return x.mul_(std)


def _delta_block(
    name: str, shape: tuple[int, ...], rows: slice, layers: int, seed: int, variant: int, scale: float
) -> torch.Tensor:
    """Rows ``rows`` of fine-tune ``variant``'s delta: Gaussian, about ``scale`` times the base's
    spread, with a per-row gain drawn log-normally (some rows move much more than others, as in
    real fine-tunes) and a per-variant, per-tensor strength between 0.5 and 1.5."""
    n = rows.stop - rows.start
    g = _generator(seed, "delta", variant, name, rows.start)
    strength = 0.5 + torch.rand(1, generator=_generator(seed, "strength", variant, name)).item()
    if len(shape) == 1:
        return torch.randn(n, generator=g).mul_(0.1 * scale * strength)
    std = 0.02 / math.sqrt(2 * layers) if ("o_proj" in name or "down_proj" in name) else 0.02
    gain = torch.randn(n, 1, generator=g).mul_(0.5).exp_().mul_(std * scale * strength)
    return torch.randn(n, shape[1], generator=g).mul_(gain)


def _header(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, int]:
    """A safetensors header (length prefix included) for tensors laid out in order; and the data size."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        meta[name] = {
            "dtype": code_of(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _shard_names(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Split the names, in order, into ``shards`` runs of about equal bytes, none empty."""
    names = list(shapes)
    shards = max(1, min(shards, len(names)))
    sizes = [math.prod(shapes[n]) for n in names]
    cum = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    cuts = [0]
    for k in range(1, shards):
        target = k * cum[-1] / shards
        i = next(j for j, c in enumerate(cum) if c >= target) + 1  # shard k starts after the name crossing it
        cuts.append(min(max(i, cuts[-1] + 1), len(names) - (shards - k)))
    cuts.append(len(names))
    return [names[a:b] for a, b in itertools.pairwise(cuts)]


def write_family(
    directory: str,
    names: Sequence[str],
    spec: LlamaSpec,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    seed: int = 0,
    shards: int = 1,
    delta_scale: float = 0.05,
    layout: str = "dir",
) -> dict[str, str]:
    """Write ``names[0]`` as a base model and the others as fine-tunes of it, tensor by tensor.

    ``layout="dir"``: each model is a Hugging Face directory ``directory/NAME/`` holding
    ``model.safetensors`` (``shards=1``) or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, and a complete ``config.json`` and ``generation_config.json``.
    ``layout="file"``: ``directory/NAME.safetensors``.  Base weights are N(0, 0.02) (output
    projections scaled down with depth, norms around 1); each fine-tune adds a seeded delta about
    ``delta_scale`` times the weights' spread.  Memory stays at a few blocks of 4M elements.
    Returns name → path.
    """
    dt = as_dtype(dtype)
    shapes = spec.shapes()
    os.makedirs(directory, exist_ok=True)
    split = _shard_names(shapes, shards if layout == "dir" else 1)
    files: list[list[tuple[str, list[str]]]] = []  # per model: (file path, names in it)
    paths: dict[str, str] = {}
    for name in names:
        if layout == "file":
            paths[name] = os.path.join(directory, name + ".safetensors")
            files.append([(paths[name], split[0])])
            continue
        if layout != "dir":
            raise ValueError(f"layout must be 'dir' or 'file', not {layout!r}")
        paths[name] = path = os.path.join(directory, name)
        os.makedirs(path, exist_ok=True)
        n = len(split)
        fnames = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        files.append([(os.path.join(path, f), part) for f, part in zip(fnames, split, strict=True)])
        for stale in os.listdir(path):  # a rerun with another shard count leaves no stray shards
            if stale.startswith("model") and stale.endswith(".safetensors") and stale not in fnames:
                os.remove(os.path.join(path, stale))
        if n > 1:
            index = {
                "metadata": {"total_size": spec.nbytes(dt)},
                "weight_map": {t: f for f, part in zip(fnames, split, strict=True) for t in part},
            }
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        elif os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            os.remove(os.path.join(path, "model.safetensors.index.json"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(spec.config(dt), f, indent=2)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46.0"}, f, indent=2)

    # open every file, write its header; then stream the tensors in order, all models together
    handles: list[dict[str, BinaryIO]] = []  # per model: tensor name → the open file it goes to
    opened: list[BinaryIO] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small element-wise ops: one thread is fastest, and 3x so on a busy machine
    try:
        for model_files in files:
            where: dict[str, BinaryIO] = {}
            for fpath, part in model_files:
                fh = open(fpath + ".tmp", "wb")  # noqa: SIM115 (closed below, after streaming)
                opened.append(fh)
                fh.write(_header([(t, shapes[t]) for t in part], dt)[0])
                where.update(dict.fromkeys(part, fh))
            handles.append(where)
        for tname, shape in shapes.items():
            rows_per = max(1, _BLOCK // (shape[1] if len(shape) > 1 else 1))
            for start in range(0, shape[0], rows_per):
                rows = slice(start, min(shape[0], start + rows_per))
                base = _base_block(tname, shape, rows, spec.layers, seed)
                for i, where in enumerate(handles):
                    x = (
                        base
                        if i == 0
                        else _delta_block(tname, shape, rows, spec.layers, seed, i, delta_scale).add_(base)
                    )
                    where[tname].write(x.to(dt).view(torch.uint8).numpy().data)
    finally:
        torch.set_num_threads(threads)
        for stream in opened:
            stream.close()
    for model_files in files:
        for fpath, _ in model_files:
            os.replace(fpath + ".tmp", fpath)
    return paths
