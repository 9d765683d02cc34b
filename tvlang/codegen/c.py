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
import functools
import hashlib
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvlang.cache import cache_root
from tvlang.chunks import Chunk, address, numel
from tvlang.codegen.spec import ACC, SUM, KernelSpec, Stmt
from tvlang.dtypes import DTYPES, ITEMSIZE
from tvlang.ops import ELEMENTWISE
from tvlang.plan.plan import BLOCK, LANES

FLAGS = (
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",  # no fused multiply-adds but the explicit ones: the eager path's roundings
    "-fno-math-errno",  # lets sqrt vectorise; results unchanged
    "-fno-trapping-math",  # lets selects vectorise; results unchanged
) + (
    # x86 only (other compilers' targets reject it); where the CPU has 512-bit vectors, TIES's
    # output kernel runs 16 % faster in the cache.  Lane count never changes a result: no
    # floating-point sum is reassociated across lanes.
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)


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

/* The counter-based generator of tvlang.backends.interpreter: fmix64(key ^ (i * golden)). */
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


# A block sum's lanes (tvlang.plan.plan.LANES), for kernels with sums: one vector of the compiler's
# vector extension (GCC and Clang; lowered to narrower registers where 512-bit ones are missing).
LANES_PRELUDE = f"""typedef double tv_lanes __attribute__((vector_size({8 * LANES})));

static inline tv_lanes tv_lanes_at(const double *p) {{
    tv_lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}}
"""


# Functions of whole rows (tvlang.ops rowrank): a row's stable ranks, by an LSD radix sort of order
# keys 8 bits a pass (stable, so equal values keep their order: ties by position).  NaN ranks above
# everything and -0 equals +0, as torch's sort has it; a pass whose digit is the same for the whole
# row is skipped.  Integer work: the ranks are exactly the eager path's.
ROW_PRELUDE = r"""#include <stdlib.h>

#define TV_RANK(NAME, T, UINT, BITS)                                                                 \
static void NAME(const T *restrict x, int64_t n, UINT *ka, UINT *kb,               \
                 uint32_t *pa, uint32_t *pb, T *restrict out) {                                    \
    const UINT sign = (UINT)1 << (BITS - 1);                                                         \
    if (n == 1) { out[0] = (T)0.5; return; }                                                         \
    for (int64_t i = 0; i < n; i++) {                                                                \
        const T v = x[i] == 0 ? (T)0 : x[i];                                                         \
        UINT u;                                                                                      \
        memcpy(&u, &v, sizeof u);                                                                    \
        ka[i] = v != v ? ~(UINT)0 : (u & sign) ? ~u : (u | sign);                                    \
        pa[i] = (uint32_t)i;                                                                         \
    }                                                                                                \
    for (int shift = 0; shift < BITS; shift += 8) {                                                  \
        int64_t count[256] = {0};                                                                    \
        for (int64_t i = 0; i < n; i++) count[(ka[i] >> shift) & 255]++;                             \
        if (count[(ka[0] >> shift) & 255] == n) continue;                                            \
        int64_t total = 0;                                                                           \
        for (int d = 0; d < 256; d++) { const int64_t c = count[d]; count[d] = total; total += c; }  \
        for (int64_t i = 0; i < n; i++) {                                                            \
            const int64_t o = count[(ka[i] >> shift) & 255]++;                                       \
            kb[o] = ka[i];                                                                           \
            pb[o] = pa[i];                                                                           \
        }                                                                                            \
        UINT *kt = ka; ka = kb; kb = kt;                                                             \
        uint32_t *pt = pa; pa = pb; pb = pt;                                                         \
    }                                                                                                \
    const T scale = (T)(n - 1);                                                                      \
    for (int64_t r = 0; r < n; r++) out[pa[r]] = (T)r / scale;                                       \
}

TV_RANK(tv_rank32, float, uint32_t, 32)
TV_RANK(tv_rank64, double, uint64_t, 64)
"""


def float8_bits(code: str, byte: int) -> int:
    """The float32 bit pattern torch widens a float8 byte to (c10's conversions, NaN payloads too)."""
    sign = (byte & 0x80) << 24
    if code == "F8_E5M2":  # the top byte of a float16: IEEE's widening, NaN made quiet
        exp, man = (byte >> 2) & 0x1F, byte & 0x3
        if exp == 0x1F:
            return sign | 0x7F800000 | (man << 21) | (0x400000 if man else 0)
        value = math.ldexp(man / 4 + (1 if exp else 0), (exp if exp else 1) - 15)
    else:  # e4m3fn: no infinities; S.1111.111 is NaN
        exp, man = (byte >> 3) & 0xF, byte & 0x7
        if exp == 0xF and man == 0x7:
            return sign | 0x7FF00000
        value = math.ldexp(man / 8 + (1 if exp else 0), (exp if exp else 1) - 7)
    if value == 0:
        return sign
    m, e = math.frexp(value)  # value = m·2^e, 0.5 ≤ m < 1: a normal float32 here (exact)
    return sign | ((e + 126) << 23) | (int(m * 2**24) & 0x7FFFFF)


def _f8_table(code: str) -> str:
    name = f"tv_{code.lower()}"
    words = [f"0x{float8_bits(code, b):08X}u" for b in range(256)]
    rows = ["    " + ", ".join(words[r : r + 8]) + "," for r in range(0, 256, 8)]
    return "\n".join(
        [
            f"/* {code}: each of the 256 values as float32 bits (every float8 value is a float32). */",
            f"static const uint32_t {name}_bits[256] = {{",
            *rows,
            "};",
            f"static inline float {name}(uint8_t b) {{",
            "    float f;",
            f"    memcpy(&f, &{name}_bits[b], 4);",
            "    return f;",
            "}",
            "",
        ]
    )


