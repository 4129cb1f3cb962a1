"""ggml's block_q4_Kx8: Q4_K weights 8 rows interleaved, for ggml's repacked Q4_K gemv/gemm.

llama.cpp's CPU backend (ggml-cpu/repack.cpp) rewrites every Q4_K matrix with a multiple of 8
rows into this layout at load where the CPU has AVX2 (or NEON with int8 matmul) and multiplies it
with ggml_gemv_q4_K_8x8_q8_K (one activation row) and ggml_gemm_q4_K_8x8_q8_K (groups of 4 rows,
quantized together by ggml_quantize_mat_q8_K_4x8 into block_q8_Kx4). We do the same on matrices
whose bytes are ours (kernels.pack); the row loop is _ggml's repacked-layout kernel, the one the
Q4_0x8 path runs (it only moves pointers: the layout is the function pointers' business).

The layout, per 8 rows (r = 0..7) and per block column b (256 inputs), one block_q4_Kx8 of
1152 bytes = 8 x 144, so a repacked matrix takes exactly the bytes of the plain one:
  bytes    0..16   the 8 rows' d (fp16), row order
  bytes   16..32   the 8 rows' dmin (fp16)
  bytes   32..128  8 words of 12 bytes, one per 32-wide sub-block j: the 8 rows' 6-bit scale and
                   min of sub-block j, packed the way one Q4_K block packs its 8 sub-blocks'
                   (value r plays the part of sub-block r)
  bytes  128..1152 the rows' 4-bit codes (128 bytes each) in 8-byte pieces: piece i comes from row
                   i % 8, bytes (i // 8) * 8 .. + 8 of its block; no sign flip (unlike Q4_0x8)
Rows are then 8-row groups one after another, each group its block columns in order. Activations:
block_q8_K (292 bytes per 256), 4 rows of which are the bytes of one block_q8_Kx4 (1168).
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import njit

Q4_K, Q8_K = 12, 15  # enum ggml_type
BLOCK = 144  # block_q4_K: fp16 d, fp16 dmin, 12 bytes of scales and mins, 128 bytes of codes
BLOCK_X8 = 8 * BLOCK  # block_q4_Kx8
_NAMES = ("ggml_gemv_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K", "ggml_quantize_mat_q8_K_4x8")


def q4_Kx8_funcs(lib) -> tuple[int, int, int, int] | None:
    """(gemv, gemm, quantize_mat, from_float of Q8_K) of ggml's repacked Q4_K 8x8 kernels, where
    llama.cpp's CPU backend would choose them on this CPU (AVX2, or NEON with int8 matmul: its
    ggml_repack_get_optimal_repack_type); None where this build or CPU has them not.
    lib: _ggml.GGMLLib."""
    cpu = lib.cpu

    def has(feature: str) -> bool:
        f = getattr(cpu, f"ggml_cpu_has_{feature}", None)
        if f is None:
            return False
        f.restype, f.argtypes = ctypes.c_int, []
        return bool(f())

    if not (has("avx2") or (has("neon") and has("matmul_int8"))):
        return None
    try:
        fns = [ctypes.cast(getattr(cpu, n), ctypes.c_void_p).value for n in _NAMES]
    except AttributeError:
        return None
    ff = cpu.ggml_get_type_traits_cpu(Q8_K).contents.from_float
    return (*fns, int(ff)) if all(fns) and ff else None


@njit(cache=True, nogil=True, inline="always")
def x8_meta(out, o, src, s0, stride, sc, mn):  # pragma: no cover - compiled
    # the metadata of one block_q4_Kx8 at out[o:o + 128] from 8 Q4_K blocks' first 16 bytes (d,
    # dmin, 12 bytes of 6-bit scales and mins), row r's at src[s0 + r * stride]; sc / mn: uint8
    # [64] scratch, [sub-block j * 8 + row r] (ggml's get_scale_min_k4), then each sub-block's
    # word packs the 8 rows' values as one block packs its 8 sub-blocks'
    for r in range(8):
        a = s0 + r * stride
        out[o + 2 * r] = src[a]
        out[o + 2 * r + 1] = src[a + 1]
        out[o + 16 + 2 * r] = src[a + 2]
        out[o + 17 + 2 * r] = src[a + 3]
        for j in range(4):
            sc[8 * j + r] = src[a + 4 + j] & 63
            mn[8 * j + r] = src[a + 8 + j] & 63
            sc[8 * (j + 4) + r] = (src[a + 12 + j] & 15) | ((src[a + 4 + j] >> 6) << 4)
            mn[8 * (j + 4) + r] = (src[a + 12 + j] >> 4) | ((src[a + 8 + j] >> 6) << 4)
    for j in range(8):
        q = o + 32 + 12 * j
        for k in range(4):
            s_lo, s_hi = sc[8 * j + k], sc[8 * j + k + 4]
            m_lo, m_hi = mn[8 * j + k], mn[8 * j + k + 4]
            out[q + k] = (s_lo & 63) | ((s_hi >> 4) << 6)
            out[q + 4 + k] = (m_lo & 63) | ((m_hi >> 4) << 6)
            out[q + 8 + k] = (s_hi & 15) | ((m_hi & 15) << 4)


@njit(cache=True, nogil=True)
def repack_q4_Kx8(flat, n_out, row_bytes, tmp):  # pragma: no cover - compiled
    # flat: uint8 [n_out * row_bytes], rows of Q4_K blocks, n_out a multiple of 8; rewritten in
    # place, 8 rows at a time, into block_q4_Kx8 (module docstring). tmp: uint8 [8 * row_bytes].
    # The codes move in 8-byte words (every offset below is a multiple of 8: 144 = 8 * 18).
    nb = row_bytes // 144
    sc = np.empty(64, np.uint8)
    mn = np.empty(64, np.uint8)
    f64 = flat.view(np.uint64)
    t64 = tmp.view(np.uint64)
    for g in range(0, n_out, 8):
        base = g * row_bytes
        t64[:] = f64[base // 8 : (base + 8 * row_bytes) // 8]
        for b in range(nb):
            o = base + b * 1152
            x8_meta(flat, o, tmp, b * 144, row_bytes, sc, mn)
            for i in range(128):  # piece i: row i % 8, its bytes (i // 8) * 8 .. + 8
                f64[(o + 128) // 8 + i] = t64[((i % 8) * row_bytes + b * 144 + 16) // 8 + i // 8]


def _decode12(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] packed words -> (scales, mins) [..., 8] (the inverse of the packing in repack_q4_Kx8)."""
    w = words.astype(np.uint8)
    lo, hi, mix = w[..., 0:4], w[..., 4:8], w[..., 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _encode12(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(scales, mins) [..., 8] -> [..., 12] packed words."""
    return np.concatenate(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)


def unpack_q4_Kx8(data: np.ndarray, n_out: int, row_bytes: int) -> np.ndarray:
    """A copy of block_q4_Kx8 bytes as plain Q4_K rows uint8 [n_out, row_bytes] (the repack,
    inverted)."""
    nb = row_bytes // BLOCK
    b = np.ascontiguousarray(data).reshape(n_out // 8, nb, BLOCK_X8)
    rows = np.empty((n_out // 8, 8, nb, BLOCK), np.uint8)
    rows[..., 0:2] = b[..., 0:16].reshape(-1, nb, 8, 2).transpose(0, 2, 1, 3)
    rows[..., 2:4] = b[..., 16:32].reshape(-1, nb, 8, 2).transpose(0, 2, 1, 3)
    sc, mn = _decode12(b[..., 32:128].reshape(-1, nb, 8, 12))  # [group, block, sub-block, row]
    rows[..., 4:16] = _encode12(sc.transpose(0, 3, 1, 2), mn.transpose(0, 3, 1, 2))
    q = b[..., 128:].reshape(-1, nb, 16, 8, 8)  # [group, block, piece // 8, row, byte]
    rows[..., 16:] = q.transpose(0, 3, 1, 2, 4).reshape(-1, 8, nb, 128)
    return rows.reshape(n_out, row_bytes)
