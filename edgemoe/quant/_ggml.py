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

Q4_0, Q8_0 = 2, 8  # enum ggml_type


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
        self.q4_0x8 = self._q4_0x8_funcs()
        # ggml's float16 -> float32 row conversion (F16C/AVX-512 where the CPU has them)
        self.fp16_to_fp32 = getattr(self.cpu, "ggml_cpu_fp16_to_fp32", None)
        if self.fp16_to_fp32 is not None:
            self.fp16_to_fp32.restype = None
            self.fp16_to_fp32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def _q4_0x8_funcs(self) -> tuple[int, int, int, int] | None:
        """(gemv, gemm, quantize_mat, from_float) of ggml's repacked Q4_0 8x8 kernels, the ones
        llama.cpp's CPU backend runs on x86 for Q4_0 weights; None where this build lacks them."""
        try:
            fns = [
                ctypes.cast(getattr(self.cpu, n), ctypes.c_void_p).value
                for n in ("ggml_gemv_q4_0_8x8_q8_0", "ggml_gemm_q4_0_8x8_q8_0", "ggml_quantize_mat_q8_0_4x8")
            ]
        except AttributeError:
            return None
        ff = self.cpu.ggml_get_type_traits_cpu(Q8_0).contents.from_float
        return (*fns, int(ff)) if all(fns) and ff else None

    def quantize(self, gtype: int, w: np.ndarray) -> np.ndarray:
        """float32 [n_out, n_in] -> uint8 [n_out, row bytes] quantized by ggml itself
        (ggml_quantize_chunk: llama.cpp's quantizer, no importance matrix)."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        n_out, n_in = w.shape
        out = np.empty((n_out, self.row_size(gtype, n_in)), np.uint8)
        f = self.base.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        f(gtype, w.ctypes.data, out.ctypes.data, 0, n_out, n_in, None)
        return out

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
        fty = ir.FunctionType(ir.VoidType(), [i32, ir.FloatType().as_pointer(), i64, i8p, i64, i8p, i64, i32])
        f = builder.inttoptr(fn_, fty.as_pointer())
        zero = ir.Constant(i64, 0)
        builder.call(
            f,
            [
                builder.trunc(n_, i32),
                builder.inttoptr(s_, ir.FloatType().as_pointer()),
                zero,
                builder.inttoptr(x_, i8p),
                zero,
                builder.inttoptr(y_, i8p),
                zero,
                ir.Constant(i32, 1),
            ],
        )
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
def matmul_kernel(vec_dot, from_float, w_addr, w_stride, n_out, n_in, x_addr, T, q_addr, q_stride, out_addr):
    # x: float32 [T, n_in] -> q: vec_dot_type [T, q_stride bytes] (quantized once)
    for t in range(T):
        _convert(from_float, x_addr + t * n_in * 4, q_addr + t * q_stride, n_in)
    # out float32 [T, n_out]; one weight row stays in L1 while it meets all T activations
    for r in prange(n_out):
        wr = w_addr + r * w_stride
        for t in range(T):
            _vec_dot(vec_dot, n_in, out_addr + (t * n_out + r) * 4, wr, q_addr + t * q_stride)


@njit(cache=True, nogil=True)
def matmul_kernel_1(vec_dot, from_float, w_addr, w_stride, n_out, n_in, x_addr, T, q_addr, q_stride, out_addr):
    # matmul_kernel on the calling thread alone (no fork-join): for small matrices, see kernels.py
    for t in range(T):
        _convert(from_float, x_addr + t * n_in * 4, q_addr + t * q_stride, n_in)
    for r in range(n_out):
        wr = w_addr + r * w_stride
        for t in range(T):
            _vec_dot(vec_dot, n_in, out_addr + (t * n_out + r) * 4, wr, q_addr + t * q_stride)


@intrinsic
def _gemx(typingctx, fn, n, s, bs, vx, vy, nr, nc):
    # ggml_gemv_* / ggml_gemm_* (int n, float * s, size_t bs, const void * vx, const void * vy,
    #                            int nr, int nc)
    sig = types.void(
        types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64
    )

    def codegen(context, builder, signature, args):
        fn_, n_, s_, bs_, vx_, vy_, nr_, nc_ = args
        i8p = ir.IntType(8).as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fty = ir.FunctionType(ir.VoidType(), [i32, ir.FloatType().as_pointer(), i64, i8p, i8p, i32, i32])
        f = builder.inttoptr(fn_, fty.as_pointer())
        builder.call(
            f,
            [
                builder.trunc(n_, i32),
                builder.inttoptr(s_, ir.FloatType().as_pointer()),
                bs_,
                builder.inttoptr(vx_, i8p),
                builder.inttoptr(vy_, i8p),
                builder.trunc(nr_, i32),
                builder.trunc(nc_, i32),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _q4_0x8_quantize(quant_mat, from_float, n_in, x_addr, T, q_addr, q_row):
    # Activations: groups of 4 rows as block_q8_0x4 (for gemm), the rest as plain Q8_0 rows.
    T4 = T - T % 4
    for t in range(0, T4, 4):
        _convert(quant_mat, x_addr + t * n_in * 4, q_addr + t * q_row, n_in)
    for t in range(T4, T):
        _convert(from_float, x_addr + t * n_in * 4, q_addr + t * q_row, n_in)


@njit(cache=True, nogil=True)
def _q4_0x8_groups(gemv, gemm, w_addr, row_bytes, n_out, n_in, T, q_addr, q_row, out_addr, g0, g1):
    # output rows 8 * g0 .. 8 * g1 (weights in ggml's block_q4_0x8 layout: 8 rows interleaved)
    if g1 <= g0:
        return
    T4 = T - T % 4
    c0 = g0 * 8
    nc = (g1 - g0) * 8
    w = w_addr + c0 * row_bytes
    if T4 > 0:
        _gemx(gemm, n_in, out_addr + c0 * 4, n_out, w, q_addr, T4, nc)
    for t in range(T4, T):
        _gemx(gemv, n_in, out_addr + (t * n_out + c0) * 4, n_out, w, q_addr + t * q_row, 1, nc)


@njit(parallel=True, cache=True, nogil=True)
def q4_0x8_matmul_kernel(
    gemv, gemm, quant_mat, from_float, w_addr, row_bytes, n_out, n_in, x_addr, T, q_addr, q_row, out_addr, n_chunks
):
    # Weights in ggml's block_q4_0x8 layout (8 rows interleaved; same bytes per 8 rows as Q4_0).
    _q4_0x8_quantize(quant_mat, from_float, n_in, x_addr, T, q_addr, q_row)
    groups = n_out // 8
    for c in prange(n_chunks):
        g0 = groups * c // n_chunks
        g1 = groups * (c + 1) // n_chunks
        _q4_0x8_groups(gemv, gemm, w_addr, row_bytes, n_out, n_in, T, q_addr, q_row, out_addr, g0, g1)


@njit(cache=True, nogil=True)
def q4_0x8_matmul_kernel_1(
    gemv, gemm, quant_mat, from_float, w_addr, row_bytes, n_out, n_in, x_addr, T, q_addr, q_row, out_addr, n_chunks
):
    # q4_0x8_matmul_kernel on the calling thread alone (no fork-join; n_chunks unused)
    _q4_0x8_quantize(quant_mat, from_float, n_in, x_addr, T, q_addr, q_row)
    _q4_0x8_groups(gemv, gemm, w_addr, row_bytes, n_out, n_in, T, q_addr, q_row, out_addr, 0, n_out // 8)


@njit(cache=True, nogil=True)
def repack_q4_0x8(flat, n_out, row_bytes, tmp):
    # flat: uint8 [n_out * row_bytes], rows of Q4_0 blocks (18 bytes: f16 d, 16 bytes of nibbles),
    # n_out a multiple of 8; rewritten in place, 8 rows at a time, into block_q4_0x8: for each
    # block column, the 8 rows' scales, then their nibbles in 8-byte pieces taken from the rows in
    # turn, each byte XOR 0x88 (signed nibbles). tmp: uint8 [8 * row_bytes] scratch.
    nb = row_bytes // 18
    for g in range(0, n_out, 8):
        base = g * row_bytes
        tmp[:] = flat[base : base + 8 * row_bytes]
        for b in range(nb):
            o = base + b * 144
            for r in range(8):
                flat[o + 2 * r] = tmp[r * row_bytes + b * 18]
                flat[o + 2 * r + 1] = tmp[r * row_bytes + b * 18 + 1]
            for i in range(16):
                src = (i % 8) * row_bytes + b * 18 + 2 + (i // 8) * 8
                for j in range(8):
                    flat[o + 16 + i * 8 + j] = tmp[src + j] ^ 0x88


@njit(cache=True, nogil=True)
def rows_kernel(to_float, w_addr, w_stride, rows, n_in, out_addr):
    for i in range(rows.shape[0]):
        _convert(to_float, w_addr + rows[i] * w_stride, out_addr + i * n_in * 4, n_in)
