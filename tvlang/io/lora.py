"""PEFT LoRA adapters as task vectors, formed chunk by chunk.

An adapter holds, for each targeted linear layer, ``A`` (r × in) and ``B`` (out × r); its task
vector for that layer's weight is ``scale · B @ A`` with ``scale = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA).  :class:`LoraSource` computes only the rows of that product
that a chunk covers, into a reused per-thread buffer, so no dense full-size copy ever exists.
Layers the adapter does not target are zero (the planner treats the adapter as a sparse delta).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from tvlang.chunks import widen, work_array
from tvlang.dtypes import TensorMeta
from tvlang.errors import TvInputError
from tvlang.io.safetensors import ChunkReader, read_header

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight's factors, in float64: its update is ``b_scaled @ a``."""

    a: np.ndarray[Any, Any]  # r × in, float64
    b_scaled: np.ndarray[Any, Any]  # out × r, float64, times the scale
    fan_in_fan_out: bool  # GPT-2 style Conv1D: the weight is stored transposed (in × out)

    @property
    def shape(self) -> tuple[int, int]:
        out, inner = self.b_scaled.shape[0], self.a.shape[1]
        return (inner, out) if self.fan_in_fan_out else (out, inner)


class LoraAdapter:
    """An adapter directory: its config and the (small) A and B matrices, loaded whole."""

    def __init__(self, path: str, pairs: dict[str, LoraPair]) -> None:
        self.path = path
        self.pairs = pairs

    def files(self) -> list[str]:
        """The files the adapter is read from."""
        return [os.path.join(self.path, CONFIG), os.path.join(self.path, WEIGHTS)]

    @classmethod
    def open(cls, path: str) -> LoraAdapter:
        cfg_path, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
        for needed in (cfg_path, weights):
            if not os.path.isfile(needed):
                raise TvInputError(
                    f"{path} is not a PEFT LoRA adapter: {os.path.basename(needed)} is missing",
                    help=f"an adapter directory holds {CONFIG} and {WEIGHTS} (save it with PEFT's save_pretrained)",
                    code="E300",
                )
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise TvInputError(f"{cfg_path}: not valid JSON ({e})", code="E301") from None
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise TvInputError(f"{cfg_path}: not a LoRA adapter config (peft_type must be LORA)", code="E301")
        alpha = float(config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora", False))
        alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        tensors, _ = read_header(weights)
        reader = ChunkReader(weights)
        pairs: dict[str, LoraPair] = {}
        try:
            for name in tensors:
                if not name.endswith(".lora_A.weight"):
                    continue
                module = name[: -len(".lora_A.weight")]
                b_name = module + ".lora_B.weight"
                if b_name not in tensors:
                    raise TvInputError(f"{weights}: `{name}` has no matching `{b_name}`", code="E301")
                a_info, b_info = tensors[name], tensors[b_name]
                a = widen(reader.read(a_info, 0, a_info.numel), a_info.dtype).reshape(a_info.shape)
                b = widen(reader.read(b_info, 0, b_info.numel), b_info.dtype).reshape(b_info.shape)
                if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                    raise TvInputError(
                        f"{weights}: `{module}` has A {list(a.shape)} and B {list(b.shape)}, which do not multiply",
                        code="E301",
                    )
                rank = a.shape[0]
                target = (module[len(PREFIX) :] if module.startswith(PREFIX) else module) + ".weight"
                layer_alpha = next(
                    (float(v) for k, v in alpha_pattern.items() if target[: -len(".weight")].endswith(k)),
                    alpha,
                )
                scale = layer_alpha / (math.sqrt(rank) if rslora else rank)
                pairs[target] = LoraPair(
                    np.ascontiguousarray(a), np.ascontiguousarray(b * scale), fan_in_fan_out
                )
        finally:
            reader.close()
        if not pairs:
            raise TvInputError(f"{weights}: no lora_A/lora_B pairs", code="E301")
        return cls(path, pairs)

    def metas(self) -> dict[str, TensorMeta]:
        # float64: the r-term dot products are then exact enough to round once to any output dtype
        return {name: TensorMeta("F64", pair.shape) for name, pair in self.pairs.items()}


class LoraSource:
    """Chunks of ``scale · B @ A``: the rows a chunk covers, computed when it is read (float64,
    numpy's matrix product: the same chunk whichever kernels consume it)."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter

    def read(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        pair = self.adapter.pairs[name]
        _, cols = pair.shape
        r0, r1 = start // cols, -(-stop // cols)
        block = work_array(f"lora-{id(self)}", "float64", (r1 - r0) * cols).reshape(r1 - r0, cols)
        if pair.fan_in_fan_out:  # stored (in × out): rows of (B A)ᵀ = Aᵀ Bᵀ
            np.matmul(pair.a[:, r0:r1].T, pair.b_scaled.T, out=block)
        else:
            np.matmul(pair.b_scaled[r0:r1], pair.a, out=block)
        return block.reshape(-1)[start - r0 * cols : stop - r0 * cols]

    def release(
        self, name: str, start: int, stop: int, *, before: bool = True, after: bool | None = None
    ) -> None:
        pass

    def gather(self, name: str, positions: np.ndarray[Any, Any], run: int = 1) -> None:
        return None  # each element is a dot product of a row of B and a column of A: no cheap sample

    def close(self) -> None:
        pass
