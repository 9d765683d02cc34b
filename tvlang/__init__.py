"""tvlang: a small language and compiler for model-weight arithmetic.

Write edits such as ``base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic``;
tvlang checks them, plans them per tensor and streams the checkpoints through
fused, chunked kernels without materialising a full model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tvlang.errors import (
    TvError,
    TvInputError,
    TvNameError,
    TvOutputError,
    TvParamError,
    TvSyntaxError,
    TvTypeError,
)
from tvlang.version import __version__

if TYPE_CHECKING:
    from tvlang.api import Program, compile, compile_file, delta, evaluate, task_vector
    from tvlang.options import Options
    from tvlang.tuning import Range, Trial, TuneResult, log_range, tune

# name -> the module that defines it, imported on first use
_LAZY = {
    **dict.fromkeys(("Program", "compile", "compile_file", "delta", "evaluate", "task_vector"), "api"),
    "Options": "options",
    **dict.fromkeys(("Range", "Trial", "TuneResult", "log_range", "tune"), "tuning"),
}


def __getattr__(name: str) -> Any:
    """The API is imported on first use: ``import tvlang`` (and the CLI's start, where Ctrl-C and
    ``--help`` must answer at once) stays light until something needs torch."""
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"tvlang.{module}"), name)
    raise AttributeError(f"module 'tvlang' has no attribute {name!r}")


__all__ = [
    "Options",
    "Program",
    "Range",
    "Trial",
    "TuneResult",
    "TvError",
    "TvInputError",
    "TvNameError",
    "TvOutputError",
    "TvParamError",
    "TvSyntaxError",
    "TvTypeError",
    "__version__",
    "compile",
    "compile_file",
    "delta",
    "evaluate",
    "log_range",
    "task_vector",
    "tune",
]
