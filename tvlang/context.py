"""Per-tensor context: what an expression may know about the tensor being computed.

``matches("*.mlp.*")``, ``layer()``, ``num_layers()`` and ``gradient([0.2, 0.8])`` are
numbers that differ from tensor to tensor but are known from the tensor's name
alone, so the planner resolves them before any data is read: each tensor gets
its own folded, linearised program and ``tvlang plan`` shows its weights.

>>> ctx = TensorContext("model.layers.3.mlp.up_proj.weight", num_layers=4)
>>> ctx.layer, ctx.value(("gradient", (0.2, 0.8))), ctx.value(("matches", "*.mlp.*"))
(3, 0.8, 1.0)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

# The layer index in common naming schemes: Llama/Mistral (model.layers.N.), GPT-2 (h.N.),
# BERT (encoder.layer.N.), many others (blocks.N., block.N.).
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# Tensors before the first layer (mergekit's "pre-weights") take the start of a gradient.
EMBEDDING = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")


def layer_of(name: str) -> int:
    m = LAYER.search(name)
    return int(m.group(1)) if m else -1


def count_layers(names: Iterable[str]) -> int:
    return max((layer_of(n) for n in names), default=-1) + 1


@dataclass(frozen=True)
class TensorContext:
    """``offset``: inside a slice of a stacked output (``stack()``, ``layers()``), layers are counted
    from the slice's first layer and ``num_layers`` is the slice's length."""

    name: str
    num_layers: int
    offset: int = 0

    @cached_property
    def layer(self) -> int:
        layer = layer_of(self.name)
        return layer - self.offset if layer >= 0 else -1

    def within(self, offset: int, length: int) -> TensorContext:
        """The context inside a slice that starts ``offset`` layers into this one."""
        return TensorContext(self.name, length, self.offset + offset)

    @property
    def t(self) -> float:
        """Position along the model for gradients, as mergekit 0.1.5 computes it (its ``plan.py``):
        layer / (layers - 1), 1 in a model or slice of one layer, and 0 for every tensor outside the
        layers (embeddings, final norm and head alike: mergekit plans them with t = 0)."""
        if self.layer >= 0:
            return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
        return 0.0

    def value(self, what: tuple[Any, ...]) -> float:
        kind = what[0]
        if kind == "layer":
            return float(self.layer)
        if kind == "num_layers":
            return float(self.num_layers)
        if kind == "matches":
            pattern: str = what[1]
            if pattern.startswith("re:"):
                return float(re.search(pattern[3:], self.name) is not None)
            return float(fnmatch.fnmatchcase(self.name, pattern))
        if kind == "gradient":
            return gradient(what[1], self.t)
        raise AssertionError(f"unknown context value {what!r}")


def gradient(values: tuple[float, ...], t: float) -> float:
    """mergekit's interpolation of a list of values at position t in [0, 1]."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]
