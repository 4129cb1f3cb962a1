"""Small ggml graphs on the CPU backend of llama-cpp-python's libggml, over numpy memory.

Where llama.cpp's result depends on the order in which ggml rounds (the router's F32 product and
its sigmoid or softmax, RoPE, the attention core: KQ, the masked softmax, KQV), edgemoe runs the
same ggml ops with the same shapes and views as llama.cpp's graph builder, so its numbers are
llama.cpp's to the bit. That matters on quantized files: llama.cpp quantizes each matmul's
activations to Q8_0, and a last-bit difference now and then moves a value across a rounding
boundary of the quantizer; the token's output then moves by ~1e-3 relative and, through the KV
cache, every later token's too.

Each input and output is a numpy array wrapped as a CPU buffer (no copies); the intermediate
tensors in fresh numpy buffers freed with the call. One backend per process.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from ..errors import EdgeMoEError
from . import kernels
from .buffers import addr, aligned

F32, F16, I32 = 0, 1, 26  # enum ggml_type
_NP = {np.dtype(np.float32): F32, np.dtype(np.float16): F16, np.dtype(np.int32): I32}
ROPE_NORM, ROPE_NEOX = 0, 2
# llama.cpp pads the KV cells an attention reads to a multiple of this (and n_ctx with it); the
# padded length sets the SIMD grouping of KQV's dot products, so it is part of the result
KV_PAD = 256
_MAX_NODES = 32


def available() -> bool:
    return kernels.BACKEND == "ggml"


def kv_len(n_past_plus_t: int, n_ctx: int) -> int:
    """How many cache cells llama.cpp's attention reads with S cells in use: S rounded up to
    KV_PAD, at most the (padded) context size."""
    pad = -(-n_past_plus_t // KV_PAD) * KV_PAD
    return min(pad, -(-n_ctx // KV_PAD) * KV_PAD)


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def vec_swiglu():
    """ggml_vec_swiglu_f32(n, y, x, g): y = silu(x) * g, as libggml-cpu computes it for
    ggml_swiglu (its SIMD expf); None without the ggml kernels (looked up on each call: tests
    reload the kernels with another backend)."""
    return _vec_swiglu(kernels._lib.cpu) if available() else None


@functools.cache
def _vec_swiglu(cpu):
    fn = getattr(cpu, "ggml_vec_swiglu_f32", None)
    if fn is not None:
        fn.restype = None
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class _Ctx:
    """One graph being built: tensors bound to numpy arrays, ops, then compute (holding the Graph's
    lock from creation to close)."""

    def __init__(self, g: Graph):
        self.g = g
        g.lock.acquire()
        self.ctx = g.init(g.InitParams(g.mem, addr(g.arena), True))
        if not self.ctx:
            g.lock.release()
            raise EdgeMoEError("ggml: ggml_init failed")
        self.bufs: list[int] = []
        self.keep: list[np.ndarray] = []

    def bind(self, arr: np.ndarray, t: int | None = None) -> int:
        """A tensor over arr's memory (ne = arr.shape reversed), or bind tensor t to it."""
        g = self.g
        if t is None:
            ne = [ctypes.c_int64(n) for n in reversed(arr.shape)] + [ctypes.c_int64(1)] * (4 - arr.ndim)
            t = g.new_4d(self.ctx, _NP[arr.dtype], *ne)
        ptr = addr(arr)
        if ptr % 32 or not arr.flags.c_contiguous:  # ggml aborts the process on an unaligned buffer
            raise EdgeMoEError("ggml: an array bound to a graph must be C-contiguous and 32-byte aligned")
        b = g.from_ptr(ptr, max(arr.nbytes, 1))
        if not b:
            raise EdgeMoEError("ggml: cannot wrap an array as a CPU buffer")
        self.bufs.append(b)
        self.keep.append(arr)
        if g.tensor_alloc(b, t, ptr) != 0:
            raise EdgeMoEError("ggml: ggml_backend_tensor_alloc failed")
        return t

    def new(self, t: int) -> int:
        """Op result t, placed in a fresh numpy buffer (freed with this graph: no allocator keeps
        memory from one call to the next, so RSS does not creep with the largest graph seen)."""
        return self.bind(aligned(np.empty(self.g.nbytes(t), dtype=np.uint8)), t)

    def view(self, t: int) -> int:
        """View op t (permute, transpose, view) onto its source's memory."""
        if self.g.view_init(t) != 0:
            raise EdgeMoEError("ggml: ggml_backend_view_init failed")
        return t

    def compute(self, out_t: int, out: np.ndarray) -> np.ndarray:
        """Compute the graph ending in out_t into out."""
        g = self.g
        self.bind(out, out_t)
        gf = g.new_graph(self.ctx)
        g.expand(gf, out_t)
        if g.compute(g.backend, gf) != 0:
            raise EdgeMoEError("ggml: graph compute failed")
        return out

    def close(self) -> None:
        try:
            for b in self.bufs:
                self.g.buffer_free(b)
            self.g.free(self.ctx)
        finally:
            self.g.lock.release()


