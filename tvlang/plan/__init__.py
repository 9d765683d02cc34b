"""Planning: the per-tensor passes, chunking and memory, as a printable value."""

from tvlang.plan.plan import (
    Copy,
    Plan,
    PlannedInput,
    PlannedOutput,
    TensorMeta,
    TensorTask,
    WeightedSum,
    human_bytes,
)
from tvlang.plan.planner import DEFAULT_MEMORY, build_plan, parse_dtype

__all__ = [
    "DEFAULT_MEMORY",
    "Copy",
    "Plan",
    "PlannedInput",
    "PlannedOutput",
    "TensorMeta",
    "TensorTask",
    "WeightedSum",
    "build_plan",
    "human_bytes",
    "parse_dtype",
]
