"""Measuring results against exact ones, in units of the result dtype's last place.

>>> import torch
>>> exact = torch.tensor([1.0 + 2**-8], dtype=torch.float64)  # halfway between two bf16 values
>>> ulp_error(torch.tensor([1.0], dtype=torch.bfloat16), exact).item()
0.5
"""

from __future__ import annotations

import torch

# (explicit mantissa bits, smallest normal exponent) per float dtype
_FORMATS = {
    torch.bfloat16: (7, -126),
    torch.float16: (10, -14),
    torch.float32: (23, -126),
    torch.float64: (52, -1022),
}


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values around each exact (float64) value."""
    mant, emin = _FORMATS[dtype]
    _, exp = torch.frexp(exact.abs().to(torch.float64))  # |x| = m * 2**exp, 0.5 <= m < 1
    e = torch.clamp(exp.to(torch.float64) - 1, min=emin)
    return torch.pow(2.0, e - mant)


def correctly_rounded(result: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Where ``result`` is ``exact`` rounded to nearest, ties to even (a tie rounded the other way
    is half an ulp off too, but not the correctly rounded value).

    >>> exact = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8], dtype=torch.float64)  # two ties
    >>> correctly_rounded(torch.tensor([1.0, 1.0 + 2**-7], dtype=torch.bfloat16), exact).tolist()
    [True, False]
    """
    err = ulp_error(result, exact)
    bits = result.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[result.element_size()])
    return (err < 0.5) | ((err == 0.5) & (bits % 2 == 0))


def ulp_error(result: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``|result - exact|`` in ulps of ``result.dtype`` at ``exact``: ≤ 0.5 is correctly rounded,
    < 1 is within one rounding."""
    exact = exact.to(torch.float64)
    return (result.to(torch.float64) - exact).abs() / ulp(exact, result.dtype)
