"""Triton kernels generated from a :class:`~tvlang.codegen.spec.KernelSpec`.

:func:`triton_source` writes one ``@triton.jit`` kernel per spec: named pointer
arguments (``in0…``, ``out0…``), the per-tensor float64 numbers (``p0…``) and
int64 random keys (``k0…``), ``start`` (the global index of the chunk's first
element, for the random generator), ``n`` and ``BLOCK_SIZE``.  Each program
instance computes ``BLOCK_SIZE`` elements with masked loads and stores, and
every statement follows the eager CPU path operation for operation (see the
spec's docstring), so that both give the same bits:

- precision-critical operations go through libdevice's correctly rounded
  ``fma_rn``, ``div_rn`` and ``sqrt_rn`` (Triton's ``/`` and ``sqrt`` are
  approximate in float32 on NVIDIA GPUs), and kernels are compiled with
  ``enable_fp_fusion=False`` so that no ``a*b + c`` is contracted into an fma
  that the CPU does not do;
- bfloat16 outputs are rounded to nearest even in integer arithmetic, NaN
  becoming 0xFFFF as torch's vectorised conversion does (the interpreter's ``.to(tl.bfloat16)``
  truncates);
- float8 inputs are passed as bytes and decoded in integer arithmetic, exactly as torch widens
  them (:func:`tvlang.codegen.c.float8_bits` is the table both follow);
- ``rand`` is the counter-based fmix64 generator of
  :func:`tvlang.backends.interpreter.uniform`, in uint64 arithmetic.

Under ``TRITON_INTERPRET=1`` (the tests, on the CPU) libdevice cannot be
called: :func:`_install_interpreter_support` gives the interpreter numpy
versions of the few libdevice functions these kernels use, with a correctly
rounded fma (the interpreter's own ``tl.fma`` rounds twice, the GPU's once).

:func:`load_kernel` caches compiled kernels by :attr:`KernelSpec.key`; the
source is written to a file and imported, because ``@triton.jit`` reads its
function's source.  ``TVLANG_DEBUG=1`` prints each kernel's source once.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvlang.codegen import c
from tvlang.codegen.spec import ACC, KernelCall, KernelSpec, Stmt, Unsupported
from tvlang.dtypes import DTYPES, torch_dtype
from tvlang.ops import ELEMENTWISE

GPU_BLOCK = 1024  # elements per program instance on a GPU (4 warps, 8 elements per thread)
INTERPRETER_BLOCK = 4096  # the interpreter costs ~3.5 ms per program instance: few, large ones


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_missing() -> str | None:
    """Why Triton cannot be used here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        return f"triton is not installed ({e})"
    return None


def kernel_name(spec: KernelSpec) -> str:
    """Named by the spec's structure: weights are arguments, so one kernel serves any weights."""
    return f"tv_kernel_{spec.structure_key[:16]}"


def _literal(value: float, dtype: str) -> str:
    """``value`` rounded to ``dtype`` (as torch rounds a Python number for an operation in that dtype),
    as an exact Python literal."""
    if dtype == "F32":
        value = float(np.float32(value))
    if not math.isfinite(value):
        raise Unsupported(f"the non-finite constant {value} in a kernel")
    return repr(value)


def _tl_type(code: str) -> str:
    """The Triton element type of a kernel pointer (tvlang.dtypes)."""
    tl_type = DTYPES[code].triton
    assert tl_type is not None, code
    return tl_type