# How a kernel widens an input that is not a C float type: a decoding function of the element.
_DECODE = {"BF16": "bf16_to_f32", "F8_E4M3": "tv_f8_e4m3", "F8_E5M2": "tv_f8_e5m2"}
_F8_TABLES = {code: _f8_table(code) for code in ("F8_E4M3", "F8_E5M2")}


def _ctype(code: str) -> str:
    """The C element type of a kernel pointer (tvlang.dtypes)."""
    ctype = DTYPES[code].c
    assert ctype is not None, code
    return ctype


def _literal(x: float, t: str) -> str:
    if math.isnan(x):
        return f"({t})NAN"
    if math.isinf(x):
        return f"({t})({'-' if x < 0 else ''}INFINITY)"
    return f"({t}){x.hex()}"


def c_source(spec: KernelSpec) -> str:
    """The C source of ``spec``: ``int64_t tv_kernel(n, start, in, out, params, keys, weights)``
    computes elements [0, n) of every output and returns how many rounded results are NaN or ±inf.
    A spec with functions of whole rows takes the row length too (``row``, after ``weights``), works
    row by row, and returns -1 (nothing computed) when ``n`` is not whole rows or memory runs out."""
    t = "double" if spec.acc == "F64" else "float"
    f = "" if t == "double" else "f"  # libm suffix
    names = {i: f"v{i}" for i in range(len(spec.body))}
    hoisted: list[str] = []  # per-call values, outside the loop
    first_weight = {}  # the index of each weighted sum's first weight
    w = 0
    for i, s in enumerate(spec.body):
        if s.op == "wsum":
            first_weight[i] = w
            w += len(s.args)

    def val(i: int) -> str:
        """Statement ``i`` as a value of the accumulation type."""
        if spec.body[i].op == "param":
            return f"{names[i]}_t"
        return names[i]

    def statement(i: int, body: list[str]) -> None:
        """The lines computing statement ``i`` (per-call values go to ``hoisted``)."""
        s = spec.body[i]
        name = names[i]
        a = [val(j) for j in s.args]
        if s.op == "param":
            hoisted.append(f"    const double {name} = params[{s.attr}];")
            hoisted.append(f"    const {t} {name}_t = ({t}){name};")
        elif s.op == "load":
            dtype = spec.inputs[int(s.attr)]  # type: ignore[call-overload]
            src = f"in{s.attr}[i]"
            expr = f"{_DECODE[dtype]}({src})" if dtype in _DECODE else src
            body.append(f"        const {t} {name} = ({t}){expr};")
        elif s.op == "wsum":
            body.append(f"        {t} {name} = 0;")
            for k, j in enumerate(s.args, first_weight[i]):
                hoisted.append(f"    const double w{k} = weights[{k}];")
                if spec.is_param(j):  # a number: w·p in float64, rounded, added
                    body.append(f"        {name} = {name} + ({t})(w{k} * {names[j]});")
                else:
                    hoisted.append(f"    const {t} w{k}_t = ({t})w{k};")  # as torch rounds alpha
                    body.append(f"        {name} = fma{f}(w{k}_t, {val(j)}, {name});")
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

    finite: list[str] = []
    sums: list[int] = []

    def output(k: int, i: int, dtype: str, body: list[str], blocked: bool = True) -> None:
        """The lines writing output ``k`` (statement ``i``) at element ``i``."""
        v = val(i)
        if dtype == SUM:  # one sum per block, its lanes added as block_sums does
            sums.append(k)
            if blocked:
                body.append(f"        t{k}[i - b0] = (double){v};")
            else:  # row by row: the running lanes, added and stored at each block's end
                body.append(f"        s{k}[i % {LANES}] += (double){v};")
                body.append(f"        if ((i + 1) % {BLOCK} == 0 || i + 1 == n) {{")
                body.append(f"            out{k}[i / {BLOCK}] = {_pairwise(f's{k}')};")
                body.append(f"            for (int l = 0; l < {LANES}; l++) s{k}[l] = 0;")
                body.append("        }")
            return
        if dtype == ACC:
            body.append(f"        out{k}[i] = {v};")
            return
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

    rows = has_rows(spec)
    if rows:
        loop = _row_loop(spec, t, statement, output, finite, sums)
    else:
        body: list[str] = []
        for i in range(len(spec.body)):
            statement(i, body)
        for k, (i, dtype) in enumerate(spec.outputs):
            output(k, i, dtype, body)
        if finite:  # counted in 32-bit lanes, per span: a 64-bit count would widen every vector
            body.append(f"        nbad += !({' && '.join(finite)});")
        sizes = [ITEMSIZE[d] for d in spec.inputs]
        if sums:
            loop = _blocked(body, sums, bool(finite), sizes)
        elif finite:
            loop = _spans(body, sizes)
        else:
            loop = _element_loop("0", "n", body, sizes)

    # Every pointer is a restrict parameter of the loop's own function (GCC honours restrict on
    # parameters; on locals cast from an array it still checks aliasing at run time, and gives
    # up on vectorising past ten pointers), and per-call numbers are locals before the loop.
    hoisted.extend(f"    const uint64_t key{k} = (uint64_t)keys[{k}];" for k in range(spec.keys))
    params = [f"const {_ctype(d)} *restrict in{k}" for k, d in enumerate(spec.inputs)]
    args = [f"(const {_ctype(d)} *)in[{k}]" for k, d in enumerate(spec.inputs)]
    for k, (_, dtype) in enumerate(spec.outputs):
        ctype = "double" if dtype == SUM else t if dtype == ACC else _ctype(dtype)
        params.append(f"{ctype} *restrict out{k}")
        args.append(f"({ctype} *)out[{k}]")
    row_param = ", int64_t row" if rows else ""
    return "\n".join(
        [
            f"/* tvlang kernel: {len(spec.inputs)} inputs, {len(spec.outputs)} outputs,"
            f" accumulating in {t} */",
            PRELUDE,
            *(_F8_TABLES[d] for d in sorted(set(spec.inputs)) if d in _F8_TABLES),
            *([ROW_PRELUDE] if rows else [LANES_PRELUDE] if sums else []),
            "static __attribute__((noinline)) int64_t tv_loop(",
            f"    int64_t n, int64_t start{row_param}, const double *restrict params,"
            " const int64_t *restrict keys,",
            "    const double *restrict weights,",
            *(f"    {p}{',' if k < len(params) - 1 else ') {'}" for k, p in enumerate(params)),
            "    (void)start; (void)params; (void)keys; (void)weights;",
            *hoisted,
            "    int64_t bad = 0;",
            *loop,
            "    return bad;",
            "}",
            "",
            "int64_t tv_kernel(int64_t n, int64_t start, void *const *in, void *const *out,",
            "                  const double *params, const int64_t *keys, const double *weights"
            + (", int64_t row) {" if rows else ") {"),
            f"    return tv_loop(n, start{', row' if rows else ''}, params, keys, weights"
            f"{''.join(', ' + x for x in args)});",
            "}",
            "",
        ]
    )


