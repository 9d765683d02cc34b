"""Synthetic Llama-shaped checkpoints: deterministic, for the demo, the tests and the benchmarks.

A *family* is a base model plus fine-tuned variants that differ from it by
small, seeded deltas, the way real fine-tunes do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file


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
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f, indent=2)
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
