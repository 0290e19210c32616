"""Vectors of float32 for compiled kernels: a register of LANES floats that Numba can hold in a local.

    v = zeros()              # LANES zeros
    v = load(a, i)           # a[i : i + LANES] of a 1-D float32 array, no bounds check
    store(a, i, v)           # a[i : i + LANES] = v
    v = broadcast(a, i)      # a[i] in every lane
    v = fma(x, w, acc)       # acc + x * w, lane by lane (fused where the CPU has FMA)

and of float64, half as many lanes (LANES64), for sums of float32 data kept in float64:

    s = zeros64()            # LANES64 zeros
    d = widen(a, i)          # a[i : i + LANES64] of a 1-D float32 array, each made a float64
    d = load64(a, i)         # a[i : i + LANES64] of a 1-D float64 array;  store64(a, i, s)
    s = s + d - e            # +, - and * (and +=, -=, *=) lane by lane, on two float64 vectors
    s = fma64(d, e, s)       # s + d * e
    g = where_positive(r, d) # d where r > 0, else 0 (a ReLU's backward select; NaN in r gives 0)

and arrays for them:

    a = aligned_empty(shape, dtype)   # uninitialized, its data on a 64-byte boundary

Why: Numba has no vector type, and LLVM's auto-vectorizer keeps the accumulators of a
convolution's inner loop in memory (it cannot prove the arrays do not alias); every direct
convolution written as scalar Numba loops ran at a small fraction of OpenBLAS's GEMM
(BENCHMARKS.md, sessions 4 and 7). A vector here is an LLVM `<LANES x float>` value, so a kernel's
accumulators are SSA values that LLVM keeps in registers, as a C kernel with intrinsics would.

LANES is 16 (one AVX-512 register) where the CPU has AVX-512, else 8 (one AVX register; on a
CPU without AVX, LLVM splits each vector into narrower ones: the same results, slower). It is read
from the CPU that Numba compiles for, once at import. Numba's on-disk cache is keyed by that CPU,
so a cache made on another machine is not reused.

fma is LLVM's fmuladd: one rounding where the CPU fuses multiply and add, two where it does not.
Kernels built on it agree with the NumPy reference to rounding, not bit for bit, and give the
same bits on every run and thread count on one machine.
"""
from __future__ import annotations

import math
import operator

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, overload, register_model


def _lanes() -> int:
    if config.CPU_NAME:  # NUMBA_CPU_NAME set (a portable cache, say): assume no AVX-512
        return 8
    return 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8


LANES = _lanes()
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Float32Vector(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"float32x{LANES}")


float32_vector = Float32Vector()