def has_rows(spec: KernelSpec) -> bool:
    """Whether ``spec`` holds functions of whole rows (its kernel then takes the row length)."""
    return any(s.op == "row" for s in spec.body)


def _row_loop(
    spec: KernelSpec,
    t: str,
    statement: Callable[[int, list[str]], None],
    output: Callable[..., None],
    finite: list[str],
    sums: list[int],
) -> list[str]:
    """The loop of a spec with functions of whole rows: row by row, in stages.  Stage 0 computes
    what needs no row function; a row function of a stage-k value is known after stage k's loop
    over the row (a per-row number for sums and maxima, a row of ranks), and the statements that
    use it are in stage k + 1.  Values used in a later stage are kept in row-length buffers; loads,
    parameters and constants are simply redone.  Sums are added in lanes, as block_sums does."""
    body = spec.body
    cheap = {i for i, s in enumerate(body) if s.op in ("load", "param")}
    stage: dict[int, int] = {}
    for i, s in enumerate(body):
        base = max((stage[a] for a in s.args), default=0)
        stage[i] = 0 if i in cheap else base + 1 if s.op == "row" else base
    last = max(stage.values())
    out_stage = {k: stage[i] for k, (i, _) in enumerate(spec.outputs)}
    # values crossing stages: the operands of row functions, and values a later stage uses
    kept = {s.args[0] for s in body if s.op == "row"}
    kept |= {
        a
        for i, s in enumerate(body)
        if s.op != "row"
        for a in s.args
        if a not in cheap and body[a].op != "row" and stage[a] < stage[i]
    }
    for i in sorted(cheap):
        if body[i].op == "param":
            statement(i, [])  # (hoisted: per-call numbers)
    ranks = [i for i, s in enumerate(body) if s.op == "row" and s.attr == "rowrank"]
    lines = ["    if (row <= 0 || n % row != 0) return -1;"]
    arrays = [(f"b{i}", t) for i in sorted(kept)] + [(f"k{i}", t) for i in ranks]
    key = "uint64_t" if t == "double" else "uint32_t"
    if ranks:
        arrays += [("ka", key), ("kb", key), ("pa", "uint32_t"), ("pb", "uint32_t")]
    lines.append(f"    if (row > {2**32 - 1}) return -1;")
    lines.append(
        "    char *mem = malloc((size_t)row * ("
        + " + ".join(f"sizeof({ct})" for _, ct in arrays)
        + ") + 64);"
    )
    lines.append("    if (!mem) return -1;")
    before: list[str] = []  # the arrays laid out before this one
    for name, ct in arrays:
        offset = f"(size_t)row * ({' + '.join(f'sizeof({x})' for x in before)})" if before else "0"
        lines.append(f"    {ct} *restrict {name} = ({ct} *)(mem + {offset});")
        before.append(ct)
    lines += [f"    double s{k}[{LANES}] = {{0}};" for k, (_, d) in enumerate(spec.outputs) if d == SUM]
    lines.append("    for (int64_t row0 = 0; row0 < n; row0 += row) {")
    for k in range(last + 1):
        if k > 0:  # the row functions of stage k
            for i, s in enumerate(body):
                if s.op != "row" or stage[i] != k:
                    continue
                a = s.args[0]
                src = f"b{a}"
                if s.attr == "rowsum":
                    lines += [
                        f"        double acc{i} = 0;",
                        f"        for (int64_t j = 0; j < row; j++) acc{i} += (double){src}[j];",
                        f"        const {t} rs{i} = ({t})acc{i};",
                    ]
                elif s.attr == "rowmax":
                    lines += [
                        f"        {t} m{i} = {src}[0];",
                        "        for (int64_t j = 1; j < row; j++) {",
                        f"            if ({src}[j] > m{i}) m{i} = {src}[j];",
                        "        }",
                        "        for (int64_t j = 0; j < row; j++) {  /* torch.amax: NaN, the canonical one */",
                        f"            if ({src}[j] != {src}[j]) {{ m{i} = ({t})NAN; break; }}",
                        "        }",
                        f"        const {t} rs{i} = m{i};",
                    ]
                else:
                    rank = "tv_rank64" if t == "double" else "tv_rank32"
                    lines.append(f"        {rank}({src}, row, ka, kb, pa, pb, k{i});")
        stage_body: list[str] = []
        # the statements computed in this stage, and the values it reads
        needed: set[int] = set()
        todo = [i for i in range(len(body)) if stage[i] == k and i not in cheap and body[i].op != "row"]
        todo += [i for kk, (i, _) in enumerate(spec.outputs) if out_stage[kk] == k]
        todo += [i for i in kept if stage[i] == k]
        while todo:
            i = todo.pop()
            if i in needed:
                continue
            needed.add(i)
            if stage[i] == k and i not in cheap and body[i].op != "row":
                todo.extend(body[i].args)
        for i in sorted(needed):
            s = body[i]
            if i in cheap:
                if s.op != "param":
                    statement(i, stage_body)
            elif s.op == "row":
                src = f"k{i}[i - row0]" if s.attr == "rowrank" else f"rs{i}"
                stage_body.append(f"        const {t} v{i} = {src};")
            elif stage[i] < k:
                stage_body.append(f"        const {t} v{i} = b{i}[i - row0];")
            else:
                statement(i, stage_body)
        for i in sorted(kept):
            if stage[i] == k:
                if body[i].op == "row":
                    src = f"k{i}[i - row0]" if body[i].attr == "rowrank" else f"rs{i}"
                    stage_body.append(f"        b{i}[i - row0] = {src};")
                else:
                    stage_body.append(f"        b{i}[i - row0] = v{i};")
        finite.clear()
        for kk, (i, dtype) in enumerate(spec.outputs):
            if out_stage[kk] == k:
                output(kk, i, dtype, stage_body, blocked=False)
        if finite:
            stage_body.append(f"        bad += !({' && '.join(finite)});")
        lines.append("        for (int64_t i = row0; i < row0 + row; i++) {")
        lines += ["    " + ln for ln in stage_body]
        lines.append("        }")
    lines.append("    }")
    lines.append("    free(mem);")
    return lines


