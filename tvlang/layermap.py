"""Layer structure: ranges of a model's layers renumbered into an output (``layers()``, ``stack()``).

A :class:`LayerView` is how one checkpoint appears inside a stacked output: its layers
``lo..hi-1`` presented as the output's layers ``offset..offset+hi-lo-1``, plus (``pre``) the
tensors before the layers (embeddings) and (``post``) those after them (final norm, head).  The
planner turns a view into an input whose tensor names are the output's, each mapped to the
checkpoint tensor it reads; nothing else in the pipeline needs to know about layers.

>>> v = LayerView(8, 32, 24, pre=False, post=True)
>>> v.source_of("model.layers.24.mlp.up_proj.weight"), v.source_of("model.embed_tokens.weight")
('model.layers.8.mlp.up_proj.weight', None)
>>> v.source_of("model.norm.weight"), v.text
('model.norm.weight', '8:32@24+post')
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from tvlang.context import EMBEDDING, LAYER, layer_of
from tvlang.source import Span

V = TypeVar("V")

# config.json fields that hold the number of layers (Llama/Mistral/Qwen, GPT-2, others)
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config.json fields that never follow the layers even when their length happens to match
NOT_PER_LAYER = frozenset({"architectures"})


@dataclass(frozen=True)
class LayerView:
    """A checkpoint's layers [lo, hi), placed at ``offset`` in the output, with or without the
    tensors before the layers (``pre``: embeddings) and after them (``post``: norm, head)."""

    lo: int
    hi: int
    offset: int = 0
    pre: bool = True
    post: bool = True
    span: Span | None = field(default=None, compare=False, hash=False)

    @property
    def length(self) -> int:
        return self.hi - self.lo

    @property
    def text(self) -> str:
        flags = "+".join(f for f, on in (("pre", self.pre), ("post", self.post)) if on)
        return f"{self.lo}:{self.hi}@{self.offset}" + (f"+{flags}" if flags else "")

    def shifted(self, by: int, *, pre: bool, post: bool) -> LayerView:
        """The view placed ``by`` layers further into a stack, keeping the non-layer tensors only
        where the stack keeps them (embeddings from its first slice, norm and head from its last)."""
        return replace(self, offset=self.offset + by, pre=self.pre and pre, post=self.post and post)

    def source_of(self, name: str) -> str | None:
        """The checkpoint tensor that output tensor ``name`` reads, or None when the view lacks it."""
        layer = layer_of(name)
        if layer >= 0:
            if self.offset <= layer < self.offset + self.length:
                return renumber(name, layer - self.offset + self.lo)
            return None
        return name if (self.pre if is_pre(name) else self.post) else None

    def present(self, tensors: Mapping[str, V]) -> dict[str, tuple[str, V]]:
        """The view's tensors under their output names → (checkpoint name, value), in checkpoint order."""
        out: dict[str, tuple[str, V]] = {}
        for name, value in tensors.items():
            layer = layer_of(name)
            if layer >= 0:
                if self.lo <= layer < self.hi:
                    out[renumber(name, layer - self.lo + self.offset)] = (name, value)
            elif self.pre if is_pre(name) else self.post:
                out[name] = (name, value)
        return out


def is_pre(name: str) -> bool:
    """Tensors outside the layers that come before them (embeddings); the rest come after."""
    return EMBEDDING.search(name) is not None


def renumber(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer``."""
    m = LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(layer) + name[m.end(1) :]


def output_order(names: Sequence[str]) -> list[str]:
    """Tensor names in model order: embeddings, then layer by layer, then the rest (stable within each)."""

    def key(name: str) -> tuple[int, int]:
        layer = layer_of(name)
        if layer >= 0:
            return (1, layer)
        return (0, 0) if is_pre(name) else (2, 0)

    return sorted(names, key=key)


LayerSources = tuple[tuple[int, int], ...]  # (input index, source layer) for one output layer


def layer_ranges(layers: Sequence[LayerSources]) -> list[tuple[int, int, LayerSources]]:
    """Runs of output layers whose sources advance together: (first, last, sources of the first)."""
    runs: list[tuple[int, int, LayerSources]] = []
    for i, sources in enumerate(layers):
        if runs:
            first, last, start = runs[-1]
            step = i - first
            if last == i - 1 and [(k, s + step) for k, s in start] == list(sources):
                runs[-1] = (first, i, start)
                continue
        runs.append((i, i, sources))
    return runs


def edit_config(config: Mapping[str, Any], layers: Sequence[LayerSources]) -> dict[str, Any]:
    """``config.json`` for a model with the given layers, each from the source layer(s) listed:
    the depth fields say the new depth, and per-layer lists (a list as long as the old depth, such
    as ``layer_types``) follow the layers, taking each entry from the first source's layer."""
    old = next((config[k] for k in DEPTH_FIELDS if isinstance(config.get(k), int)), None)
    edited = dict(config)
    for k in DEPTH_FIELDS:
        if isinstance(config.get(k), int):
            edited[k] = len(layers)
    for k, value in config.items():
        if (
            k not in NOT_PER_LAYER
            and isinstance(value, list)
            and old is not None
            and old > 1
            and len(value) == old
            and all(src and 0 <= src[0][1] < old for src in layers)
        ):
            edited[k] = [value[src[0][1]] for src in layers]
    return edited


def edited_config_text(text: str, layers: Sequence[LayerSources]) -> str | None:
    """:func:`edit_config` on a ``config.json``'s text; None when it is not a JSON object."""
    try:
        config = json.loads(text)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    return json.dumps(edit_config(config, layers), indent=2) + "\n"


def restacked_sidecars(
    sidecars: Sequence[str], layers: Sequence[LayerSources], into: tempfile.TemporaryDirectory[str]
) -> list[str]:
    """The side files of a stacked output: ``config.json`` replaced by a copy (in ``into``) that
    says the new depth; the others as they are."""
    out = []
    for path in sidecars:
        if os.path.basename(path) == "config.json":
            try:
                with open(path, encoding="utf-8") as f:
                    text = edited_config_text(f.read(1 << 24), layers)
            except (OSError, UnicodeDecodeError):
                text = None
            if text is not None:
                folder = tempfile.mkdtemp(dir=into.name)  # one per output: each keeps the name config.json
                path = os.path.join(folder, "config.json")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
        out.append(path)
    return out


__all__ = [
    "DEPTH_FIELDS",
    "LayerSources",
    "LayerView",
    "edit_config",
    "edited_config_text",
    "is_pre",
    "layer_ranges",
    "output_order",
    "renumber",
    "restacked_sidecars",
]
