"""Fused CPU kernels: a :class:`~tvlang.codegen.spec.KernelSpec` as one C loop, compiled by the
system C compiler, cached on disk, called through ctypes.

Why not torch.compile/Inductor: it would also give one vectorised loop, but its import and
warm compile cost about 4 s and 200 MiB of resident memory (measured on this project's machines) — more
than the whole plan-and-compile budget of a merge.  A generated C loop compiles in about a
tenth of a second, loads in microseconds, and ctypes releases the GIL while it runs, so the
runtime's worker threads run kernels in parallel.

The loop does exactly what the eager path does, operation for operation (see
:mod:`tvlang.codegen.spec`): explicit ``fma`` calls, ``-ffp-contract=off`` so that the
compiler fuses nothing else, round-to-nearest-even conversions written out in integer
arithmetic.  Each call returns how many elements of its rounded outputs are NaN or ±inf, so
the non-finite check costs no extra pass.

Weights are not in the source: they are passed at each call (and rounded to the accumulation
type there, as a literal would be), so merges that differ only in their coefficients share one
compiled library, and the disk cache holds one kernel per structure and dtypes.  Only fixed
identifiers and the pass's structure reach the compiler; no name or string from a program does.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvlang.backends.reductions import BLOCK
from tvlang.codegen.spec import ACC, SUM, KernelSpec, Stmt

FLAGS = (
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",  # no fused multiply-adds but the explicit ones: the eager path's roundings
    "-fno-math-errno",  # lets sqrt vectorise; results unchanged
    "-fno-trapping-math",  # lets selects vectorise; results unchanged
)

_CTYPE = {"F64": "double", "F32": "float", "F16": "_Float16", "BF16": "uint16_t"}
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

PRELUDE = r"""#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN becomes 0xFFFF, as in torch's vectorised conversion. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0xFFFF : r;
}

