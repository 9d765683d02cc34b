"""Tasks made from scikit-learn's bundled ``digits`` (1797 8x8 images, no download).

Every task is the same ten-way digit classification seen through a fixed
transform of the image (a rotation, a flip, inverted ink, shuffled pixels...).
Tasks then differ the way the paper's image datasets differ for CLIP: same
labels, different input distributions, so a task vector has something of its
own to learn and something to interfere with.  All tasks share one split of
the underlying images, so no test image is ever seen in training, whatever the
transform.  The analogy's four tasks add bars along the image edges instead (see
``_bars``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Transform = Callable[[Tensor], Tensor]  # (N, 8, 8) images, ink in [0, 1] -> (N, 8, 8)


def _seeded_perm(name: str, n: int = 64) -> Tensor:
    """A permutation fixed by ``name`` alone, so every run and process agrees on it."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randperm(n, generator=g)


def _permute(name: str) -> Transform:
    perm = _seeded_perm(name)
    return lambda x: x.flatten(1)[:, perm].view_as(x)


def _rows(name: str) -> Transform:
    perm = _seeded_perm(name, 8)
    return lambda x: x[:, perm]


def _rotate(degrees: float) -> Transform:
    """Rotation by any angle (bilinear), for the pretraining domains between the right angles."""

    def f(x: Tensor) -> Tensor:
        return affine(
            x, torch.full((len(x),), math.radians(degrees)), torch.ones(len(x)), torch.zeros(len(x), 2)
        )

    return f


def _bars(row: int, col: int) -> Transform:
    """Add a full-intensity bar along image row ``row`` and column ``col`` (a frame artifact).
    Additive on purpose: bar patterns compose by addition, so the analogy below has a linear
    structure that weight-space arithmetic can find."""
    pattern = torch.zeros(8, 8)
    pattern[row] += 1.0
    pattern[:, col] += 1.0
    return lambda x: x + pattern


# The control task: what the pretrained model should keep doing well.
CONTROL = "upright"

# Target tasks (8): fine-tuned one by one, negated, added.
TARGETS: tuple[str, ...] = ("rot90", "rot180", "hflip", "vflip", "invert", "permute", "shift", "halfswap")

TRANSFORMS: dict[str, Transform] = {
    "upright": lambda x: x,
    # targets
    "rot90": lambda x: torch.rot90(x, 1, (1, 2)),
    "rot180": lambda x: torch.rot90(x, 2, (1, 2)),
    "hflip": lambda x: torch.flip(x, (2,)),
    "vflip": lambda x: torch.flip(x, (1,)),
    "invert": lambda x: 1.0 - x,
    "permute": _permute("permute"),
    "shift": lambda x: torch.roll(x, (3, 3), (1, 2)),
    "halfswap": lambda x: torch.roll(x, 4, 2),
    # the analogy's domains: digits behind bars at the top or bottom edge and the left or right edge
    "bars_top_left": _bars(0, 0),
    "bars_bottom_left": _bars(7, 0),
    "bars_top_right": _bars(0, 7),
    "bars_bottom_right": _bars(7, 7),
    # pretraining domains: broad, but none of them is a target
    "transpose": lambda x: x.transpose(1, 2),
    "antitranspose": lambda x: torch.rot90(x, 2, (1, 2)).transpose(1, 2),
    "rot45": _rotate(45.0),
    "rot-45": _rotate(-45.0),
    "rot135": _rotate(135.0),
    "roll1": lambda x: torch.roll(x, (1, -1), (1, 2)),
    "quadswap": lambda x: torch.roll(x, (4, 4), (1, 2)),
    "rows": _rows("rows"),
    "perm_a": _permute("perm_a"),
    "perm_b": _permute("perm_b"),
    "dim": lambda x: 0.5 * x,
    "thick": lambda x: torch.nn.functional.max_pool2d(x[:, None], 3, 1, 1)[:, 0],
}

PRETRAIN_DOMAINS: tuple[str, ...] = (
    "transpose", "antitranspose", "rot45", "rot-45", "rot135", "roll1",
    "quadswap", "rows", "perm_a", "perm_b", "dim", "thick",
)  # fmt: skip


def affine(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Rotate/scale/translate a batch of 8x8 images (per-image parameters, ``shift`` in pixels)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0] / 4], 1), torch.stack([sin, cos, shift[:, 1] / 4], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, [len(x), 1, 8, 8], align_corners=False)
    return torch.nn.functional.grid_sample(x[:, None], grid, align_corners=False)[:, 0]


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Heavy augmentation for pretraining: the broad "pretraining distribution" the paper's CLIP
    had and a few hundred digits lack.  Without it task vectors barely add up."""
    n = len(x)
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(30)
    scale = 0.85 + 0.3 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 2.0
    x = affine(x, angle, scale, shift)
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@dataclass(frozen=True)
class Split:
    """One view of the data: images (N, 64) after a transform, and their digit labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Digits:
    """The raw upright images, split once (stratified, seeded) into train / val / test."""

    train: Split
    val: Split
    test: Split

    def task(self, name: str, part: str) -> Split:
        """``part`` ("train", "val", "test") of task ``name``, flattened to (N, 64)."""
        raw: Split = getattr(self, part)
        x = TRANSFORMS[name](raw.x.view(-1, 8, 8)).reshape(len(raw), 64)
        return Split(x.contiguous(), raw.y)

    def fewshot(self, name: str, per_class: int, seed: int) -> Split:
        """``per_class`` training images of each digit: the "little D data" of the analogy."""
        g = torch.Generator().manual_seed(seed)
        full = self.task(name, "train")
        idx = torch.cat([
            torch.nonzero(full.y == c).flatten()[torch.randperm(int((full.y == c).sum()), generator=g)[:per_class]]
            for c in range(10)
        ])  # fmt: skip
        return Split(full.x[idx], full.y[idx])


def load_digits(seed: int = 0, val: float = 0.15, test: float = 0.3) -> Digits:
    """Load and split ``sklearn.datasets.load_digits`` (bundled with scikit-learn, offline)."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    bunch = sk_load()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx = torch.arange(len(y))
    rest, te = train_test_split(idx, test_size=test, random_state=seed, stratify=y)
    tr, va = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=y[rest])
    return Digits(*(Split(x[i], y[i]) for i in (tr, va, te)))