class Graph:
    """The process's one CPU backend. Building and computing a graph holds its
    lock: a backend per thread would be a leak under the server, which runs each request on a new
    thread (and the graphs are small)."""

    _one: Graph | None = None
    _make = threading.Lock()

    @classmethod
    def get(cls) -> Graph:
        if cls._one is None:
            with cls._make:
                if cls._one is None:
                    cls._one = cls()
        return cls._one

    def __init__(self) -> None:
        self.lock = threading.Lock()
        base, cpu = kernels._lib.base, kernels._lib.cpu
        vp, sz, i64, i32, f32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int, ctypes.c_float

        def fn(lib, name, res, *args):  # (a CDLL hands out one function object per name: every
            f = getattr(lib, name)  # thread's Graph sets the same prototypes on it)
            f.restype, f.argtypes = res, list(args)
            return f

        self.InitParams = _InitParams
        self.init = fn(base, "ggml_init", vp, _InitParams)
        self.free = fn(base, "ggml_free", None, vp)
        self.mem = fn(base, "ggml_tensor_overhead", sz)() * _MAX_NODES + fn(base, "ggml_graph_overhead", sz)()
        # the graph's tensor and node records, in memory of ours reused by every graph (one at a time,
        # under the lock): ggml_init would otherwise malloc and free ~100 KB per call, and the heap
        # fragments as the calls interleave with numpy's allocations
        self.arena = aligned(np.empty(self.mem, dtype=np.uint8))
        self.new_4d = fn(base, "ggml_new_tensor_4d", vp, vp, i32, i64, i64, i64, i64)
        self.view_4d = fn(base, "ggml_view_4d", vp, vp, vp, i64, i64, i64, i64, sz, sz, sz, sz)
        self.permute = fn(base, "ggml_permute", vp, vp, vp, i32, i32, i32, i32)
        self.transpose = fn(base, "ggml_transpose", vp, vp, vp)
        self.cont = fn(base, "ggml_cont", vp, vp, vp)
        self.mul_mat = fn(base, "ggml_mul_mat", vp, vp, vp, vp)
        self.sigmoid = fn(base, "ggml_sigmoid", vp, vp, vp)
        self.soft_max = fn(base, "ggml_soft_max", vp, vp, vp)
        self.soft_max_ext = fn(base, "ggml_soft_max_ext", vp, vp, vp, vp, f32, f32)
        self.add_sinks = fn(base, "ggml_soft_max_add_sinks", None, vp, vp)
        self.rope_ext = fn(base, "ggml_rope_ext", vp, vp, vp, vp, vp, i32, i32, i32, f32, f32, f32, f32, f32, f32)
        self.new_graph = fn(base, "ggml_new_graph", vp, vp)
        self.expand = fn(base, "ggml_build_forward_expand", None, vp, vp)
        self.tensor_alloc = fn(base, "ggml_backend_tensor_alloc", i32, vp, vp, vp)
        self.buffer_free = fn(base, "ggml_backend_buffer_free", None, vp)
        self.compute = fn(base, "ggml_backend_graph_compute", i32, vp, vp)
        self.nbytes = fn(base, "ggml_nbytes", sz, vp)
        self.view_init = fn(base, "ggml_backend_view_init", i32, vp)
        self.from_ptr = fn(cpu, "ggml_backend_cpu_buffer_from_ptr", vp, vp, sz)
        self.backend = fn(cpu, "ggml_backend_cpu_init", vp)()
        if not self.backend:
            raise EdgeMoEError("ggml: cannot start the CPU backend")
        # one thread: these graphs are small, and each compute on more would start its threads
        # (each output value is computed by one thread either way, so the result is the same)
        fn(cpu, "ggml_backend_cpu_set_n_threads", None, vp, i32)(self.backend, 1)

    def router_probs(self, router: np.ndarray, h: np.ndarray, softmax: bool) -> np.ndarray:
        """sigmoid or softmax of h [T, D] @ router [E, D].T -> [T, E], as llama.cpp's
        build_moe_ffn: ggml_mul_mat of the F32 router (llamafile's tinyBLAS on x86, with its own
        summation order), then ggml_sigmoid or ggml_soft_max."""
        c = _Ctx(self)
        try:
            logits = c.new(self.mul_mat(c.ctx, c.bind(aligned(router)), c.bind(aligned(h))))  # [E, T]
            probs = self.soft_max(c.ctx, logits) if softmax else self.sigmoid(c.ctx, logits)
            return c.compute(probs, aligned(np.empty((h.shape[0], router.shape[0]), dtype=np.float32)))
        finally:
            c.close()

    def rope(
        self,
        x: np.ndarray,
        pos: np.ndarray,
        n_dims: int,
        mode: int,
        freq_factors: np.ndarray | None,
        n_ctx_orig: int,
        freq_base: float,
        freq_scale: float,
        ext_factor: float,
        attn_factor: float,
        beta_fast: float,
        beta_slow: float,
    ) -> np.ndarray:
        """ggml_rope_ext of x [T, H, Dh] at positions pos [T] (the first n_dims of each head)."""
        c = _Ctx(self)
        try:
            tx = c.bind(aligned(np.asarray(x, dtype=np.float32)))
            tp = c.bind(aligned(np.asarray(pos, dtype=np.int32)))
            tf = c.bind(aligned(np.asarray(freq_factors, dtype=np.float32))) if freq_factors is not None else None
            t = self.rope_ext(
                c.ctx,
                tx,
                tp,
                tf,
                n_dims,
                mode,
                n_ctx_orig,
                freq_base,
                freq_scale,
                ext_factor,
                attn_factor,
                beta_fast,
                beta_slow,
            )
            return c.compute(t, aligned(np.empty(x.shape, dtype=np.float32)))
        finally:
            c.close()

    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray | int,
        n_kv: int,
        mask: np.ndarray,
        scale: float,
        sinks: np.ndarray | None = None,
    ) -> np.ndarray:
        """softmax(scale * q k^T + mask [, sinks]) v as llama.cpp's build_attn_mha without flash
        attention, over the first n_kv cache cells (the graph is llama.cpp's, views included).

        q [T, H, Dk] float32; k: the layer's K cache [cells, Hk, Dk] (f16 or f32, as stored); v
        either the layer's V cache stored transposed as llama.cpp's, [Hk, Dv, cells], or, for MLA,
        an int Dv: V is then the first Dv values of each K row (a view of the K cache, as llama.cpp's
        K-only MLA cache; ggml transposes it into a copy, as llama.cpp does); mask [T, n_kv]
        float32 (0 or -inf). Returns [H, T, Dv] float32 (head-major, as ggml leaves KQV)."""
        c = _Ctx(self)
        try:
            T, H, _ = q.shape
            _, Hk, Dk = k.shape
            k = aligned(k[:n_kv])
            es = k.itemsize
            tq = c.view(self.permute(c.ctx, c.bind(aligned(np.asarray(q, dtype=np.float32))), 0, 2, 1, 3))
            tk_full = c.bind(k)  # [Dk, Hk, n_kv]
            tk = c.view(self.permute(c.ctx, tk_full, 0, 2, 1, 3))  # [Dk, n_kv, Hk]
            if isinstance(v, int):
                Dv = v
                tv = c.view(
                    self.view_4d(c.ctx, tk_full, Dv, Hk, n_kv, 1, Dk * es, Hk * Dk * es, n_kv * Hk * Dk * es, 0)
                )
                tv = c.view(self.transpose(c.ctx, c.view(self.permute(c.ctx, tv, 0, 2, 1, 3))))
                tv = c.new(self.cont(c.ctx, tv))  # [n_kv, Dv, Hk]
            else:
                Dv, cells = v.shape[1], v.shape[2]
                ves = v.itemsize
                tv = c.view(
                    self.view_4d(
                        c.ctx,
                        c.bind(aligned(v)),
                        n_kv,
                        Dv,
                        Hk,
                        1,
                        cells * ves,
                        Dv * cells * ves,
                        Hk * Dv * cells * ves,
                        0,
                    )
                )  # [n_kv, Dv, Hk], rows strided over all cells
            kq = c.new(self.mul_mat(c.ctx, tk, tq))  # [n_kv, T, H]
            kq = self.soft_max_ext(c.ctx, kq, c.bind(aligned(np.asarray(mask, dtype=np.float32))), scale, 0.0)
            if sinks is not None:
                self.add_sinks(kq, c.bind(aligned(np.asarray(sinks, dtype=np.float32))))
            kq = c.new(kq)
            kqv = self.mul_mat(c.ctx, tv, kq)  # [Dv, T, H]
            return c.compute(kqv, aligned(np.empty((H, T, Dv), dtype=np.float32)))
        finally:
            c.close()
