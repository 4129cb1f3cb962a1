"""Matrix-vector and small matrix-matrix products computed directly on GGUF-quantized weights.

Shapes: W is [n_out, n_in] (one GGUF 2-D tensor, or one expert's slice of a 3-D one), x is
[T, n_in] float32, the result [T, n_out] float32 = x @ W.T. Weights are never expanded to a
float32 copy of the matrix.

Two backends, picked at import:
- "ggml": llama.cpp's own CPU dot kernels (libggml-cpu from llama-cpp-python), called from a numba
  prange loop over output rows. Activations are quantized once per call to the weight type's
  vec_dot_type (Q8_0 / Q8_1 / Q8_K, or F16 / BF16), exactly as llama.cpp does on the CPU, so
  quantized logits track llama.cpp's.
- "numpy": dequantize a tile of rows (at most _TILE_BYTES of float32) with gguf-py and multiply
  with BLAS. Exact with respect to float32 activations; slow. Used when numba or the ggml library
  is missing, or forced.
EDGEMOE_KERNELS=numpy|ggml forces one. Threads: set_threads (edgemoe.load(threads=), -t), else
EDGEMOE_THREADS, else llama.cpp's default, the physical cores (threads.py); products below
PARALLEL_MIN_BYTES run on the calling thread alone.
F32 weights always go through BLAS (as fast as vec_dot_f32 at T=1, 2x faster at T=32).

Q4_0 and Q4_K matrices whose bytes we own (copied into memory at load) are repacked in place into
ggml's block_q4_0x8 / block_q4_Kx8 layout (`pack`; repack.py for Q4_K; the same bytes) and
multiplied by ggml's gemv/gemm for that layout, as llama.cpp's CPU backend does by default: ~1.4x
faster than the per-row vec_dot on this machine for Q4_0; for Q4_K ~1.1x at T=1 (within 5% with
the weights cold in RAM) and 1.6-1.8x at T=32 (docs/benchmarks.md).

For T > 1 the ggml loop takes one weight row at a time and dots it with all T quantized
activations, so the row is read from memory once per call, not once per token.
matmul may be called from several threads at once (the kernels keep no shared state; numba's omp
layer is thread-safe, and launches are serialized if numba fell back to its workqueue layer).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import EdgeMoEError
from . import threads
from .buffers import addr

# float32 scratch bound for the numpy path: one tile of rows x n_in
_TILE_BYTES = 256 * 1024

_FLOAT_TYPES = (QT.F32, QT.F16)
_NUMPY_QUANT_TYPES = frozenset(
    QT[name]
    for name in (
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "TQ1_0",
        "TQ2_0",
        "MXFP4",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ3_XXS",
        "IQ3_S",
        "IQ1_S",
        "IQ1_M",
        "IQ4_NL",
        "IQ4_XS",
    )
    if name in QT.__members__
)


def _load_ggml():
    """Import the ggml binding; returns the library object or raises (OSError, ImportError)."""
    if importlib.util.find_spec("numba") is None:
        raise ImportError("numba is not installed")
    from . import _ggml

    return _ggml, _ggml.GGMLLib()


def _select_backend() -> tuple[str, object, object]:
    forced = os.environ.get("EDGEMOE_KERNELS", "").strip().lower()
    if forced not in ("", "ggml", "numpy"):
        raise EdgeMoEError(f"EDGEMOE_KERNELS={forced!r}: expected 'ggml' or 'numpy'")
    if forced == "numpy":
        return "numpy", None, None
    try:
        mod, lib = _load_ggml()
    except (OSError, ImportError, AttributeError) as exc:
        if forced == "ggml":
            raise EdgeMoEError(f"EDGEMOE_KERNELS=ggml but the ggml kernels cannot load: {exc}") from exc
        warnings.warn(
            f"edgemoe: ggml kernels unavailable ({exc}); using the slow numpy path", RuntimeWarning, stacklevel=2
        )
        return "numpy", None, None
    return "ggml", mod, lib


def _announce_compiles() -> None:
    """Say on stderr, once, when numba starts compiling one of edgemoe's kernels: that happens
    only when its on-disk cache (numba's __pycache__ or NUMBA_CACHE_DIR) has no build of it for
    this numba and this source, i.e. on a fresh install or after an upgrade, and takes a while.
    numba fires "numba:compile" only after its cache lookup failed (Dispatcher.compile)."""
    try:
        from numba.core import event
    except ImportError:
        return

    class Notice(event.Listener):
        said = False

        def on_start(self, ev) -> None:
            fn = getattr((ev.data or {}).get("dispatcher"), "py_func", None)
            if not self.said and getattr(fn, "__module__", "").startswith("edgemoe."):
                self.said = True
                clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # over a progress bar's line, if any
                msg = f"edgemoe: compiling kernels (first run only, up to ~{COMPILE_S} s)"
                print(clear + msg, file=sys.stderr, flush=True)

        def on_end(self, ev) -> None:
            pass

    event.register("numba:compile", Notice())


# compiling took 0.7 s for a GGUF in place and 7 s with a native store's kernels on a 2-core EPYC
# VM (NUMBA_CACHE_DIR empty); slower CPUs and the nested schemes' kernels take longer
COMPILE_S = 20
BACKEND, _ggml_mod, _lib = _select_backend()
if BACKEND == "ggml":
    _announce_compiles()
# the types `pack` rewrites into ggml's 8-row interleaved layouts -> (gemv, gemm, quantize_mat,
# from_float): Q4_0 -> block_q4_0x8, Q4_K -> block_q4_Kx8 (repack.py), where the build has them
_PACKED: dict = {}
if BACKEND == "ggml":
    from . import repack

    _PACKED = {t: f for t, f in ((QT.Q4_0, _lib.q4_0x8), (QT.Q4_K, repack.q4_Kx8_funcs(_lib))) if f is not None}
THREADS = threads.env_threads()
# A product with fewer weight bytes x tokens than this runs on the calling thread alone: below it
# waking the other threads costs more than they save (measured on a 2-core EPYC VM, with passive
# waits since dropped: a 256x256 Q8_0 matmul, 70 KB, 16 us on one thread, 33 us on two; 4096x256,
# 1.1 MB, 75 us on one, 92 on two under load), and each fork-join waits for its slowest thread,
# which may not get a core for a while when other processes keep them busy (with libgomp's default
# waits, tools/bench_busy.py: the bundled model on 2 threads keeps 0.55 of its speed beside a busy
# core with this threshold, 0.26 without). The bundled model's matrices are all below it but the
# output projection. EDGEMOE_PARALLEL_MIN_BYTES overrides (0: every product forks, as before
# issue 17).
PARALLEL_MIN_BYTES = threads.parallel_min_bytes(1 << 20)
_tls = threading.local()
# numba's "workqueue" threading layer aborts on concurrent parallel launches; omp and tbb are
# thread-safe. Until the first launch tells us which layer we got, launches are serialized.
_launch_lock = threading.Lock()
_launch_safe: bool | None = None


def set_threads(n) -> int:
    """Run the kernels on n threads from now on (process-wide: each calling thread takes the new
    count at its next launch). n: a positive int (or its string); EdgeMoEError otherwise."""
    global THREADS
    THREADS = threads.parse_threads(n)
    return THREADS


def supported(qtype) -> bool:
    """Whether weights of this GGUF type can be multiplied (and row-dequantized)."""
    try:
        qtype = QT(qtype)
    except ValueError:
        return False
    if qtype in _FLOAT_TYPES or qtype in _NUMPY_QUANT_TYPES:
        return True
    return BACKEND == "ggml" and _lib.dot_funcs(int(qtype)) is not None


class QWeight:
    """A 2-D weight matrix [n_out, n_in] stored in a GGUF type, as a zero-copy view.

    data is what gguf.GGUFReader gives for a 2-D tensor (or one expert's slice of a 3-D tensor):
    F32 -> float32 [n_out, n_in]; F16 -> float16 [n_out, n_in]; everything else (BF16 and all
    quants) -> uint8 [n_out, row_bytes]. Rows must be contiguous; the row stride may be anything.
    """

    __slots__ = ("data", "qtype", "shape", "nbytes", "name", "row_bytes", "_dot", "packed", "addr")

    def __init__(self, data: np.ndarray, qtype, n_in: int, name: str = ""):
        self.name = name
        try:
            qtype = QT(qtype)
        except ValueError:
            raise EdgeMoEError(f"tensor {name}: unknown GGML type id {qtype!r}") from None
        self.qtype = qtype
        if not supported(qtype):
            raise EdgeMoEError(
                f"tensor {name}: weight type {qtype.name} is not supported by the {BACKEND} "
                f"kernels (supported: {', '.join(t.name for t in QT if supported(t))})"
            )
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        n_in = int(n_in)
        if n_in <= 0 or n_in % block:
            raise EdgeMoEError(
                f"tensor {name}: row length {n_in} is not a multiple of the {qtype.name} block size {block}"
            )
        self.row_bytes = n_in // block * tsize
        data = np.asarray(data)
        want = {QT.F32: np.float32, QT.F16: np.float16}.get(qtype, np.uint8)
        if data.dtype != want and data.dtype == np.uint8 and data.ndim == 2:
            data = data.view(want)  # raw bytes of a float tensor: reinterpret, no copy
        width = n_in if want is not np.uint8 else self.row_bytes
        if data.ndim != 2 or data.dtype != want or data.shape[1] != width:
            raise EdgeMoEError(
                f"tensor {name}: expected {np.dtype(want).name} data of shape [n_out, {width}] "
                f"for {qtype.name} with n_in={n_in}, got {data.dtype.name} {list(data.shape)}"
            )
        if data.strides[1] != data.itemsize:
            raise EdgeMoEError(f"tensor {name}: weight rows are not contiguous in memory")
        self.data = data
        self.addr = int(data.__array_interface__["data"][0])  # for the ggml kernels, every call
        self.shape = (int(data.shape[0]), n_in)
        self.nbytes = int(data.shape[0]) * self.row_bytes
        self.packed = False  # True once `pack` rewrote the rows into block_q4_0x8 / block_q4_Kx8
        self._dot = None
        # ggml dot kernel where it has one; F32 stays on BLAS (faster than vec_dot_f32 here)
        funcs = _lib.dot_funcs(int(qtype)) if BACKEND == "ggml" and qtype != QT.F32 else None
        if funcs is not None:
            vec_dot, from_float, vdt, to_float = funcs
            self._dot = (vec_dot, from_float, _lib.row_size(vdt, n_in), to_float)

    @classmethod
    def prepacked(cls, data: np.ndarray, qtype, n_in: int, name: str = "") -> QWeight:
        """A Q4_0 or Q4_K weight whose bytes are already in the layout `pack` writes (block_q4_0x8,
        block_q4_Kx8)."""
        w = cls(data, qtype, n_in, name)
        if not can_pack_shape(w.qtype, w.shape[0]):
            raise EdgeMoEError(
                f"tensor {name}: repacked {w.qtype.name} needs ggml's repacked kernels and rows in multiples of 8"
            )
        w.packed = True
        return w

    def __repr__(self) -> str:
        return f"QWeight({self.name!r}, {self.qtype.name}, shape={self.shape})"


def to_f32(x: np.ndarray) -> np.ndarray:
    """x as float32: float16 through ggml's SIMD row conversion when the ggml backend is loaded
    (the KV cache, every token and layer; numpy's astype converts element by element), a float32
    array as it is."""
    if x.dtype == np.float32:
        return x
    if x.dtype == np.float16 and BACKEND == "ggml" and _lib.fp16_to_fp32 is not None and x.flags.c_contiguous:
        out = np.empty(x.shape, np.float32)
        _lib.fp16_to_fp32(x.ctypes.data, out.ctypes.data, x.size)
        return out
    return x.astype(np.float32)


def can_pack_shape(qtype, n_out: int) -> bool:
    """Whether ggml's repacked kernels take [n_out, n_in] weights of this type (Q4_0 or Q4_K,
    n_out a multiple of 8, and the kernels present in this build)."""
    return qtype in _PACKED and n_out % 8 == 0


def can_pack(w: QWeight) -> bool:
    """Whether `pack` applies: can_pack_shape, and the bytes writable and contiguous (not a
    read-only file mapping)."""
    return (
        can_pack_shape(w.qtype, w.shape[0])
        and not w.packed
        and w.data.flags.writeable
        and w.data.strides[0] == w.row_bytes
    )


def packs_any(tensors) -> bool:
    """Whether a model with these GGUF tensors (gguf_file.Tensor) has matrices `pack` would take."""
    return any(len(t.shape) >= 2 and can_pack_shape(t.qtype, t.shape[1]) for t in tensors)


def pack(w: QWeight) -> QWeight:
    """Rewrite w's bytes in place into ggml's block_q4_0x8 (Q4_0) or block_q4_Kx8 (Q4_K) layout,
    the same size, and mark it, so matmul runs ggml's repacked gemv/gemm. The bytes are no longer
    plain rows afterwards: only pack weights that are used for nothing but matmul. Returns w;
    no-op unless can_pack(w)."""
    if can_pack(w):
        flat = w.data.reshape(-1)
        fn = repack.repack_q4_Kx8 if w.qtype == QT.Q4_K else _ggml_mod.repack_q4_0x8
        fn(flat, w.shape[0], w.row_bytes, np.empty(8 * w.row_bytes, np.uint8))
        w.packed = True
    return w


def unpack(w: QWeight) -> np.ndarray:
    """A copy of a packed weight's bytes as plain Q4_0 / Q4_K rows [n_out, row_bytes] (pack,
    inverted)."""
    if not w.packed:
        return np.array(w.data)
    if w.qtype == QT.Q4_K:
        return repack.unpack_q4_Kx8(w.data, w.shape[0], w.row_bytes)
    n_out, nb = w.shape[0], w.row_bytes // 18
    b = w.data.reshape(n_out // 8, nb, 144)
    rows = np.empty((n_out // 8, 8, nb, 18), np.uint8)
    rows[..., :2] = b[..., :16].reshape(-1, nb, 8, 2).transpose(0, 2, 1, 3)
    # nibble piece i of a block came from row i % 8, bytes (i // 8) * 8 .. + 8
    q = (b[..., 16:] ^ np.uint8(0x88)).reshape(-1, nb, 2, 8, 8)
    rows[..., 2:] = q.transpose(0, 3, 1, 2, 4).reshape(-1, 8, nb, 16)
    return rows.reshape(n_out, w.row_bytes)


def _as_input(w: QWeight, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise EdgeMoEError(
            f"tensor {w.name}: input of shape {list(x.shape)} does not match "
            f"weight shape [n_out={w.shape[0]}, n_in={w.shape[1]}]"
        )
    return x


def matmul(w: QWeight, x: np.ndarray) -> np.ndarray:
    """x float32 [T, n_in] (or [n_in]) -> float32 [T, n_out] (or [n_out]) = x @ W.T"""
    squeeze = np.ndim(x) == 1
    x2 = _as_input(w, x[None, :] if squeeze else x)
    if BACKEND == "ggml":
        _sync_threads()
    if w.packed:
        out = _matmul_packed(w, x2)
    elif w._dot is None:  # numpy backend, F32 weights, or a type ggml has no dot kernel for
        out = _matmul_numpy(w, x2)
    else:
        out = _matmul_ggml(w, x2)
    return out[0] if squeeze else out


def _serial(w: QWeight, T: int) -> bool:
    """Whether a product is small enough to run on the calling thread alone (see PARALLEL_MIN_BYTES)."""
    return THREADS == 1 or w.nbytes * T < PARALLEL_MIN_BYTES


def _sync_threads() -> None:
    """numba's thread count is per calling thread: give this one THREADS (the nested kernels, which
    do not come through here, then use it too)."""
    if getattr(_tls, "threads", None) != THREADS:
        import numba

        numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
        _tls.threads = THREADS


def _launch(kernel, args) -> None:
    global _launch_safe
    if _launch_safe:
        kernel(*args)
    else:
        with _launch_lock:
            kernel(*args)
            if _launch_safe is None:
                import numba

                _launch_safe = numba.threading_layer() in ("omp", "tbb")


def _matmul_ggml(w: QWeight, x: np.ndarray) -> np.ndarray:
    # x: [T, n_in] float32 C-contiguous; out: [T, n_out]
    T = x.shape[0]
    n_out, n_in = w.shape
    vec_dot, from_float, q_row, _ = w._dot
    q = np.empty(T * q_row, dtype=np.uint8)  # activations in vec_dot_type
    out = np.empty((T, n_out), dtype=np.float32)
    args = (vec_dot, from_float, w.addr, w.data.strides[0], n_out, n_in, addr(x), T, addr(q), q_row, addr(out))
    if _serial(w, T):
        _ggml_mod.matmul_kernel_1(*args)
    else:
        _launch(_ggml_mod.matmul_kernel, args)
    return out


def _matmul_packed(w: QWeight, x: np.ndarray) -> np.ndarray:
    T = x.shape[0]
    n_out, n_in = w.shape
    # Q8_0 (Q4_0) or Q8_K (Q4_K) rows; 4 of them = the bytes of a block_q8_0x4 / block_q8_Kx4
    # (the kernel only moves pointers, so it serves both layouts)
    q_row = w._dot[2]
    q = np.empty(T * q_row, dtype=np.uint8)
    out = np.empty((T, n_out), dtype=np.float32)
    chunks = min(n_out // 8, 2 * THREADS)
    args = (*_PACKED[w.qtype], w.addr, w.row_bytes, n_out, n_in, addr(x), T, addr(q), q_row, addr(out), chunks)
    if _serial(w, T):
        _ggml_mod.q4_0x8_matmul_kernel_1(*args)
    else:
        _launch(_ggml_mod.q4_0x8_matmul_kernel, args)
    return out


def _dequant_tile(w: QWeight, r0: int, r1: int) -> np.ndarray:
    """float32 [r1-r0, n_in] for rows r0:r1 (the only float32 copy of weights we ever make)."""
    d = w.data[r0:r1]
    if w.qtype == QT.F32:
        return np.asarray(d)
    if w.qtype == QT.F16:
        return d.astype(np.float32)
    if w.qtype == QT.BF16:
        return (np.ascontiguousarray(d).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf.quants.dequantize(np.ascontiguousarray(d), w.qtype).reshape(r1 - r0, w.shape[1])


def _matmul_numpy(w: QWeight, x: np.ndarray) -> np.ndarray:
    n_out, n_in = w.shape
    if w.qtype == QT.F32:
        return x @ np.asarray(w.data).T
    tile = max(1, _TILE_BYTES // (4 * n_in))
    out_t = np.empty((n_out, x.shape[0]), dtype=np.float32)  # [n_out, T]: tiles write whole rows
    xt = x.T
    for r0 in range(0, n_out, tile):
        r1 = min(n_out, r0 + tile)
        np.matmul(_dequant_tile(w, r0, r1), xt, out=out_t[r0:r1])
    return np.ascontiguousarray(out_t.T)


def dequantize_rows(w: QWeight, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), n_in]: the given rows of W (embedding lookup)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    n_out, n_in = w.shape
    if w.packed:
        raise EdgeMoEError(f"tensor {w.name}: rows of a repacked weight cannot be read back")
    if rows.size and (rows.min() < 0 or rows.max() >= n_out):
        bad = rows[(rows < 0) | (rows >= n_out)][0]
        raise EdgeMoEError(f"tensor {w.name}: row {bad} out of range [0, {n_out})")
    if w._dot is None or w.qtype in (QT.F16, QT.BF16) or not w._dot[3]:
        if w.qtype in (QT.F32, QT.F16, QT.BF16):
            return np.ascontiguousarray(_dequant_tile_rows(w, rows))
        return gguf.quants.dequantize(np.ascontiguousarray(w.data[rows]), w.qtype).reshape(rows.size, n_in)
    out = np.empty((rows.size, n_in), dtype=np.float32)
    _ggml_mod.rows_kernel(w._dot[3], addr(w.data), w.data.strides[0], rows, n_in, addr(out))
    return out


def _dequant_tile_rows(w: QWeight, rows: np.ndarray) -> np.ndarray:
    d = w.data[rows]
    if w.qtype == QT.BF16:
        return (d.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return d.astype(np.float32)
