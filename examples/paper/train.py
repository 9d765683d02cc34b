"""Training: one broad pretraining run, then full fine-tuning of the encoder per task.

Everything is seeded, and every checkpoint is cached as ``.safetensors`` under a
directory named by a hash of the settings that produced it, so a second run of
the example (or of the test) goes straight to the task arithmetic, which
tvlang then does by reading those files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from examples.paper.data import CONTROL, PRETRAIN_DOMAINS, TRANSFORMS, Digits, Split, augment
from examples.paper.model import Encoder, class_mean_head, logits

# The analogy A : B :: C : D -- bars top-left : bottom-left :: top-right : bottom-right.
# D's pattern is C's + (B's - A's), and the hope is that tau_D ~ tau_C + (tau_B - tau_A).
ANALOGY = ("bars_top_left", "bars_bottom_left", "bars_top_right", "bars_bottom_right")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights; its hash names the cache directory."""

    seed: int = 0
    hidden: int = 512
    features: int = 128
    pretrain_steps: int = 3000
    pretrain_lr: float = 2e-3
    finetune_steps: int = 250
    finetune_lr: float = 3e-4  # small steps keep task vectors in the regime where they add up
    batch: int = 128
    weight_decay: float = 0.1
    fewshot: int = 2  # labelled images per digit of the analogy's task D
    version: int = 1  # bump when the training code changes, to retire old caches

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )


def _step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, loss: Tensor) -> None:
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    sched.step()


def pretrain(cfg: TrainConfig, digits: Digits) -> Encoder:
    """Encoder + a throwaway linear classifier on augmented upright digits and a dozen transformed
    domains sharing one label space (as CLIP's text space is shared).  Breadth matters: pretrained
    on upright digits alone, the same recipe showed no gain from adding task vectors."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    encoder = Encoder(cfg.hidden, cfg.features)
    classifier = nn.Linear(cfg.features, 10)
    opt = torch.optim.AdamW([*encoder.parameters(), *classifier.parameters()], lr=cfg.pretrain_lr,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    sched = _schedule(opt, cfg.pretrain_steps)
    domains = (CONTROL,) * 3 + PRETRAIN_DOMAINS  # upright digits: a fifth of each batch
    raw = digits.train
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(raw), (cfg.batch,), generator=g)
        x, y = augment(raw.x[idx].view(-1, 8, 8), g), raw.y[idx]
        which = torch.randint(len(domains), (cfg.batch,), generator=g)
        groups = [which == d for d in range(len(domains))]
        x = torch.cat([TRANSFORMS[dom](x[m]) for dom, m in zip(domains, groups, strict=True) if m.any()])
        y = torch.cat([y[m] for m in groups if m.any()])
        _step(opt, sched, nn.functional.cross_entropy(classifier(encoder(x.reshape(-1, 64))), y))
    return encoder


def finetune(cfg: TrainConfig, base: Encoder, head: Tensor, data: Split, name: str) -> Encoder:
    """Full fine-tuning of a copy of the encoder on one task, its head frozen (seeded by ``name``,
    so a task's weights do not depend on which other tasks this run trains)."""
    seed = cfg.seed * 1_000_003 + zlib.crc32(name.encode())
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    encoder = Encoder(cfg.hidden, cfg.features)
    encoder.load_state_dict(base.state_dict())
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.finetune_steps)
    for _ in range(cfg.finetune_steps):
        idx = torch.randint(len(data), (min(cfg.batch, len(data)),), generator=g)
        _step(opt, sched, nn.functional.cross_entropy(logits(encoder(data.x[idx]), head), data.y[idx]))
    return encoder


class Cache:
    """``<root>/<config hash>/<name>.safetensors``: train once, reuse on every later run."""

    def __init__(self, root: str, cfg: TrainConfig) -> None:
        self.dir = os.path.join(root, cfg.key())
        self.cfg = cfg
        self.trained: list[str] = []  # what this process had to train (the rest was cached)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.safetensors")

    def get(self, name: str, train: Callable[[], Encoder]) -> Encoder:
        """The encoder ``name``, trained and saved first if it is not cached yet."""
        path = self.path(name)
        encoder = Encoder(self.cfg.hidden, self.cfg.features)
        if os.path.exists(path):
            encoder.load_state_dict(load_file(path))
        else:
            encoder = train()
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "config.json"), "w") as f:
                json.dump(asdict(self.cfg), f, indent=1)
            tmp = path + ".tmp"
            save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, tmp)
            os.replace(tmp, path)  # atomic: an interrupted run never leaves half a checkpoint
            self.trained.append(name)
        return encoder.eval()


@dataclass
class Zoo:
    """The pretrained encoder, every fine-tuned checkpoint (as files, for tvlang) and the heads.

    ``paths`` keys: ``base``; each task name (fine-tuned on it); ``D_fewshot`` and ``D_full``
    (the analogy's D, fine-tuned on its few images / on all of them).  ``heads`` has one per
    task; the analogy's four tasks share the control's head (see :func:`build_zoo`)."""

    encoder: Encoder
    paths: dict[str, str]
    heads: dict[str, Tensor]
    trained: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def weights(self, name: str) -> dict[str, Tensor]:
        """A checkpoint as trained (to score it; edits go through tvlang)."""
        return load_file(self.paths[name])


def build_zoo(cfg: TrainConfig, digits: Digits, tasks: Iterable[str], cache_root: str) -> Zoo:
    """Pretrain, then fine-tune every task the experiments need (cached).

    The target tasks stand for the paper's datasets, each with its own classes, so each gets
    its own head.  The analogy's tasks are the same ten digits under different artifacts --
    in CLIP they would share one zero-shot head, made from the same class names -- so they
    share the control's head, and D needs no data of its own for it."""
    start = time.perf_counter()
    cache = Cache(cache_root, cfg)
    base = cache.get("base", partial(pretrain, cfg, digits))
    paths = {"base": cache.path("base")}
    heads: dict[str, Tensor] = {}
    for name in dict.fromkeys([CONTROL, *tasks, *ANALOGY[:3]]):  # ordered, without repeats
        data = digits.task(name, "train")
        heads[name] = heads[CONTROL] if name in ANALOGY else class_mean_head(base, data)
        cache.get(name, partial(finetune, cfg, base, heads[name], data, name))
        paths[name] = cache.path(name)
    d_name = ANALOGY[3]
    heads[d_name] = heads[CONTROL]
    few = digits.fewshot(d_name, cfg.fewshot, cfg.seed)
    for tag, data in (("D_fewshot", few), ("D_full", digits.task(d_name, "train"))):
        cache.get(tag, partial(finetune, cfg, base, heads[d_name], data, tag))
        paths[tag] = cache.path(tag)
    return Zoo(base, paths, heads, cache.trained, time.perf_counter() - start)
