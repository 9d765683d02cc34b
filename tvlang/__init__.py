"""tvlang: a small language and compiler for model-weight arithmetic.

Write edits such as ``base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic``;
tvlang checks them, plans them per tensor and streams the checkpoints through
fused, chunked kernels without materialising a full model.
"""

from tvlang.api import Options, Program, __version__, compile, compile_file, delta, evaluate, task_vector
from tvlang.errors import (
    TvError,
    TvInputError,
    TvNameError,
    TvOutputError,
    TvParamError,
    TvSyntaxError,
    TvTypeError,
)
from tvlang.tune import Range, Trial, TuneResult, log_range, tune

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
