"""Shared fixtures: tiny generated checkpoints, never a download."""

from __future__ import annotations

import os

import pytest
import torch

from tvlang.synth import llama_shapes, make_family

NAMES = ("base", "amazon_sent", "amazon_lm", "yelp_lm", "toxic")
MISSION = "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic"

# Regenerate golden files with: TVLANG_REGEN_GOLDEN=1 python -m pytest tests
REGEN = os.environ.get("TVLANG_REGEN_GOLDEN") == "1"


@pytest.fixture(scope="session")
def small_shapes() -> dict[str, tuple[int, ...]]:
    return llama_shapes(hidden=32, layers=2, vocab=96)


def family(
    tmp_path_factory: pytest.TempPathFactory, dtype: torch.dtype, layout: str, shards: int = 1
) -> dict[str, str]:
    d = tmp_path_factory.mktemp(f"family-{str(dtype).split('.')[-1]}-{layout}")
    return make_family(
        str(d),
        NAMES,
        llama_shapes(hidden=32, layers=2, vocab=96),
        dtype=dtype,
        layout=layout,
        base_shards=shards,
    )


@pytest.fixture(scope="session")
def bf16_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return family(tmp_path_factory, torch.bfloat16, "file")


@pytest.fixture(scope="session")
def bf16_sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return family(tmp_path_factory, torch.bfloat16, "dir", shards=3)


@pytest.fixture(scope="session")
def fp32_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return family(tmp_path_factory, torch.float32, "file")


def golden(path: str, actual: str) -> None:
    """Compare with a golden file (or rewrite it when regenerating)."""
    full = os.path.join(os.path.dirname(__file__), "golden", path)
    if REGEN or not os.path.exists(full):
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(actual)
        if not REGEN:
            pytest.fail(f"golden file {path} was missing and has been written; check it and rerun")
    with open(full) as f:
        expected = f.read()
    assert actual == expected, f"differs from golden {path} (TVLANG_REGEN_GOLDEN=1 to regenerate)"
