"""ctypes binding to ggml's CPU dot kernels, as shipped by llama-cpp-python (llama_cpp/lib).

We use exactly what llama.cpp's CPU backend uses for a quantized matmul: quantize the activation
row once with `from_float` of the weight type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K, or
F16/BF16/F32), then `vec_dot(weight_row, activation_row)` per output element. The row loop runs in numba
(nopython, prange); the C function pointers are passed to it as plain integers and called through
a small LLVM intrinsic, so the compiled kernel can be cached on disk (a ctypes function object
would be baked into the code as a constant address and defeat `cache=True`).

Nothing here imports llama_cpp itself (that loads libllama and takes a while); we only locate its
package directory and dlopen libggml-base / libggml-cpu from it. dlopen of the same path that
llama_cpp uses returns the same handle, so both can live in one process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


class _CpuTraits(ctypes.Structure):
    # struct ggml_type_traits_cpu (ggml/include/ggml-cpu.h)
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


class _Traits(ctypes.Structure):
    # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def lib_dir() -> Path:
    """Directory holding libggml-base.so / libggml-cpu.so (EDGEMOE_GGML_LIB overrides)."""
    override = os.environ.get("EDGEMOE_GGML_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("llama_cpp (llama-cpp-python) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _find(d: Path, stem: str) -> Path:
    for name in (f"{stem}.so", f"{stem}.dylib", f"{stem}.dll"):
        if (d / name).exists():
            return d / name
    raise OSError(f"{stem} not found in {d}")


class GGMLLib:
    """The loaded libraries and the per-type function pointers (plain ints)."""

    def __init__(self) -> None:
        d = lib_dir()
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        self.base = ctypes.CDLL(str(_find(d, "libggml-base")), mode=mode)
        self.cpu = ctypes.CDLL(str(_find(d, "libggml-cpu")), mode=mode)
        self.cpu.ggml_cpu_init.restype = None
        self.cpu.ggml_cpu_init.argtypes = []
        # initialises the fp16 / e8m0 lookup tables the dot kernels read
        self.cpu.ggml_cpu_init()
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.base.ggml_row_size.restype = ctypes.c_size_t
        self.base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self._cache: dict[int, tuple[int, int, int, int] | None] = {}

    def row_size(self, gtype: int, n: int) -> int:
        return int(self.base.ggml_row_size(gtype, n))

    def to_float(self, gtype: int) -> int:
        return int(self.base.ggml_get_type_traits(gtype).contents.to_float or 0)

    def dot_funcs(self, gtype: int) -> tuple[int, int, int, int] | None:
        """(vec_dot, from_float of vec_dot_type, vec_dot_type, to_float) or None if unusable."""
        if gtype in self._cache:
            return self._cache[gtype]
        res = None
        t = self.cpu.ggml_get_type_traits_cpu(gtype).contents
        if t.vec_dot:
            vt = int(t.vec_dot_type)
            ff = self.cpu.ggml_get_type_traits_cpu(vt).contents.from_float
            if ff:
                res = (int(t.vec_dot), int(ff), vt, self.to_float(gtype))
        self._cache[gtype] = res
        return res


# ---------------------------------------------------------------------------------------------
# numba side: call C function pointers given as integers (compiled on first call, cached on disk)


@intrinsic
def _vec_dot(typingctx, fn, n, s, x, y):
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fn_, n_, s_, x_, y_ = args
        i8p = ir.IntType(8).as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fty = ir.FunctionType(ir.VoidType(), [i32, ir.FloatType().as_pointer(), i64,
                                              i8p, i64, i8p, i64, i32])
        f = builder.inttoptr(fn_, fty.as_pointer())
        zero = ir.Constant(i64, 0)
        builder.call(f, [builder.trunc(n_, i32),
                         builder.inttoptr(s_, ir.FloatType().as_pointer()), zero,
                         builder.inttoptr(x_, i8p), zero,
                         builder.inttoptr(y_, i8p), zero, ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _convert(typingctx, fn, src, dst, k):
    # from_float (const float *, void *, int64) and to_float (const void *, float *, int64)
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fn_, a_, b_, k_ = args
        i8p = ir.IntType(8).as_pointer()
        fty = ir.FunctionType(ir.VoidType(), [i8p, i8p, ir.IntType(64)])
        f = builder.inttoptr(fn_, fty.as_pointer())
        builder.call(f, [builder.inttoptr(a_, i8p), builder.inttoptr(b_, i8p), k_])
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True, nogil=True)
def matmul_kernel(vec_dot, from_float, w_addr, w_stride, n_out, n_in,
                  x_addr, T, q_addr, q_stride, out_addr):
    # x: float32 [T, n_in] -> q: vec_dot_type [T, q_stride bytes] (quantized once)
    for t in range(T):
        _convert(from_float, x_addr + t * n_in * 4, q_addr + t * q_stride, n_in)
    # out float32 [T, n_out]; one weight row stays in L1 while it meets all T activations
    for r in prange(n_out):
        wr = w_addr + r * w_stride
        for t in range(T):
            _vec_dot(vec_dot, n_in, out_addr + (t * n_out + r) * 4, wr, q_addr + t * q_stride)


@njit(cache=True, nogil=True)
def rows_kernel(to_float, w_addr, w_stride, rows, n_in, out_addr):
    for i in range(rows.shape[0]):
        _convert(to_float, w_addr + rows[i] * w_stride, out_addr + i * n_in * 4, n_in)


def addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])