@register_model(Float32Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def element_address(context, builder, array_type, array, index):
    """A pointer to array[index] of a 1-D array (no bounds check, no negative wrap-around)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index], inbounds=True)


def _check_array(array, dtype, what: str) -> None:
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype == dtype):
        raise TypeError(f"cnn_gpu.cpu.simd: expected a 1-D {what} array, got {array}")


@intrinsic
def zeros(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR, None)
    return float32_vector(), codegen


@intrinsic
def load(typingctx, array, index):
    _check_array(array, types.float32, "float32")

    def codegen(context, builder, signature, args):
        pointer = element_address(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)
    return float32_vector(array, types.intp), codegen


@intrinsic
def store(typingctx, array, index, vector):
    _check_array(array, types.float32, "float32")

    def codegen(context, builder, signature, args):
        pointer = element_address(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)
    return types.void(array, types.intp, float32_vector), codegen


@intrinsic
def broadcast(typingctx, array, index):
    _check_array(array, types.float32, "float32")

    def codegen(context, builder, signature, args):
        value = builder.load(element_address(context, builder, signature.args[0], args[0], args[1]), align=4)
        first = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        every_lane = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(first, ir.Constant(_VECTOR, ir.Undefined), every_lane)
    return float32_vector(array, types.intp), codegen


@intrinsic
def fma(typingctx, x, w, acc):
    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(_VECTOR, [_VECTOR] * 3)
        fmuladd = cgutils.get_or_insert_function(builder.module, function_type, f"llvm.fmuladd.v{LANES}f32")
        return builder.call(fmuladd, args)
    return float32_vector(float32_vector, float32_vector, float32_vector), codegen


# ---- float64 vectors: LANES64 doubles, one register ---------------------------------------------

LANES64 = LANES // 2
_VECTOR64 = ir.VectorType(ir.DoubleType(), LANES64)


class Float64Vector(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"float64x{LANES64}")


float64_vector = Float64Vector()


@register_model(Float64Vector)
class _Vector64Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR64)


@intrinsic
def zeros64(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR64, None)
    return float64_vector(), codegen


@intrinsic
def widen(typingctx, array, index):
    _check_array(array, types.float32, "float32")

    def codegen(context, builder, signature, args):
        pointer = element_address(context, builder, signature.args[0], args[0], args[1])
        narrow = builder.load(builder.bitcast(pointer, ir.VectorType(ir.FloatType(), LANES64).as_pointer()), align=4)
        return builder.fpext(narrow, _VECTOR64)
    return float64_vector(array, types.intp), codegen


@intrinsic
def load64(typingctx, array, index):
    _check_array(array, types.float64, "float64")

    def codegen(context, builder, signature, args):
        pointer = element_address(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(pointer, _VECTOR64.as_pointer()), align=8)
    return float64_vector(array, types.intp), codegen


@intrinsic
def store64(typingctx, array, index, vector):
    _check_array(array, types.float64, "float64")

    def codegen(context, builder, signature, args):
        pointer = element_address(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(pointer, _VECTOR64.as_pointer()), align=8)
    return types.void(array, types.intp, float64_vector), codegen


@intrinsic
def fma64(typingctx, x, w, acc):
    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(_VECTOR64, [_VECTOR64] * 3)
        fmuladd = cgutils.get_or_insert_function(builder.module, function_type, f"llvm.fmuladd.v{LANES64}f64")
        return builder.call(fmuladd, args)
    return float64_vector(float64_vector, float64_vector, float64_vector), codegen


@intrinsic
def where_positive(typingctx, r, d):
    def codegen(context, builder, signature, args):
        positive = builder.fcmp_ordered(">", args[0], ir.Constant(_VECTOR64, None))
        return builder.select(positive, args[1], ir.Constant(_VECTOR64, None))
    return float64_vector(float64_vector, float64_vector), codegen


def _lanewise(name: str):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, signature, args):
            return getattr(builder, name)(args[0], args[1])
        return float64_vector(float64_vector, float64_vector), codegen
    return op


for _operator, _instruction in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                                (operator.iadd, "fadd"), (operator.isub, "fsub"), (operator.imul, "fmul")):
    def _register(python_operator=_operator, op=_lanewise(_instruction)):
        @overload(python_operator)
        def vector_operator(a, b):
            if isinstance(a, Float64Vector) and isinstance(b, Float64Vector):
                return lambda a, b: op(a, b)
    _register()


def aligned_empty(shape: tuple[int, ...], dtype: object = np.float32) -> np.ndarray:
    """An uninitialized array whose data starts on a 64-byte boundary (a cache line, an AVX-512
    vector). NumPy's own arrays start 16 bytes past one as often as not, and every vector load or
    store of a row then straddles two lines (BENCHMARKS.md, session 9). Rows of a multiple of 64
    bytes (16 float32 channels) stay aligned."""
    dtype = np.dtype(dtype)
    size, per_line = math.prod(shape), 64 // dtype.itemsize
    buffer = np.empty(size + per_line, dtype=dtype)
    start = (-(buffer.ctypes.data // dtype.itemsize)) % per_line
    return buffer[start:start + size].reshape(shape)
