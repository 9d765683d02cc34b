"""Which device a run uses, decided without importing torch where the answer cannot be a GPU.

``cpu`` never needs torch.  ``auto`` picks the GPU only when one may be present: a cheap look for
a GPU driver first (``/proc/driver/nvidia``, ``/dev/nvidia0``, ``/dev/kfd`` or ``nvidia-smi`` on
the ``PATH``), and only then torch and Triton (:func:`tvlang.backends.gpu.resolve_gpu`), which
cost about a second to import.  ``cuda`` always asks torch (it must say why the GPU is missing).
"""

from __future__ import annotations

import os
import shutil

from tvlang.errors import TvParamError
from tvlang.options import DEVICES


def gpu_possible() -> bool:
    """Whether a GPU driver may be there (False: no GPU for torch to find either)."""
    markers = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd")
    return any(os.path.exists(m) for m in markers) or shutil.which("nvidia-smi") is not None


def resolve_device(requested: str) -> str:
    """``cpu``, ``cuda`` or ``interpret`` (see :func:`tvlang.backends.gpu.resolve_gpu`)."""
    if requested not in DEVICES:
        raise TvParamError(f"unknown device {requested!r}", help="choose cpu, cuda or auto", code="E402")
    if requested == "cpu" or (requested == "auto" and not gpu_possible()):
        return "cpu"
    from tvlang.backends.gpu import resolve_gpu

    return resolve_gpu(requested)


__all__ = ["gpu_possible", "resolve_device"]
