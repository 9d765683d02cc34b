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
    from tvlang.api import Options, Program, compile, compile_file, delta, evaluate, task_vector

_API = ("Options", "Program", "compile", "compile_file", "delta", "evaluate", "task_vector")


def __getattr__(name: str) -> Any:
    """The API is imported on first use: ``import tvlang`` (and the CLI's start, where Ctrl-C and
    ``--help`` must answer at once) stays light until something needs torch."""
    if name in _API:
        import tvlang.api

        return getattr(tvlang.api, name)
    raise AttributeError(f"module 'tvlang' has no attribute {name!r}")


__all__ = [
    "Options",
    "Program",
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
    "task_vector",
]