SPAN = 1 << 30  # elements per span of the element loop: its count of non-finite results fits 32 bits

# The element loop runs in blocks of PREFETCH_BLOCK elements, each first asking for the inputs' cache
# lines PREFETCH_AHEAD elements ahead: the hardware's prefetchers stop at every 4 KiB page, and a
# kernel reading five inputs from memory stalls at each.  Measured on this project's machine: task
# arithmetic's kernel over 5 × 128 MiB bf16, 0.88 → 0.79 ns an element on one core (1 to 4 KiB ahead
# alike, 8 KiB less); the whole 1 GiB merge 0.66 → 0.63 s.  A prefetch never changes a value.
PREFETCH_BLOCK = 256
PREFETCH_AHEAD = 1024
LINE = 64  # bytes per cache line


def _element_loop(lo: str, hi: str, body: list[str], sizes: list[int], indent: str = "    ") -> list[str]:
    """``for (i = lo; i < hi; i++) { body }`` (``body`` indented for a loop at four spaces), in
    prefetching blocks; ``sizes``: each input's element size in bytes, ``in0`` first.  Prefetches
    reach up to element ``n``, past ``hi``, and never beyond."""
    ahead = [
        f"{indent}        for (int l = 0; l < {PREFETCH_BLOCK * size}; l += {LINE})"
        f" __builtin_prefetch((const char *)(in{k} + b + {PREFETCH_AHEAD}) + l);"
        for k, size in enumerate(sizes)
    ]
    return [
        f"{indent}for (int64_t b = {lo}; b < {hi}; b += {PREFETCH_BLOCK}) {{",
        f"{indent}    const int64_t be = {hi} - b < {PREFETCH_BLOCK} ? {hi} : b + {PREFETCH_BLOCK};",
        *([f"{indent}    if (be + {PREFETCH_AHEAD} <= n) {{", *ahead, f"{indent}    }}"] if ahead else []),
        f"{indent}    for (int64_t i = b; i < be; i++) {{",
        *(indent + "    " + line.removeprefix("    ") for line in body),
        f"{indent}    }}",
        f"{indent}}}",
    ]


def _spans(body: list[str], sizes: list[int]) -> list[str]:
    """The element loop, over spans of at most ``SPAN`` elements, each counting its non-finite
    results (``nbad``) in 32 bits."""
    return [
        f"    for (int64_t s0 = 0; s0 < n; s0 += {SPAN}) {{",
        f"        const int64_t s1 = n - s0 < {SPAN} ? n : s0 + {SPAN};",
        "        uint32_t nbad = 0;",
        *_element_loop("s0", "s1", body, sizes, "        "),
        "        bad += nbad;",
        "    }",
    ]


