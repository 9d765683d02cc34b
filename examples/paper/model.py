"""The model: a small MLP encoder and fixed cosine-similarity heads.

The heads stand in for CLIP's zero-shot heads: each task's head is the
normalised class-mean feature of the *pretrained* encoder on that task and
never changes, so fine-tuning moves only the encoder, every fine-tuned model
is the pretrained one plus a task vector over the same parameters, and merged
encoders can be scored with each task's own head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from examples.paper.data import Split

StateDict = Mapping[str, Tensor]

LOGIT_SCALE = 20.0  # softmax temperature of the cosine heads (argmax, hence accuracy, ignores it)


class Encoder(nn.Module):
    """A 3-layer MLP, 64 pixels -> ``features`` (about 360k parameters at the defaults)."""

    def __init__(self, hidden: int = 512, features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, features),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def embed(encoder: nn.Module, weights: StateDict | None, x: Tensor) -> Tensor:
    """Unit-norm features of ``x`` under ``weights`` (a state dict from tvlang) or the module's own."""
    with torch.no_grad():
        f = encoder(x) if weights is None else functional_call(encoder, dict(weights), (x,))
    return nn.functional.normalize(f, dim=-1)


def class_mean_head(encoder: nn.Module, data: Split) -> Tensor:
    """(10, features): the normalised mean feature of each digit -- a "zero-shot" head."""
    f = embed(encoder, None, data.x)
    means = torch.stack([f[data.y == c].mean(0) for c in range(10)])
    return nn.functional.normalize(means, dim=-1)


def logits(features: Tensor, head: Tensor) -> Tensor:
    return LOGIT_SCALE * nn.functional.normalize(features, dim=-1) @ head.T


def accuracy(encoder: nn.Module, weights: StateDict | None, head: Tensor, data: Split) -> float:
    """Top-1 accuracy of encoder ``weights`` with a fixed ``head`` on ``data``."""
    pred = (embed(encoder, weights, data.x) @ head.T).argmax(-1)
    return float((pred == data.y).float().mean())


def accuracies(encoder: nn.Module, weights: StateDict | None, heads: Mapping[str, Tensor],
               data: Mapping[str, Split]) -> dict[str, float]:  # fmt: skip
    """Accuracy on each task of ``data``, each with its own head, in one forward pass."""
    feats = torch.split(embed(encoder, weights, torch.cat([d.x for d in data.values()])),
                        [len(d) for d in data.values()])  # fmt: skip
    return {
        name: float(((f @ heads[name].T).argmax(-1) == d.y).float().mean())
        for (name, d), f in zip(data.items(), feats, strict=True)
    }
