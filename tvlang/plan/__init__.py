"""Planning: the per-tensor passes, chunking and memory, as a printable value."""

from tvlang.plan.plan import (
    Copy,
    Plan,
    PlannedInput,
    PlannedOutput,
    TensorTask,
    WeightedSum,
    human_bytes,
)
from tvlang.plan.planner import build_plan, parse_dtype

__all__ = [
    "Copy",
    "Plan",
    "PlannedInput",
    "PlannedOutput",
    "TensorTask",
    "WeightedSum",
    "build_plan",
    "human_bytes",
    "parse_dtype",
]