def _blocked(body: list[str], sums: list[int], counted: bool, sizes: list[int]) -> list[str]:
    """The element loop inside a loop over ``BLOCK``-element blocks: the (vectorised) element loop
    stores each summand of a block in a small buffer, then one loop adds each buffer in
    :data:`~tvlang.plan.plan.LANES` lanes (element j in lane j % LANES), the sums side by side,
    and the lanes pairwise.  A sum's lanes are one ``tv_lanes`` vector (written as an array of
    lanes, GCC split the loop into scalars).  ``counted``: the body counts non-finite results
    (``nbad``, per block)."""
    return [
        *(f"    double t{k}[{BLOCK}];" for k in sums),
        f"    for (int64_t b0 = 0; b0 < n; b0 += {BLOCK}) {{",
        f"        const int64_t b1 = n - b0 < {BLOCK} ? n : b0 + {BLOCK};",
        *(["        uint32_t nbad = 0;"] if counted else []),
        *_element_loop("b0", "b1", body, sizes, "        "),
        *(["        bad += nbad;"] if counted else []),
        *(f"        tv_lanes s{k} = {{0}};" for k in sums),
        f"        const int64_t whole = (b1 - b0) / {LANES} * {LANES};",
        f"        for (int64_t j = 0; j < whole; j += {LANES}) {{",
        *(f"            s{k} += tv_lanes_at(t{k} + j);" for k in sums),
        "        }",
        "        for (int64_t j = whole; j < b1 - b0; j++) {",
        *(f"            s{k}[j - whole] += t{k}[j];" for k in sums),
        "        }",
        *(f"        out{k}[b0 / {BLOCK}] = {_pairwise(f's{k}')};" for k in sums),
        "    }",
    ]


def _pairwise(lanes: str) -> str:
    """C for the sum of the array ``lanes``' LANES elements, pairwise: ((l0 + l1) + (l2 + l3)) + …,
    as :func:`tvlang.backends.reductions.pairwise_lanes` adds them."""
    terms = [f"{lanes}[{j}]" for j in range(LANES)]
    while len(terms) > 1:
        terms = [f"({a} + {b})" for a, b in zip(terms[0::2], terms[1::2], strict=True)]
    return terms[0][1:-1]


def _call(fn: str, a: list[str], t: str, f: str) -> str:
    """The C spelling of the element-wise function ``fn`` (its tvlang.ops entry's template)."""
    template = ELEMENTWISE[fn].c
    assert template is not None, fn
    return template.format(*a, t=t, f=f)


# ---------------------------------------------------------------------------------------------
# Compiling and loading


def compiler() -> str | None:
    """The C compiler to use: $CC, else ``cc``; None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def _host_key() -> str:
    """What a ``-march=native`` binary depends on: the CPU's model and flags, the compiler.  Worked
    out once per process and compiler (each kernel load asks)."""
    return _host_key_for(os.environ.get("CC", "cc"), os.environ.get("PATH"))


@functools.cache
def _host_key_for(cc: str, path: str | None) -> str:
    return hashlib.sha256(f"{_cpu()}{compiler()}{FLAGS}{sys.platform}".encode()).hexdigest()[:12]


@functools.cache
def _cpu() -> str:
    """The CPU's model and flags: /proc/cpuinfo where there is one; elsewhere what ``platform``
    says (``platform.processor()`` runs ``uname -p``, ~6 ms, so only where it is needed)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = "".join(sorted({ln for ln in fh if ln.startswith(("flags", "model name"))}))
    except OSError:
        return platform.processor() + platform.machine()
    return platform.machine() + lines


