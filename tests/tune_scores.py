"""Score functions that `tvlang tune --score tests.tune_scores:NAME` imports in tests/test_tune_cli.py."""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

TARGET_LAM = 0.3


def closeness(model: Any) -> float:
    """Highest (0) when the embedding is base + 0.3·(ft − base): the checkpoints are named by
    $TVLANG_TUNE_CKPT."""
    root = os.environ["TVLANG_TUNE_CKPT"]
    name = "model.embed_tokens.weight"
    with safe_open(os.path.join(root, "base", "model.safetensors"), "pt") as f:
        base = f.get_tensor(name).double()
    with safe_open(os.path.join(root, "ft", "model.safetensors"), "pt") as f:
        ft = f.get_tensor(name).double()
    weights = model.state_dict()[name].double()
    return -float(((weights - (base + TARGET_LAM * (ft - base))) ** 2).mean()) * 1e6


CALLS = [0]


def interrupting(model: Any) -> float:
    """closeness, with Ctrl-C pressed during the third trial."""
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise KeyboardInterrupt
    return closeness(model)