class _Emitter:
    """Writes the body of one kernel; every value is a name of a block or a 0-d scalar."""

    def __init__(self, spec: KernelSpec) -> None:
        self.spec = spec
        self.T = _tl_type(spec.acc)
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.scalar: set[int] = set()  # statements that are one number per tensor
        self.f64: dict[int, str] = {}  # the float64 form of each scalar
        self.helpers: set[str] = set()
        self.weights = 0  # weight arguments used so far

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)

    def const(self, value: float, dtype: str | None = None) -> str:
        dtype = dtype or self.spec.acc
        return f"tl.full([], {_literal(value, dtype)}, {_tl_type(dtype)})"

    def body(self) -> None:
        spec = self.spec
        self.emit("pid = tl.program_id(0)")
        self.emit("offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)")
        self.emit("mask = offs < n")
        if any(s.op == "rand" for s in spec.body):
            self.emit("index = start.to(tl.int64) + offs  # global element index: the generator's counter")
        for k in range(spec.params):
            self.emit(f"p{k}_f64 = tl.full([], p{k}, tl.float64)")
            if spec.acc != "F64":
                self.emit(f"p{k}_t = p{k}_f64.to({self.T})")
        for i, stmt in enumerate(spec.body):
            self.statement(i, stmt)
        for j, (i, dtype) in enumerate(spec.outputs):
            value = self.names[i]
            if i in self.scalar:
                value = f"tl.broadcast_to({value}, [BLOCK_SIZE])"
            self.emit(f"tl.store(out{j} + offs, {self.rounded(value, dtype)}, mask=mask)")

    def rounded(self, value: str, dtype: str) -> str:
        """The one rounding to an output dtype (16-bit outputs of a float64 accumulator go through
        float32, as torch's conversion does)."""
        acc = self.spec.acc
        if dtype in (ACC, acc):
            return value
        if acc == "F64" and dtype != "F32":
            value = f"{value}.to(tl.float32)"
        if dtype == "BF16":
            self.helpers.add("round_bf16")
            return f"_round_bf16({value})"
        return f"{value}.to({_tl_type(dtype)})"

    def statement(self, i: int, stmt: Stmt) -> None:
        T, spec = self.T, self.spec
        args = [self.names[a] for a in stmt.args]
        if stmt.op == "param":
            k = int(stmt.attr)  # type: ignore[call-overload]
            self.names[i] = f"p{k}_f64" if spec.acc == "F64" else f"p{k}_t"
            self.f64[i] = f"p{k}_f64"
            self.scalar.add(i)
            return
        name = f"v{i}"
        if stmt.op == "load":
            pos = int(stmt.attr)  # type: ignore[call-overload]
            name = f"x{pos}"
            dtype = spec.inputs[pos]
            value = f"tl.load(in{pos} + offs, mask=mask, other=0)"
            if dtype == "BF16":  # exactly, subnormals too (the interpreter's own conversion loses them)
                self.helpers.add("widen_bf16")
                value = f"_widen_bf16({value})"
            elif dtype == "F16":
                value += ".to(tl.float32)"
            elif dtype in _FLOAT8:  # bytes (run_spec passes uint8 views), decoded exactly
                self.helpers.add(_FLOAT8[dtype])
                value = f"_{_FLOAT8[dtype]}({value})"
            if dtype != spec.acc and not (dtype in ("BF16", "F16", *_FLOAT8) and spec.acc == "F32"):
                value += f".to({T})"
            self.emit(f"{name} = {value}  # {dtype}")
        elif stmt.op == "wsum":
            self.emit(f"{name} = tl.zeros([BLOCK_SIZE], {T})")
            for a, src in zip(stmt.args, args, strict=True):
                w = f"tl.full([], w{self.weights}, tl.float64)"  # a weight argument
                self.weights += 1
                if a in self.scalar:  # acc + T(w·p), the product in float64
                    self.emit(f"{name} = {name} + ({w} * {self.f64[a]}).to({T})")
                else:  # the weight rounded to T, as torch rounds alpha
                    self.emit(f"{name} = libdevice.fma_rn({w}.to({T}), {src}, {name})")
        elif stmt.op == "rand":
            self.helpers.add("uniform")
            bits = 53 if spec.acc == "F64" else 24
            key = f"k{stmt.attr}.to(tl.int64).to(tl.uint64, bitcast=True)"
            self.emit(f"{name} = _uniform({key}, index, {bits}).to({T}) * {self.const(2.0**-bits)}")
        elif stmt.op == "neg":
            self.emit(f"{name} = -{args[0]}")
        elif stmt.op in ("add", "sub", "mul", "div"):
            self.emit(f"{name} = {self.binary(stmt.op, stmt.args, args)}")
        elif stmt.op == "call":
            self.emit(f"{name} = {self.call(str(stmt.attr), stmt.args, args)}")
        else:
            raise Unsupported(f"statement {stmt.op}")
        self.names[i] = name

    def binary(self, op: str, ids: tuple[int, ...], args: list[str]) -> str:
        """As :func:`tvlang.backends.interpreter._binary`: a number on the left is handled the way torch
        is called there (``(b - a).neg()``)."""
        a, b = args
        left_number = ids[0] in self.scalar and ids[1] not in self.scalar
        if op == "add":
            return f"{b} + {a}" if left_number else f"{a} + {b}"
        if op == "mul":
            return f"{b} * {a}" if left_number else f"{a} * {b}"
        if op == "sub":
            return f"-({b} - {a})" if left_number else f"{a} - {b}"
        if op == "div":
            return f"libdevice.div_rn({a}, {b})"
        raise Unsupported(f"binary {op}")

    def call(self, fn: str, ids: tuple[int, ...], args: list[str]) -> str:
        """The Triton spelling of the element-wise function ``fn`` (its tvlang.ops entry's template)."""
        op = ELEMENTWISE.get(fn)
        if op is None or op.triton is None:
            raise Unsupported(f"function {fn}")
        self.helpers.update(op.triton_helpers)
        return op.triton.format(*args, T=self.T)


