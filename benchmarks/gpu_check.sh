#!/usr/bin/env bash
# The GPU backend's check on a CUDA machine (H100/H200), in under 5 minutes: the GPU tests for
# real (not the interpreter), then kernel, transfer and end-to-end merge throughput against the
# CPU backend, as one JSON report in $OUT (or benchmarks/out).  See docs/gpu.md.
#
#   benchmarks/gpu_check.sh                 # everything, 5 synthetic checkpoints of 2 GiB
#   benchmarks/gpu_check.sh --size-gb 1     # smaller inputs; any gpu_check.py option passes through
#   benchmarks/gpu_check.sh --dry-run       # no GPU: the same steps on the CPU through Triton's interpreter
#
# It installs nothing that is already there.  If torch cannot see a GPU (a CPU-only build), it tries
# `pip install torch triton` (the default CUDA build); a missing triton, lark or safetensors is
# installed from pyproject's gpu and test extras.  On a machine without network access those
# packages must be present already.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done

have() { python -c "import $1" 2>/dev/null; }
if [[ $dry == 0 ]] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device; trying the default (CUDA) build of torch and triton" >&2
  python -m pip install -q torch triton || echo "gpu_check: could not install torch/triton" >&2
fi
if ! have triton || ! have lark || ! have safetensors || ! have pytest; then
  python -m pip install -q -e ".[gpu,test]" || echo "gpu_check: could not install the gpu/test extras" >&2
fi
exec python benchmarks/gpu_check.py "$@"