static inline uint16_t bits16(_Float16 h) {
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static inline uint32_t bits32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline uint64_t bits64(double d) {
    uint64_t u;
    memcpy(&u, &d, 8);
    return u;
}

/* torch.minimum / torch.maximum: NaN propagates; -0 is below +0.  Written as selects
   (no branches), so that loops using them still vectorise. */
#define TV_MINMAX(NAME, T, COPYSIGN, CMP, NEGATIVE_ZERO_WINS)                      \
    static inline T NAME(T a, T b) {                                            \
        const T m = (a CMP b) ? a : b;                                          \
        const int negative = COPYSIGN(1, a) < 0; /* (signbit does not vectorise) */ \
        const T z = (negative == NEGATIVE_ZERO_WINS) ? a : b;                   \
        const T r = a == b ? z : m; /* equal: ±0 decided by the sign */         \
        return (a != a || b != b) ? a + b : r;                                  \
    }
TV_MINMAX(tv_minf, float, copysignf, <, 1)
TV_MINMAX(tv_maxf, float, copysignf, >, 0)
TV_MINMAX(tv_min, double, copysign, <, 1)
TV_MINMAX(tv_max, double, copysign, >, 0)
#define TV_SIGN(x) ((x) > 0 ? 1 : (x) < 0 ? -1 : 0)

/* The counter-based generator of tvlang.backends.program: fmix64(key ^ (i * golden)). */
static inline uint64_t tv_mix(uint64_t key, uint64_t i) {
    uint64_t x = key ^ (i * 0x9E3779B97F4A7C15ull);
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ull;
    x ^= x >> 33;
    return x;
}
"""


def _literal(x: float, t: str) -> str:
    if math.isnan(x):
        return f"({t})NAN"
    if math.isinf(x):
        return f"({t})({'-' if x < 0 else ''}INFINITY)"
    return f"({t}){x.hex()}"


def c_source(spec: KernelSpec) -> str:
    """The C source of ``spec``: ``int64_t tv_kernel(n, start, in, out, params, keys, weights)``
    computes elements [0, n) of every output and returns how many rounded results are NaN or ±inf."""
    t = "double" if spec.acc == "F64" else "float"
    f = "" if t == "double" else "f"  # libm suffix
    body: list[str] = []
    names: dict[int, str] = {}
    hoisted: list[str] = []  # per-call values, outside the loop
    w = 0  # the next weight's index

    def val(i: int) -> str:
        """Statement ``i`` as a value of the accumulation type."""
        if spec.body[i].op == "param":
            return f"{names[i]}_t"
        return names[i]

    for i, s in enumerate(spec.body):
        name = f"v{i}"
        names[i] = name
        a = [val(j) for j in s.args]
        if s.op == "param":
            hoisted.append(f"    const double {name} = params[{s.attr}];")
            hoisted.append(f"    const {t} {name}_t = ({t}){name};")
            continue
        if s.op == "load":
            dtype = spec.inputs[int(s.attr)]  # type: ignore[call-overload]
            src = f"in{s.attr}[i]"
            expr = f"bf16_to_f32({src})" if dtype == "BF16" else src
            body.append(f"        const {t} {name} = ({t}){expr};")
        elif s.op == "const":
            body.append(f"        const {t} {name} = {_literal(float(s.attr), t)};")  # type: ignore[arg-type]
        elif s.op == "wsum":
            body.append(f"        {t} {name} = 0;")
            for j in s.args:
                hoisted.append(f"    const double w{w} = weights[{w}];")
                if spec.is_param(j):  # a number: w·p in float64, rounded, added
                    body.append(f"        {name} = {name} + ({t})(w{w} * {names[j]});")
                else:
                    hoisted.append(f"    const {t} w{w}_t = ({t})w{w};")  # as torch rounds alpha
                    body.append(f"        {name} = fma{f}(w{w}_t, {val(j)}, {name});")
                w += 1
        elif s.op == "neg":
            body.append(f"        const {t} {name} = -{a[0]};")
        elif s.op in ("add", "sub", "mul", "div"):
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[s.op]
            body.append(f"        const {t} {name} = {a[0]} {sym} {a[1]};")
        elif s.op == "call":
            body.append(f"        const {t} {name} = {_call(str(s.attr), a, t, f)};")
        elif s.op == "mul64":  # exact for float32 operands
            body.append(f"        const double {name} = (double){a[0]} * (double){a[1]};")
        elif s.op == "rand":
            bits = 53 if t == "double" else 24
            body.append(
                f"        const {t} {name} = ({t})({'int64_t' if bits > 31 else 'int32_t'})"
                f"(tv_mix(key{s.attr}, (uint64_t)(start + i)) >> {64 - bits})"
                f" * ({t}){(2.0**-bits).hex()};"  # (a signed conversion vectorises; the value fits)
            )
        else:
            raise ValueError(f"no C for {s}")

    finite = []
    sums = []
    for k, (i, dtype) in enumerate(spec.outputs):
        v = val(i)
        if dtype == SUM:  # added in element order, one sum per block, as block_sums does
            sums.append(k)
            body.append(f"        t{k}[i - b0] = (double){v};")
            continue
        if dtype == ACC:
            body.append(f"        out{k}[i] = {v};")
            continue
        rounded = f"r{k}"
        if dtype == "BF16":
            body.append(f"        const uint16_t {rounded} = f32_to_bf16((float){v});")
            finite.append(f"(({rounded} & 0x7F80u) != 0x7F80u)")
        elif dtype == "F16":  # through float32, as torch converts a double
            body.append(f"        const _Float16 {rounded} = (_Float16)(float){v};")
            finite.append(f"((bits16({rounded}) & 0x7C00u) != 0x7C00u)")
        elif dtype == "F32":
            body.append(f"        const float {rounded} = (float){v};")
            finite.append(f"((bits32({rounded}) & 0x7F800000u) != 0x7F800000u)")
        else:
            body.append(f"        const double {rounded} = (double){v};")
            finite.append(f"((bits64({rounded}) & 0x7FF0000000000000ull) != 0x7FF0000000000000ull)")
        body.append(f"        out{k}[i] = {rounded};")
    if finite:
        body.append(f"        bad += !({' && '.join(finite)});")

    # Every pointer is a restrict parameter of the loop's own function (GCC honours restrict on
    # parameters; on locals cast from an array it still checks aliasing at run time, and gives
    # up on vectorising past ten pointers), and per-call numbers are locals before the loop.
    hoisted.extend(f"    const uint64_t key{k} = (uint64_t)keys[{k}];" for k in range(spec.keys))
    params = [f"const {_CTYPE[d]} *restrict in{k}" for k, d in enumerate(spec.inputs)]
    args = [f"(const {_CTYPE[d]} *)in[{k}]" for k, d in enumerate(spec.inputs)]
    for k, (_, dtype) in enumerate(spec.outputs):
        ctype = "double" if dtype == SUM else t if dtype == ACC else _CTYPE[dtype]
        params.append(f"{ctype} *restrict out{k}")
        args.append(f"({ctype} *)out[{k}]")
    return "\n".join(
        [
            f"/* tvlang kernel: {len(spec.inputs)} inputs, {len(spec.outputs)} outputs,"
            f" accumulating in {t} */",
            PRELUDE,
            "static __attribute__((noinline)) int64_t tv_loop(",
            "    int64_t n, int64_t start, const double *restrict params, const int64_t *restrict keys,",
            "    const double *restrict weights,",
            *(f"    {p}{',' if k < len(params) - 1 else ') {'}" for k, p in enumerate(params)),
            "    (void)start; (void)params; (void)keys; (void)weights;",
            *hoisted,
            "    int64_t bad = 0;",
            *(_blocked(body, sums) if sums else ["    for (int64_t i = 0; i < n; i++) {", *body, "    }"]),
            "    return bad;",
            "}",
            "",
            "int64_t tv_kernel(int64_t n, int64_t start, void *const *in, void *const *out,",
            "                  const double *params, const int64_t *keys, const double *weights) {",
            f"    return tv_loop(n, start, params, keys, weights{''.join(', ' + x for x in args)});",
            "}",
            "",
        ]
    )


def _blocked(body: list[str], sums: list[int]) -> list[str]:
    """The element loop inside a loop over ``BLOCK``-element blocks: the (vectorised) element loop
    stores each summand of a block in a small buffer, then one scalar loop adds each buffer in
    element order, the sums side by side (sequential additions do not vectorise)."""
    return [
        *(f"    double t{k}[{BLOCK}];" for k in sums),
        f"    for (int64_t b0 = 0; b0 < n; b0 += {BLOCK}) {{",
        f"        const int64_t b1 = n - b0 < {BLOCK} ? n : b0 + {BLOCK};",
        "        for (int64_t i = b0; i < b1; i++) {",
        *("    " + line for line in body),
        "        }",
        *(f"        double s{k} = 0;" for k in sums),
        "        for (int64_t j = 0; j < b1 - b0; j++) {",
        *(f"            s{k} += t{k}[j];" for k in sums),
        "        }",
        *(f"        out{k}[b0 / {BLOCK}] = s{k};" for k in sums),
        "    }",
    ]


def _call(fn: str, a: list[str], t: str, f: str) -> str:
    one = f"({t})1"
    zero = f"({t})0"
    if fn in ("sqrt", "floor", "ceil", "sin", "acos", "cos", "exp", "log"):
        return f"{fn}{f}({a[0]})"
    if fn == "abs":
        return f"fabs{f}({a[0]})"
    if fn == "sign":
        return f"({t})TV_SIGN({a[0]})"
    if fn == "min":
        return f"tv_min{f}({a[0]}, {a[1]})"
    if fn == "max":
        return f"tv_max{f}({a[0]}, {a[1]})"
    if fn == "clamp":
        return f"tv_min{f}(tv_max{f}({a[0]}, {a[1]}), {a[2]})"
    if fn == "where":
        return f"({a[0]} != 0 ? {a[1]} : {a[2]})"
    sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[fn]
    return f"({a[0]} {sym} {a[1]} ? {one} : {zero})"


# ---------------------------------------------------------------------------------------------
# Compiling and loading


def compiler() -> str | None:
    """The C compiler to use: $CC, else ``cc``; None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def _host_key() -> str:
    """What a ``-march=native`` binary depends on: the CPU's model and flags, the compiler."""
    cpu = platform.processor() + platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu += "".join(sorted({ln for ln in fh if ln.startswith(("flags", "model name"))}))
    except OSError:
        pass
    return hashlib.sha256(f"{cpu}{compiler()}{FLAGS}{sys.platform}".encode()).hexdigest()[:12]


def cache_dir() -> Path:
    root = os.environ.get("TVLANG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tvlang"
    )
    return Path(root) / "kernels"


class CompileError(Exception):
    pass


@dataclass
class CKernel:
    """A loaded kernel; calling it runs the loop over one chunk (the GIL is released meanwhile)."""

    spec: KernelSpec
    _fn: Any  # the ctypes function
    _weights: Any = None  # the spec's weights, a ctypes array made once

    def __post_init__(self) -> None:
        w = self.spec.weights
        self._weights = (ctypes.c_double * max(1, len(w)))(*w)

    def __call__(
        self,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        params: list[float] | tuple[float, ...] = (),
        keys: list[int] | tuple[int, ...] = (),
        start: int = 0,
        n: int | None = None,
    ) -> int:
        """Compute elements [0, n) of ``outputs`` (contiguous, of the spec's dtypes; ``SUM`` outputs
        hold one number per block) from ``inputs`` (``n``: by default the first output's size);
        returns the number of elements whose rounded results are not all finite."""
        if n is None:
            n = outputs[0].numel() if outputs else 0
        for x in inputs:
            assert x.is_contiguous() and x.numel() == n and x.device.type == "cpu"
        for x, (_, dtype) in zip(outputs, self.spec.outputs, strict=True):
            size = -(-n // BLOCK) if dtype == SUM else n
            assert x.is_contiguous() and x.numel() == size and x.device.type == "cpu"
        ins = (ctypes.c_void_p * max(1, len(inputs)))(*[x.data_ptr() for x in inputs])
        outs = (ctypes.c_void_p * max(1, len(outputs)))(*[x.data_ptr() for x in outputs])
        ps = (ctypes.c_double * max(1, len(params)))(*params)
        ks = (ctypes.c_int64 * max(1, len(keys)))(*keys)
        return int(self._fn(n, start, ins, outs, ps, ks, self._weights))


_lock = threading.Lock()
_loaded: dict[str, CKernel] = {}


def load(spec: KernelSpec) -> CKernel:
    """The compiled kernel of ``spec``: from memory, else from the disk cache, else compiled now.
    Raises :class:`CompileError` when no compiler is there or it fails."""
    kernel = _loaded.get(spec.key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _loaded.get(spec.key)
        if kernel is None:
            kernel = _loaded[spec.key] = _load(spec)
    return kernel


def _load(spec: KernelSpec) -> CKernel:
    fn = _library(c_source(spec)).tv_kernel
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 5
    return CKernel(spec, fn)


def _library(source: str) -> ctypes.CDLL:
    """``source`` compiled to a shared library: from the disk cache, or compiled now."""
    directory = cache_dir()
    digest = hashlib.sha256(f"{source}{_host_key()}".encode()).hexdigest()[:32]
    path = directory / f"{digest}.so"  # named by what the binary is made of
    if path.exists():
        return ctypes.CDLL(str(path))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:  # no writable cache: build in a private directory, load, delete (never a shared one)
        private = tempfile.mkdtemp(prefix="tvlang-kernels-")
        try:
            return ctypes.CDLL(str(_compile(source, Path(private), Path(private) / path.name)))
        finally:
            shutil.rmtree(private, ignore_errors=True)  # a loaded library stays mapped
    return ctypes.CDLL(str(_compile(source, directory, path)))


def _compile(source: str, directory: Path, path: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise CompileError("no C compiler (set CC, or install gcc or clang)")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    src = Path(tmp).with_suffix(".c")
    src.write_text(source)
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(src), "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise CompileError(f"{cc} failed: {done.stderr.strip()[:2000]}")
        os.replace(tmp, path)  # atomic: concurrent processes see a whole library or none
    finally:
        src.unlink(missing_ok=True)
        Path(tmp).unlink(missing_ok=True)
    return path


# The k-th largest value's radix selection (tvlang.backends.reductions.KthLargest): a histogram
# of one 16-bit digit of each value's order key, among the values whose higher digits match the
# prefix found so far.  Integer counts, so the result is exactly the eager path's.
RADIX_SOURCE = r"""#include <stdint.h>
#include <string.h>

/* (Measured: one table beats four interleaved ones, 1.1 against 2.1 ns a value.) */
#define TV_HIST(NAME, FLOAT, UINT, BITS, SIGN)                                                        \
void NAME(const FLOAT *restrict x, int64_t n, int round, uint64_t prefix, int64_t *restrict hist) {    \
    const int shift = BITS - 16 * (round + 1);                                                         \
    const UINT higher = round ? (UINT)((1ull << (16 * round)) - 1) : 0;                                \
    for (int64_t i = 0; i < n; i++) {                                                                  \
        UINT u;                                                                                        \
        memcpy(&u, &x[i], sizeof u);                                                                   \
        const UINT key = (u & SIGN) ? ~u : (u ^ SIGN);                                                 \
        if (round && ((key >> (shift + 16)) & higher) != (UINT)prefix) continue;                       \
        hist[(key >> shift) & 0xFFFFu]++;                                                              \
    }                                                                                                  \
}

TV_HIST(tv_hist32, float, uint32_t, 32, 0x80000000u)
TV_HIST(tv_hist64, double, uint64_t, 64, 0x8000000000000000ull)
"""


class RadixHistogram:
    """``hist[digit] += 1`` for one round of the radix selection over a float32/float64 chunk."""

    def __init__(self) -> None:
        lib = _library(RADIX_SOURCE)
        self._fns = {torch.float32: lib.tv_hist32, torch.float64: lib.tv_hist64}
        for fn in self._fns.values():
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p]

    def __call__(self, values: torch.Tensor, round_: int, prefix: int, hist: torch.Tensor) -> None:
        assert values.is_contiguous() and hist.dtype == torch.int64 and hist.numel() >= 1 << 16
        self._fns[values.dtype](values.data_ptr(), values.numel(), round_, prefix, hist.data_ptr())


_radix: list[RadixHistogram] = []


def radix_histogram() -> RadixHistogram:
    """The compiled radix histogram (raises :class:`CompileError` without a working compiler)."""
    if not _radix:
        with _lock:
            if not _radix:
                _radix.append(RadixHistogram())
    return _radix[0]


def torch_dtype(code: str, acc: str) -> torch.dtype:
    """The torch dtype of an output pointer (``ACC``: the accumulation dtype)."""
    return _TORCH[acc if code == ACC else code]


__all__ = [
    "CKernel",
    "CompileError",
    "Stmt",
    "c_source",
    "compiler",
    "load",
    "radix_histogram",
    "torch_dtype",
]