def cache_dir() -> Path:
    return cache_root() / "kernels"


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
        self._address = ctypes.cast(self._fn, ctypes.c_void_p).value

    def bracketed(
        self,
        counter: BracketCount,
        inputs: list[Chunk],
        params: list[float] | tuple[float, ...],
        keys: list[int] | tuple[int, ...],
        start: int,
        n: int,
        selections: list[tuple[int, int, np.ndarray[Any, Any], np.ndarray[Any, Any]]],
    ) -> int:
        """Run this reduction kernel (its outputs: one operand per selection, in the accumulation
        dtype) over elements [0, n) a block at a time, counting each block of each operand against
        its selection's bracket at once (``counter``'s count; ``selections``: per output its
        ``(lo, hi, stash, counts)``, the counts updated in place), so no operand is stored.
        Returns the kernel's result: negative when it computed nothing."""
        assert not has_rows(self.spec) and len(selections) == len(self.spec.outputs)
        assert all(dtype == ACC for _, dtype in self.spec.outputs)
        for x in inputs:
            assert numel(x) == n
        wide = self.spec.acc == "F64"
        key_t = ctypes.c_uint64 if wide else ctypes.c_uint32
        k = len(selections)
        buffers = _block_buffers(k, wide)
        for _, _, stash, counts in selections:
            assert stash.itemsize == (8 if wide else 4) and stash.flags.c_contiguous
            assert counts.dtype == np.int64 and counts.size == 4 and counts.flags.c_contiguous
        return int(
            counter.driven[8 if wide else 4](
                self._address,
                n,
                start,
                len(inputs),
                (ctypes.c_void_p * max(1, len(inputs)))(*[address(x) for x in inputs]),
                (ctypes.c_int64 * max(1, len(inputs)))(*[x.itemsize for x in inputs]),
                (ctypes.c_double * max(1, len(params)))(*params),
                (ctypes.c_int64 * max(1, len(keys)))(*keys),
                self._weights,
                k,
                address(buffers),
                (key_t * k)(*[lo for lo, _, _, _ in selections]),
                (key_t * k)(*[hi for _, hi, _, _ in selections]),
                (ctypes.c_void_p * k)(*[address(stash) for _, _, stash, _ in selections]),
                (ctypes.c_int64 * k)(*[stash.size for _, _, stash, _ in selections]),
                (ctypes.c_void_p * k)(*[address(counts) for _, _, _, counts in selections]),
            )
        )

    def __call__(
        self,
        inputs: list[Chunk],
        outputs: list[Chunk],
        params: list[float] | tuple[float, ...] = (),
        keys: list[int] | tuple[int, ...] = (),
        start: int = 0,
        n: int | None = None,
        row: int = 1,
    ) -> int:
        """Compute elements [0, n) of ``outputs`` (contiguous CPU chunks, numpy arrays or torch
        tensors, of the spec's dtypes; ``SUM`` outputs hold one number per block) from ``inputs``
        (``n``: by default the first output's size); returns the number of elements whose rounded
        results are not all finite, or -1 (nothing computed) where a kernel of whole rows gets a
        chunk that is not whole rows of ``row``."""
        if n is None:
            n = numel(outputs[0]) if outputs else 0
        for x in inputs:
            assert numel(x) == n
        for x, (_, dtype) in zip(outputs, self.spec.outputs, strict=True):
            assert numel(x) == (-(-n // BLOCK) if dtype == SUM else n)
        # (address() checks that each chunk is contiguous and on the CPU)
        ins = (ctypes.c_void_p * max(1, len(inputs)))(*[address(x) for x in inputs])
        outs = (ctypes.c_void_p * max(1, len(outputs)))(*[address(x) for x in outputs])
        ps = (ctypes.c_double * max(1, len(params)))(*params)
        ks = (ctypes.c_int64 * max(1, len(keys)))(*keys)
        if has_rows(self.spec):
            return int(self._fn(n, start, ins, outs, ps, ks, self._weights, row))
        return int(self._fn(n, start, ins, outs, ps, ks, self._weights))


_lock = threading.Lock()
_loaded: dict[str, CKernel] = {}
_blocks = threading.local()
# Elements per block of CKernel.bracketed (written into RADIX_SOURCE: one value).  The 1 GiB TIES
# (benchmarks/PROFILE.md, medians of 5): 8192 without the driver's prefetch 1.54-1.60 s; with it,
# 8192 1.68, 2048 1.59, 1024 1.53, 512 1.47-1.49, 256 1.46 (four operand blocks in the L1 cache).
TV_BLOCK = 256


def _block_buffers(count: int, wide: bool) -> np.ndarray[Any, Any]:
    """This thread's ``count`` operand blocks for :meth:`CKernel.bracketed` (kept in the cache)."""
    dtype = np.float64 if wide else np.float32
    buf: np.ndarray[Any, Any] | None = getattr(_blocks, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < count * TV_BLOCK:
        buf = np.empty(count * TV_BLOCK, dtype=dtype)
        _blocks.buf = buf
    return buf


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
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * has_rows(spec)
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
    import subprocess  # (only to compile: not at every start)

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


# The k-th largest value's selections (tvlang.backends.reductions): the radix selection's
# histogram of one 16-bit digit of each value's order key, among the values whose higher digits
# match the prefix found so far (KthLargest), and the bracket count of the sampled selection
# (SampledKth): keys above the bracket counted, keys inside it kept.  Integer counts and copied
# keys, so the result is exactly the eager path's.
RADIX_SOURCE = r"""#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && !defined(TV_PORTABLE)
#include <immintrin.h>
#endif

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

/* counts[0] += keys above hi, counts[1] += keys equal to hi, counts[2] += keys strictly between lo
   and hi, each copied to stash[counts[2]] while it fits (all of them are there when the final
   counts[2] + 64 <= cap), counts[3] += keys equal to lo.  Keys are copied in element order on both paths.  The
   portable path tests blocks of 64 first (vectorised) and looks at a block's elements one by one
   only when one falls inside. */
#define TV_BRACKET_PORTABLE(NAME, FLOAT, UINT, SIGN)                                                    \
static void NAME(const FLOAT *restrict x, int64_t n, UINT lo, UINT hi, UINT *restrict stash,          \
                 int64_t cap, int64_t *restrict counts) {                                              \
    int64_t above = 0, at_hi = 0, inside = counts[2], at_lo = 0, i = 0;                                \
    for (; i < n; i += 64) {                                                                           \
        const int64_t m = n - i < 64 ? n - i : 64;                                                     \
        int64_t ab = 0, eh = 0, in = 0, el = 0;                                                        \
        for (int64_t j = 0; j < m; j++) {                                                              \
            UINT u;                                                                                    \
            memcpy(&u, &x[i + j], sizeof u);                                                           \
            const UINT key = (u & SIGN) ? ~u : (u ^ SIGN);                                             \
            ab += key > hi;                                                                            \
            eh += key == hi;                                                                           \
            in += (key > lo) & (key < hi);                                                             \
            el += key == lo;                                                                           \
        }                                                                                              \
        above += ab;                                                                                   \
        at_hi += eh;                                                                                   \
        at_lo += el;                                                                                   \
        if (!in) continue;                                                                             \
        for (int64_t j = 0; j < m; j++) {                                                              \
            UINT u;                                                                                    \
            memcpy(&u, &x[i + j], sizeof u);                                                           \
            const UINT key = (u & SIGN) ? ~u : (u ^ SIGN);                                             \
            if (key > lo && key < hi) {                                                                \
                if (inside < cap) stash[inside] = key;                                                 \
                inside++;                                                                              \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    counts[0] += above;                                                                                \
    counts[1] += at_hi;                                                                                \
    counts[2] = inside;                                                                                \
    counts[3] += at_lo;                                                                                \
}

TV_BRACKET_PORTABLE(tv_bracket32_portable, float, uint32_t, 0x80000000u)
TV_BRACKET_PORTABLE(tv_bracket64_portable, double, uint64_t, 0x8000000000000000ull)

#if defined(__AVX512F__) && !defined(TV_PORTABLE)
/* The same counts with AVX-512: compares to lane masks, the keys inside packed in order into a
   register and stored as a whole vector, without a branch (a store whose lanes past the kept keys
   the next store overwrites; measured on this project's machine: 0.2 ns a float32 value whatever
   share of keys falls inside, against 0.3 to 0.7 with a branch per vector, 0.63 portable), the
   counts kept in vector lanes rather than popcounts of masks moved out (0.165 ns).  Only one port
   runs compares into masks and the compress (two operations): the inside test is one compare of
   key - (lo + 1), not two, which leaves six of the loop's thirteen vector operations there and
   the loop bound by both vector ports (0.144 against 0.162 ns, benchmarks/PROFILE.md). */
#define TV_BRACKET_AVX512(NAME, PORTABLE, FLOAT, UINT, LANES, S, MASK)                                  \
void NAME(const FLOAT *restrict x, int64_t n, UINT lo, UINT hi, UINT *restrict stash, int64_t cap,    \
          int64_t *restrict counts) {                                                                  \
    const __m512i sign = _mm512_set1_epi##S((UINT)1 << (S - 1)), one = _mm512_set1_epi##S(1);         \
    const __m512i vlo = _mm512_set1_epi##S(lo), vhi = _mm512_set1_epi##S(hi);                          \
    /* strictly inside: key - (lo + 1) below hi - lo - 1, as unsigned (no key when hi <= lo + 1) */   \
    const __m512i vlo1 = _mm512_set1_epi##S((UINT)(lo + 1));                                           \
    const __m512i vwidth = _mm512_set1_epi##S(hi > lo ? (UINT)(hi - lo - 1) : 0);                      \
    int64_t inside = counts[2], i = 0;                                                                 \
    while (i + LANES <= n) { /* spans whose per-lane counts fit 32 bits */                             \
        const int64_t end = n - i > (1 << 28) ? i + (1 << 28) : n;                                      \
        __m512i above = _mm512_setzero_si512(), at_hi = above, at_lo = above;                          \
        _Pragma("GCC unroll 4")                                                                        \
        for (; i + LANES <= end; i += LANES) {                                                         \
            const __m512i u = _mm512_loadu_si512((const void *)(x + i));                               \
            /* the key: u ^ (all ones where negative, else the sign bit) */                            \
            const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi##S(u, S - 1), sign)); \
            above = _mm512_mask_add_epi##S(above, _mm512_cmpgt_epu##S##_mask(key, vhi), above, one);   \
            at_hi = _mm512_mask_add_epi##S(at_hi, _mm512_cmpeq_epu##S##_mask(key, vhi), at_hi, one);   \
            at_lo = _mm512_mask_add_epi##S(at_lo, _mm512_cmpeq_epu##S##_mask(key, vlo), at_lo, one);   \
            const MASK in = _mm512_cmplt_epu##S##_mask(_mm512_sub_epi##S(key, vlo1), vwidth);               \
            if (inside + LANES <= cap) /* the kept keys packed to the front, the whole vector stored */ \
                _mm512_storeu_si512((void *)(stash + inside), _mm512_maskz_compress_epi##S(in, key));  \
            inside += __builtin_popcount(in);                                                          \
        }                                                                                              \
        counts[0] += _mm512_reduce_add_epi##S(above);                                                  \
        counts[1] += _mm512_reduce_add_epi##S(at_hi);                                                  \
        counts[3] += _mm512_reduce_add_epi##S(at_lo);                                                  \
    }                                                                                                  \
    counts[2] = inside;                                                                                \
    PORTABLE(x + i, n - i, lo, hi, stash, cap, counts);                                                \
}

TV_BRACKET_AVX512(tv_bracket32, tv_bracket32_portable, float, uint32_t, 16, 32, __mmask16)
TV_BRACKET_AVX512(tv_bracket64, tv_bracket64_portable, double, uint64_t, 8, 64, __mmask8)
#else
void tv_bracket32(const float *restrict x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *restrict stash,
                  int64_t cap, int64_t *restrict counts) {
    tv_bracket32_portable(x, n, lo, hi, stash, cap, counts);
}
void tv_bracket64(const double *restrict x, int64_t n, uint64_t lo, uint64_t hi, uint64_t *restrict stash,
                  int64_t cap, int64_t *restrict counts) {
    tv_bracket64_portable(x, n, lo, hi, stash, cap, counts);
}
#endif

/* A reduction pass whose every reduction is a bracketed selection, over one chunk: the pass's
   generated kernel computes the operands a block at a time into buffers that stay in the L1 cache,
   and each block is counted against its selection's bracket at once (the same counts as the kernel
   over the whole chunk, then a count of each operand).  Before the count, the next block's inputs
   are prefetched, so that memory works while the count computes (a kernel's own prefetches stop
   at the end of its block).  Returns the kernel's first negative result, else 0.  in_sizes: each
   input's element size; buffers: nsel blocks of TV_BLOCK floats; per selection its bracket, stash
   and four counts, as tv_bracket32/64 take them. */
typedef int64_t (*tv_kernel_t)(int64_t, int64_t, void *const *, void *const *, const double *,
                               const int64_t *, const double *);
#define TV_BLOCK @TV_BLOCK@
#define TV_MAX_ARGS 64
#define TV_BRACKETED(NAME, FLOAT, UINT, COUNT)                                                          \
int64_t NAME(tv_kernel_t kernel, int64_t n, int64_t start, int nin, void *const *in,                 \
             const int64_t *in_sizes, const double *params, const int64_t *keys, const double *weights, \
             int nsel, FLOAT *buffers, const UINT *lo, const UINT *hi, UINT *const *stash,            \
             const int64_t *cap, int64_t *const *counts) {                                             \
    void *ins[TV_MAX_ARGS], *outs[TV_MAX_ARGS];                                                        \
    if (nin > TV_MAX_ARGS || nsel > TV_MAX_ARGS) return -2;                                            \
    for (int k = 0; k < nsel; k++) outs[k] = buffers + (int64_t)k * TV_BLOCK;                          \
    for (int64_t b = 0; b < n; b += TV_BLOCK) {                                                        \
        const int64_t m = n - b < TV_BLOCK ? n - b : TV_BLOCK;                                         \
        for (int j = 0; j < nin; j++) ins[j] = (char *)in[j] + b * in_sizes[j];                        \
        const int64_t r = kernel(m, start + b, ins, outs, params, keys, weights);                      \
        if (r < 0) return r;                                                                           \
        const int64_t next = n - b - m < TV_BLOCK ? n - b - m : TV_BLOCK;                              \
        for (int j = 0; j < nin; j++)                                                                  \
            for (int64_t l = 0; l < next * in_sizes[j]; l += 64)                                       \
                __builtin_prefetch((const char *)in[j] + (b + m) * in_sizes[j] + l);                   \
        for (int k = 0; k < nsel; k++)                                                                 \
            COUNT(buffers + (int64_t)k * TV_BLOCK, m, lo[k], hi[k], stash[k], cap[k], counts[k]);     \
    }                                                                                                  \
    return 0;                                                                                          \
}

TV_BRACKETED(tv_bracketed32, float, uint32_t, tv_bracket32)
TV_BRACKETED(tv_bracketed64, double, uint64_t, tv_bracket64)
""".replace("@TV_BLOCK@", str(TV_BLOCK))


class RadixHistogram:
    """``hist[digit] += 1`` for one round of the radix selection over a float32/float64 chunk."""

    def __init__(self) -> None:
        lib = _library(RADIX_SOURCE)
        self._fns = {4: lib.tv_hist32, 8: lib.tv_hist64}  # by the float's size
        for fn in self._fns.values():
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p]

    def __call__(self, values: Chunk, round_: int, prefix: int, hist: np.ndarray[Any, Any]) -> None:
        """``values``: a contiguous float32 or float64 CPU chunk (numpy or torch)."""
        assert hist.dtype == np.int64 and hist.size >= 1 << 16 and hist.flags.c_contiguous
        size = values.itemsize
        assert str(values.dtype).removeprefix("torch.") in ("float32", "float64")
        self._fns[size](address(values), numel(values), round_, prefix, address(hist))


STASH_SLACK = 64  # elements of a bracket count's stash past the last key it keeps (whole-vector stores)


class BracketCount:
    """The sampled selection's count of one float32/float64 chunk against a bracket of order keys
    (:class:`tvlang.backends.reductions.SampledKth`): ``counts`` += the keys above ``hi``, equal to
    ``hi``, strictly between (copied in element order into ``stash``: all of them when that count
    plus :data:`STASH_SLACK` is at most its size) and equal to ``lo``.  ``portable``: the plain C
    path even where AVX-512 is there (both are tested to agree)."""

    def __init__(self, portable: bool = False) -> None:
        lib = _library(("#define TV_PORTABLE\n" if portable else "") + RADIX_SOURCE)
        self._fns = {4: lib.tv_bracket32, 8: lib.tv_bracket64}  # by the float's size
        for size, fn in self._fns.items():
            key = ctypes.c_uint32 if size == 4 else ctypes.c_uint64
            fn.restype = None
            fn.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int64,
                key,
                key,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]
        self.driven = {4: lib.tv_bracketed32, 8: lib.tv_bracketed64}  # (CKernel.bracketed)
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for fn in self.driven.values():
            fn.restype = i64
            fn.argtypes = [pointer, i64, i64, i32, pointer, pointer, pointer, pointer, pointer, i32]
            fn.argtypes += [pointer] * 6

    def __call__(
        self, values: Chunk, lo: int, hi: int, stash: np.ndarray[Any, Any], counts: np.ndarray[Any, Any]
    ) -> None:
        """``values``: a contiguous float32 or float64 CPU chunk (numpy or torch); ``stash``: keys
        of the same width; ``counts``: four int64."""
        size = values.itemsize
        assert str(values.dtype).removeprefix("torch.") in ("float32", "float64")
        assert stash.itemsize == size and stash.flags.c_contiguous and counts.dtype == np.int64
        self._fns[size](address(values), numel(values), lo, hi, address(stash), stash.size, address(counts))


_radix: list[RadixHistogram] = []
_bracket: list[BracketCount] = []


def radix_histogram() -> RadixHistogram:
    """The compiled radix histogram (raises :class:`CompileError` without a working compiler)."""
    if not _radix:
        with _lock:
            if not _radix:
                _radix.append(RadixHistogram())
    return _radix[0]


def bracket_count() -> BracketCount:
    """The compiled bracket count (raises :class:`CompileError` without a working compiler)."""
    if not _bracket:
        with _lock:
            if not _bracket:
                _bracket.append(BracketCount())
    return _bracket[0]


__all__ = [
    "STASH_SLACK",
    "BracketCount",
    "CKernel",
    "CompileError",
    "Stmt",
    "bracket_count",
    "c_source",
    "compiler",
    "load",
    "radix_histogram",
]