_FLOAT8 = {"F8_E4M3": "widen_f8e4m3", "F8_E5M2": "widen_f8e5m2"}  # the helper decoding each float8

_HELPERS = {
    "widen_f8e4m3": '''
@triton.jit
def _widen_f8e4m3(x):
    """float8 e4m3fn bytes → float32, exactly, bit for bit as torch widens them (no infinities;
    S.1111.111 is NaN, 0x7FF00000 with the sign)."""
    u = x.to(tl.uint32)
    sign = (u & 0x80) << 24
    e = (u >> 3) & 0xF
    m = u & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    tiny = m.to(tl.float32) * 0.001953125  # subnormal: m · 2^-9
    tiny = tl.where(sign != 0, -tiny, tiny)
    nan = (sign | 0x7FF00000).to(tl.float32, bitcast=True)
    return tl.where(e == 0, tiny, tl.where((e == 15) & (m == 7), nan, normal))
''',
    "widen_f8e5m2": '''
@triton.jit
def _widen_f8e5m2(x):
    """float8 e5m2 bytes → float32, exactly, bit for bit as torch widens them (through float16:
    infinities kept, NaN made quiet)."""
    u = x.to(tl.uint32)
    sign = (u & 0x80) << 24
    e = (u >> 2) & 0x1F
    m = u & 0x3
    normal = (sign | ((e + 112) << 23) | (m << 21)).to(tl.float32, bitcast=True)
    tiny = m.to(tl.float32) * 0.0000152587890625  # subnormal: m · 2^-16
    tiny = tl.where(sign != 0, -tiny, tiny)
    quiet = tl.where(m != 0, 0x400000, 0)
    special = (sign | 0x7F800000 | (m << 21) | quiet).to(tl.float32, bitcast=True)
    return tl.where(e == 0, tiny, tl.where(e == 31, special, normal))
''',
    "round_bf16": '''
@triton.jit
def _round_bf16(x):
    """float32 → bfloat16, rounding to nearest even in integer arithmetic as torch does (NaN → 0xFFFF, like its vectorised path)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, tl.full([], 0xFFFF, tl.uint32), rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
''',
    "widen_bf16": '''
@triton.jit
def _widen_bf16(x):
    """bfloat16 → float32, exactly: the 16 bits on top of 16 zero bits."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
''',
    "uniform": '''
@triton.jit
def _uniform(key, index, BITS: tl.constexpr):
    """The top BITS bits of fmix64(key ^ (index · golden)), as tvlang.backends.interpreter.uniform."""
    x = (index.to(tl.uint64) * 0x9E3779B97F4A7C15) ^ key
    x = x ^ (x >> 33)
    x = x * 0xFF51AFD7ED558CCD
    x = x ^ (x >> 33)
    x = x * 0xC4CEB9FE1A85EC53
    x = x ^ (x >> 33)
    return x >> (64 - BITS)
''',
    "minmax": '''
@triton.jit
def _minimum(a, b):
    """torch.minimum on the CPU: NaN if either is NaN, else b unless a < b."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a < b, a, b)))


@triton.jit
def _maximum(a, b):
    """torch.maximum on the CPU: NaN if either is NaN, else b unless a > b."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a > b, a, b)))
''',
}


def triton_source(spec: KernelSpec) -> str:
    """The Python source of a module holding the spec's ``@triton.jit`` kernel (and its helpers)."""
    em = _Emitter(spec)
    em.body()
    name = kernel_name(spec)
    sig = [f"in{i}" for i in range(len(spec.inputs))]
    sig += [f"out{j}" for j in range(len(spec.outputs))]
    sig += [f"p{k}: tl.float64" for k in range(spec.params)]
    sig += [f"k{k}: tl.int64" for k in range(spec.keys)]
    sig += [f"w{k}: tl.float64" for k in range(len(spec.weights))]
    sig += ["start: tl.int64", "n: tl.int32", "BLOCK_SIZE: tl.constexpr"]
    outs = ", ".join(
        f"out{j}: {d.lower() if d != ACC else spec.acc.lower()}" for j, (_, d) in enumerate(spec.outputs)
    )
    ins = ", ".join(f"in{i}: {d.lower()}" for i, d in enumerate(spec.inputs)) or "none"
    doc = (
        f'    """Generated by tvlang from a KernelSpec ({spec.acc.lower()} accumulation).\n\n'
        f"    inputs {ins}; outputs {outs}; {spec.params} per-tensor number(s), {spec.keys} random key(s).\n"
        '    """'
    )
    header = [
        f'"""tvlang kernel {name} (generated from a KernelSpec; weights are arguments)."""',
        "",
        "import triton",
        "import triton.language as tl",
        "from triton.language.extra.cuda import libdevice",
        "",
    ]
    helpers = [_HELPERS[h].strip("\n") + "\n\n" for h in sorted(em.helpers)]
    kernel = [
        "@triton.jit",
        f"def {name}(",
        *(f"    {s}," for s in sig),
        "):",
        doc,
        *em.lines,
    ]
    return "\n".join(header) + "\n" + "\n".join(h for h in helpers) + "\n" + "\n".join(kernel) + "\n"


