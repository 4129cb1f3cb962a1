"""Full-width 4-bit matquant experts transcoded into ggml blocks holding exactly the same weights:
repacked Q4_0 where every group's offset is -8 times its scale (a Q4_0 source), Q4_1 otherwise.
StoreExperts does it once per expert held at full width (ExpertCache.fast_form); from then on the
expert runs on ggml's kernels."""

from __future__ import annotations

import gguf
import numpy as np

from . import kernels, nested
from .buffers import alloc


def q41_blocks(scheme, planes: list[np.ndarray], n_out: int, n_in: int) -> np.ndarray:
    """Full-width matquant planes (4-bit codes, group 32, fp16 s and m) as ggml Q4_1 rows
    [n_out, n_in / 32 * 20]: per block d = s, m = m, and the codes as nibbles (element j in the
    low nibble of byte j, element j + 16 in its high nibble)."""
    if list(scheme.plane_bits) == [2, 1, 1] and _q4_211 is not None:
        (c0, sc), (c1, _), (c2, _) = (scheme._split_plane(pl, p, n_out, n_in) for p, pl in enumerate(planes))
        out = alloc(n_out * n_in // 32 * 20)
        _q4_211(
            c0, c1, c2, sc[0].view(np.uint16).reshape(-1), sc[1].view(np.uint16).reshape(-1), n_out, n_in, out, False
        )
        return out.reshape(n_out, n_in // 32 * 20)
    q, s, m = scheme.codes(planes, n_out, n_in)
    nb = n_in // 32
    q = q.reshape(n_out, nb, 32)
    out = alloc(n_out * nb * 20).reshape(n_out, nb, 20)
    out[..., 0:2] = s.reshape(n_out, nb).astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    out[..., 2:4] = m.reshape(n_out, nb).astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return out.reshape(n_out, nb * 20)


def transcodes(scheme) -> bool:
    """Whether full-width experts of a store in this scheme are transcoded into ggml blocks
    (4-bit group-32 matquant: the planes hold Q4_0/Q4_1 blocks' exact codes and scales)."""
    return isinstance(scheme, nested.MatQuant) and scheme.widths[-1] == 4 and scheme.group == 32


def transcoded_bytes(reader) -> int | None:
    """The bytes a full-width expert of this store is charged once StoreExperts._fast_form has
    transcoded it into ggml blocks (repacked Q4_0 for matquant-sym, else Q4_1), or None when the
    store's experts stay as planes."""
    scheme = next(s for s in reader.schemes if s is not None)
    if not transcodes(scheme):
        return None
    blocks = 3 * reader.n_ff_exp * reader.n_embd // 32
    return blocks * (18 if isinstance(scheme, nested.MatQuantSym) else 20)


def fast_weight(scheme, planes: list[np.ndarray], n_out: int, n_in: int, name: str) -> kernels.QWeight:
    """Full-width matquant planes of one matrix as the fastest ggml weight holding the same values.
    Where every group's offset is -8 times its scale (a Q4_0 source) these are Q4_0 blocks,
    (q - 8) d = q d + m, written straight into ggml's repacked block_q4_0x8 layout for its
    gemv/gemm (kernels.pack), 10% fewer bytes than Q4_1; otherwise ggml Q4_1 rows."""
    QT = gguf.GGMLQuantizationType
    if list(scheme.plane_bits) == [2, 1, 1] and _q4_211 is not None and kernels.can_pack_shape(QT.Q4_0, n_out):
        (c0, sc), (c1, _), (c2, _) = (scheme._split_plane(pl, p, n_out, n_in) for p, pl in enumerate(planes))
        d, m = sc[0].reshape(-1), sc[1].reshape(-1)
        if np.array_equal(m.astype(np.float32), np.float32(-8) * d.astype(np.float32)):
            out = alloc(n_out * n_in // 32 * 18)
            _q4_211(c0, c1, c2, d.view(np.uint16), m.view(np.uint16), n_out, n_in, out, True)
            return kernels.QWeight.prepacked(out.reshape(n_out, n_in // 32 * 18), QT.Q4_0, n_in, name)
    return kernels.QWeight(q41_blocks(scheme, planes, n_out, n_in), QT.Q4_1, n_in, name)


try:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _q4_211(p0, p1, p2, s, m, n_out, n_in, out, q40x8):  # pragma: no cover - compiled
        """Planes of 2, 1 and 1 bits (matquant 2,3,4) to 4-bit blocks, a row at a time: unpack the
        row-wide slots into 4-bit codes, then write Q4_1 blocks (d, m, 16 bytes of nibbles), or
        with q40x8 Q4_0 blocks in ggml's block_q4_0x8 layout (kernels.pack): per 8 rows and block
        column the 8 scales, then 16 pieces of 8 nibble bytes, piece i from row i % 8, bytes
        (i // 8) * 8 .. + 8, each XOR 0x88."""
        rb0 = n_in // 4
        rb1 = n_in // 8
        nb = n_in // 32
        q = np.empty(n_in, np.uint8)
        for o in range(n_out):
            for k in range(rb0):
                b = p0[o * rb0 + k]
                for j in range(4):
                    q[k + j * rb0] = ((b >> (2 * j)) & 3) << 2
            for k in range(rb1):
                b1 = p1[o * rb1 + k]
                b2 = p2[o * rb1 + k]
                for j in range(8):
                    q[k + j * rb1] |= (((b1 >> j) & 1) << 1) | ((b2 >> j) & 1)
            r = o % 8
            for blk in range(nb):
                g = o * nb + blk
                c = blk * 32
                if q40x8:
                    base = ((o // 8) * nb + blk) * 144
                    out[base + 2 * r] = s[g] & 0xFF
                    out[base + 2 * r + 1] = s[g] >> 8
                    for j in range(16):
                        out[base + 16 + ((j // 8) * 8 + r) * 8 + j % 8] = (q[c + j] | (q[c + j + 16] << 4)) ^ 0x88
                else:
                    base = g * 20
                    out[base] = s[g] & 0xFF
                    out[base + 1] = s[g] >> 8
                    out[base + 2] = m[g] & 0xFF
                    out[base + 3] = m[g] >> 8
                    for j in range(16):
                        out[base + 4 + j] = q[c + j] | (q[c + j + 16] << 4)
except ImportError:  # numba missing: the numpy path above
    _q4_211 = None