# -- loading and launching ------------------------------------------------------------------------

_KERNELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def kernel_dir() -> Path:
    """Where generated kernels are written and imported from: ``TVLANG_KERNEL_DIR``, else beside the
    C kernels in the user's cache (created 0700).  The files are executed, so a directory that
    another user owns or can write is never used: this process then gets a private one."""
    path = Path(os.environ.get("TVLANG_KERNEL_DIR") or (c.cache_dir().parent / "triton"))
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
            raise PermissionError(f"{path} is not private")
    except OSError:
        if not _PRIVATE:
            _PRIVATE.append(Path(tempfile.mkdtemp(prefix="tvlang-triton-")))
            atexit.register(shutil.rmtree, _PRIVATE[0], ignore_errors=True)
        path = _PRIVATE[0]
    return path


_PRIVATE: list[Path] = []


def load_kernel(spec: KernelSpec) -> Any:
    """The compiled (or interpreted) kernel of ``spec``, generated once per process per structure."""
    with _LOCK:
        kernel = _KERNELS.get(spec.structure_key)
        if kernel is not None:
            return kernel
        if interpreting():
            _install_interpreter_support()
        source = triton_source(spec)
        name = kernel_name(spec)
        if os.environ.get("TVLANG_DEBUG", "") not in ("", "0"):
            print(f"# tvlang: generated Triton kernel {name}\n{source}", file=sys.stderr)
        directory = kernel_dir()
        path = directory / f"{name}.py"
        if not path.exists() or path.read_text() != source:
            tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
        module_spec = importlib.util.spec_from_file_location(f"tvlang_kernels.{name}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        kernel = getattr(module, name)
        _KERNELS[spec.structure_key] = kernel
        return kernel


def block_size() -> int:
    override = os.environ.get("TVLANG_TRITON_BLOCK")
    if override:
        return int(override)
    return INTERPRETER_BLOCK if interpreting() else GPU_BLOCK


def run_spec(
    bound_or_spec: KernelCall | KernelSpec,
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    params: Sequence[float],
    keys: Sequence[int],
    start: int,
) -> None:
    """Launch the spec's kernel over ``n = outputs[0].numel()`` elements (contiguous chunks, in the
    spec's dtypes; ``start`` is the chunk's first element in its tensor).  On a GPU it runs on the
    current CUDA stream."""
    spec = bound_or_spec.spec if isinstance(bound_or_spec, KernelCall) else bound_or_spec
    if len(inputs) != len(spec.inputs) or len(outputs) != len(spec.outputs):
        raise ValueError("inputs/outputs do not match the kernel's pointers")
    if len(params) != spec.params or len(keys) != spec.keys:
        raise ValueError("params/keys do not match the kernel's arguments")
    n = outputs[0].numel()
    if n == 0:
        return
    if n >= 2**31 - 2 * block_size():
        raise ValueError(f"a chunk of {n} elements is too large for one launch")
    for t, dtype in zip(inputs, spec.inputs, strict=True):
        assert t.dtype == torch_dtype(dtype) and t.is_contiguous() and t.numel() >= n, (t.dtype, dtype)
    inputs = [t.view(torch.uint8) if d in _FLOAT8 else t for t, d in zip(inputs, spec.inputs, strict=True)]
    for t, (_, dtype) in zip(outputs, spec.outputs, strict=True):
        want = torch_dtype(spec.acc if dtype == ACC else dtype)
        assert t.dtype == want and t.is_contiguous() and t.numel() == n, (t.dtype, want)
    kernel = load_kernel(spec)
    block = block_size()
    grid = ((n + block - 1) // block,)
    kernel[grid](
        *inputs,
        *outputs,
        *(float(p) for p in params),
        *(_int64(k) for k in keys),
        *spec.weights,
        int(start),
        n,
        BLOCK_SIZE=block,
        num_warps=4,
        enable_fp_fusion=False,
    )


def _int64(k: int) -> int:
    k = int(k) & 0xFFFFFFFFFFFFFFFF
    return k - (1 << 64) if k >= 1 << 63 else k


# -- the interpreter's libdevice ------------------------------------------------------------------

_INSTALLED = False


def _install_interpreter_support() -> None:
    """Let the interpreter run the libdevice calls of generated kernels, in numpy.

    ``fma_rn`` is correctly rounded (:func:`exact_fma`); the interpreter's own ``tl.fma`` computes
    ``x*y + z`` with two roundings, which the GPU does not."""
    global _INSTALLED
    if _INSTALLED:
        return
    from triton.runtime import interpreter

    by_symbol: dict[str, Any] = {
        "__nv_fmaf_rn": exact_fma,
        "__nv_fma_rn": exact_fma,
        "__nv_fdiv_rn": np.divide,
        "__nv_ddiv_rn": np.divide,
        "__nv_fsqrt_rn": np.sqrt,
        "__nv_dsqrt_rn": np.sqrt,
        "__nv_sinf": np.sin,
        "__nv_sin": np.sin,
        "__nv_acosf": np.arccos,
        "__nv_acos": np.arccos,
        "__nv_cosf": np.cos,
        "__nv_cos": np.cos,
        "__nv_expf": np.exp,
        "__nv_exp": np.exp,
        "__nv_logf": np.log,
        "__nv_log": np.log,
    }

    def create_extern_elementwise(
        self: Any, lib_name: str, lib_path: str, symbol: str, args: list[Any], ret_type: Any, is_pure: bool
    ) -> Any:
        fn = by_symbol.get(symbol)
        if fn is None:
            raise NotImplementedError(f"{symbol} in the interpreter")
        with np.errstate(all="ignore"):
            data = fn(*(a.data for a in args))
        dtype = args[0].data.dtype
        return interpreter.TensorHandle(np.asarray(data).astype(dtype, copy=False), args[0].dtype.scalar)

    from triton.language.extra.cuda import libdevice

    patch_lang = interpreter._patch_lang

    def patch_lang_and_libdevice(fn: Any) -> Any:
        scope = patch_lang(fn)  # tl and tl.math only: libdevice's externs need the builder too
        interpreter._patch_builtin(libdevice, interpreter.interpreter_builder, scope)
        return scope

    interpreter.InterpreterBuilder.create_extern_elementwise = create_extern_elementwise
    interpreter._patch_lang = patch_lang_and_libdevice
    _INSTALLED = True


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_to_odd_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b rounded to odd: the rounded sum, moved one ulp towards the exact sum when inexact and
    even.  A later rounding to nearest of it is then as if the exact sum were rounded."""
    s, e = _two_sum(a, b)
    bits = s.view(np.int64 if s.dtype == np.float64 else np.int32)
    inexact_even = (e != 0) & (np.bitwise_and(bits, 1) == 0) & np.isfinite(s)
    return np.where(inexact_even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)


def exact_fma(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x·y + z rounded once, in the dtype of ``z``: float32 through float64 rounded to odd; float64 by
    Boldo and Melquiond's emulation (exact product by Veltkamp splitting, a rounded-to-odd sum of the
    low parts).  Exact away from overflow and from underflow of the float64 product's low part."""
    x, y, z = np.broadcast_arrays(np.asarray(x), np.asarray(y), np.asarray(z))
    with np.errstate(all="ignore"):
        if z.dtype == np.float32:
            p = x.astype(np.float64) * y.astype(np.float64)  # exact: 24 + 24 bits
            result = _round_to_odd_sum(p, z.astype(np.float64)).astype(np.float32)
            return np.where(np.isfinite(result), result, (p + z).astype(np.float32))
        x, y, z = (v.astype(np.float64) for v in (x, y, z))
        split = 134217729.0  # 2^27 + 1
        cx, cy = split * x, split * y
        xh = cx - (cx - x)
        yh = cy - (cy - y)
        xl, yl = x - xh, y - yh
        uh = x * y
        ul = ((xh * yh - uh) + xh * yl + xl * yh) + xl * yl
        th, tl = _two_sum(z, uh)
        result = th + _round_to_odd_sum(tl, ul)
        # non-finite operands or products: IEEE's answer is the plain expression's
        return np.where(np.isfinite(result) & np.isfinite(ul), result, uh + z)
