"""The compiled kernels of edgemoe.quant.native: split a matrix's blocks into planes and merge the
first k planes back, generically (driven by a layout's program, NativeType.program) and for the
common layouts with constant loop lengths (Q4_K, Q5_K, Q6_K) or eight bytes to a 64-bit word
(32-weight nibble blocks, Q8_0), which the compiler vectorizes or keeps in registers; tests check
every one against the generic merge at every width."""

from __future__ import annotations

import numba
import numpy as np

from .repack import x8_meta

EMPTY = np.zeros((0, 0), np.uint8)


def pad(planes: list[np.ndarray]) -> list[np.ndarray]:
    return list(planes) + [EMPTY] * (4 - len(planes))


@numba.njit(cache=True, nogil=True, inline="always")
def _pick(k, a, b, c, d):  # pragma: no cover - compiled
    if k == 0:
        return a
    if k == 1:
        return b
    if k == 2:
        return c
    return d


@numba.njit(cache=True, nogil=True)
def split_blocks(blocks, m0, m1, prog, a, b, c, d):  # pragma: no cover - compiled
    for i in range(blocks.shape[0]):
        a[i, : m1 - m0] = blocks[i, m0:m1]
    for s in range(prog.shape[0]):
        p, start, length, off, k, runs = prog[s, 0], prog[s, 1], prog[s, 2], prog[s, 3], prog[s, 4], prog[s, 5]
        s1, k1, s2, k2 = runs & 255, (runs >> 8) & 255, (runs >> 16) & 255, (runs >> 24) & 255
        slots = 8 // k
        n = length // slots
        dst = _pick(p, a, b, c, d)
        for i in range(blocks.shape[0]):
            for j in range(n):
                o = 0
                for q in range(slots):
                    x = blocks[i, start + q * n + j]
                    o |= (((x >> s1) & k1) | ((x >> s2) & k2)) << (q * k)
                dst[i, off + j] = o


@numba.njit(cache=True, nogil=True)
def merge_program(blocks, m0, m1, prog, n_read, a, b, c, d):  # pragma: no cover - compiled
    nb, bsize = blocks.shape
    for i in range(nb):
        blocks[i, m0:m1] = a[i, : m1 - m0]
    # start every code byte at its fill for this width, then OR in the planes read
    for s in range(prog.shape[0]):
        if prog[s, 7]:
            start, length = prog[s, 1], prog[s, 2]
            fe = np.uint8((prog[s, 6] >> (16 * (n_read - 1))) & 255)
            fo = np.uint8((prog[s, 6] >> (16 * (n_read - 1) + 8)) & 255)
            for i in range(nb):
                for j in range(0, length, 2):
                    blocks[i, start + j] = fe
                    blocks[i, start + j + 1] = fo
    for s in range(prog.shape[0]):
        p, start, length, off, k, runs = prog[s, 0], prog[s, 1], prog[s, 2], prog[s, 3], prog[s, 4], prog[s, 5]
        if p >= n_read:
            continue
        s1, k1 = np.uint8(runs & 255), np.uint8((runs >> 8) & 255)
        s2, k2 = np.uint8((runs >> 16) & 255), np.uint8((runs >> 24) & 255)
        slots = 8 // k
        n = length // slots
        src = _pick(p, a, b, c, d)
        lo = np.uint8((1 << k) - 1)
        for q in range(slots):
            sh = np.uint8(q * k)
            for i in range(nb):
                row = src[i, off : off + n]
                out = blocks[i, start + q * n : start + q * n + n]
                for j in range(n):
                    x = np.uint8(np.uint8(row[j] >> sh) & lo)
                    out[j] |= np.uint8(np.uint8(np.uint8(x & k1) << s1) | np.uint8(np.uint8(x & k2) << s2))


_U = np.uint64
_C01, _C02, _C03 = _U(0x0101010101010101), _U(0x0202020202020202), _U(0x0303030303030303)
_C0C, _C0F, _C30, _CC0 = _U(0x0C0C0C0C0C0C0C0C), _U(0x0F0F0F0F0F0F0F0F), _U(0x3030303030303030), _U(0xC0C0C0C0C0C0C0C0)


@numba.njit(cache=True, nogil=True, inline="always")
def _ld8(a, o):  # pragma: no cover - compiled
    """Bytes a[o:o + 8] as one little-endian word (the compiler makes it one load)."""
    w = _U(0)
    for b in range(8):
        w |= _U(a[o + b]) << _U(8 * b)
    return w


@numba.njit(cache=True, nogil=True, inline="always")
def _ld4x2(a, o):  # pragma: no cover - compiled
    """Bytes a[o:o + 4] as two words: their 2-bit fields 0 and 1 in the low and high half of the
    first, fields 2 and 3 in the second (one field per byte)."""
    b = _U(0)
    for t in range(4):
        b |= _U(a[o + t]) << _U(8 * t)
    m = _U(0x03030303)
    return (b & m) | (((b >> _U(2)) & m) << _U(32)), ((b >> _U(4)) & m) | (((b >> _U(6)) & m) << _U(32))


@numba.njit(cache=True, nogil=True, inline="always")
def _st8(a, o, w):  # pragma: no cover - compiled
    for b in range(8):
        a[o + b] = np.uint8((w >> _U(8 * b)) & _U(255))


@numba.njit(cache=True, nogil=True, inline="always")
def _nib4_32(out, p0, p1, p2, fill, n_read, M):  # pragma: no cover - compiled
    """merge_program for 32-weight blocks of M metadata bytes then 16 nibble bytes split 0xCC | 0x22 |
    0x11 (Q4_0, Q4_1, MXFP4), on flat arrays, eight bytes to a word; fill: the word of the code
    bytes' fill for n_read planes (even bytes, odd bytes alternating). Inlined with M a constant."""
    S0 = M + 8
    for i in range(out.shape[0] // (M + 16)):
        ob, ab = i * (M + 16), i * S0
        for t in range(M):
            out[ob + t] = p0[ab + t]
        w = _ld8(p0, ab + M)
        lo = ((w & _C03) << _U(2)) | ((w & _C0C) << _U(4)) | fill
        hi = ((w & _C30) >> _U(2)) | (w & _CC0) | fill
        if n_read >= 2:
            x, y = _ld4x2(p1, 4 * i)
            lo |= ((x & _C01) << _U(1)) | ((x & _C02) << _U(4))
            hi |= ((y & _C01) << _U(1)) | ((y & _C02) << _U(4))
        if n_read >= 3:
            x, y = _ld4x2(p2, 4 * i)
            lo |= (x & _C01) | ((x & _C02) << _U(3))
            hi |= (y & _C01) | ((y & _C02) << _U(3))
        _st8(out, ob + M, lo)
        _st8(out, ob + M + 8, hi)


@numba.njit(cache=True, nogil=True)
def merge_q4_0(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    _nib4_32(out, p0, p1, p2, fill, n_read, 2)


@numba.njit(cache=True, nogil=True)
def merge_q4_1(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    _nib4_32(out, p0, p1, p2, fill, n_read, 4)


@numba.njit(cache=True, nogil=True)
def merge_mxfp4(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    _nib4_32(out, p0, p1, p2, fill, n_read, 1)


@numba.njit(cache=True, nogil=True)
def merge_q4_k(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    """merge_program for Q4_K (metadata bytes 0-15, codes 16-143 split 0xCC | 0x22 | 0x11)."""
    for i in range(out.shape[0]):
        for t in range(16):
            out[i, t] = p0[i, t]
        for j in range(64):
            a = p0[i, 16 + j]
            lo = a & np.uint8(15)
            hi = a >> np.uint8(4)
            out[i, 16 + j] = fill[j] | ((lo & np.uint8(3)) << np.uint8(2)) | ((lo & np.uint8(12)) << np.uint8(4))
            out[i, 80 + j] = fill[64 + j] | ((hi & np.uint8(3)) << np.uint8(2)) | ((hi & np.uint8(12)) << np.uint8(4))
        if n_read == 3:  # both lower planes in one pass
            for q in range(4):
                sh = np.uint8(2 * q)
                for j in range(32):
                    x = (p1[i, j] >> sh) & np.uint8(3)
                    y = (p2[i, j] >> sh) & np.uint8(3)
                    out[i, 16 + 32 * q + j] |= (
                        ((x & np.uint8(1)) << np.uint8(1))
                        | ((x & np.uint8(2)) << np.uint8(4))
                        | (y & np.uint8(1))
                        | ((y & np.uint8(2)) << np.uint8(3))
                    )
        elif n_read == 2:
            for q in range(4):
                sh = np.uint8(2 * q)
                for j in range(32):
                    x = (p1[i, j] >> sh) & np.uint8(3)
                    out[i, 16 + 32 * q + j] |= ((x & np.uint8(1)) << np.uint8(1)) | ((x & np.uint8(2)) << np.uint8(4))


@numba.njit(cache=True, nogil=True)
def merge_q6_k(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    """merge_program for Q6_K split 2|2|2 (native.TYPES): plane 0 = scales and d (18 bytes), then qh (64) as it
    is; ql's nibbles 0xCC in plane 1, 0x33 in plane 2 (two slots of 64 bytes each)."""
    for i in range(out.shape[0]):
        o = out[i]
        a = p0[i]
        for t in range(18):
            o[192 + t] = a[t]
        for t in range(64):
            o[128 + t] = a[18 + t]
        for j in range(128):
            o[j] = fill
        if n_read >= 2:
            b = p1[i]
            for j in range(64):
                lo = b[j] & np.uint8(15)
                hi = b[j] >> np.uint8(4)
                o[j] = ((lo & np.uint8(3)) << np.uint8(2)) | ((lo & np.uint8(12)) << np.uint8(4)) | fill
                o[j + 64] = ((hi & np.uint8(3)) << np.uint8(2)) | ((hi & np.uint8(12)) << np.uint8(4)) | fill
        if n_read >= 3:
            c = p2[i]
            for j in range(64):
                lo = c[j] & np.uint8(15)
                hi = c[j] >> np.uint8(4)
                o[j] |= (lo & np.uint8(3)) | ((lo & np.uint8(12)) << np.uint8(2))
                o[j + 64] |= (hi & np.uint8(3)) | ((hi & np.uint8(12)) << np.uint8(2))


@numba.njit(cache=True, nogil=True)
def merge_q8_0(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    """merge_program for Q8_0 split 2|2|4 (native.TYPES), on flat arrays, eight bytes to a word:
    plane 0 = d (2 bytes), then the codes' bits 0xC0 four to a byte (8 bytes); plane 1 their bits
    0x30 (8 bytes); plane 2 their low nibbles two to a byte (16 bytes); fill: the word of the
    codes' fill for n_read planes (even bytes, odd bytes alternating)."""
    for i in range(out.shape[0] // 34):
        ob, ab = 34 * i, 10 * i
        out[ob] = p0[ab]
        out[ob + 1] = p0[ab + 1]
        a = _ld8(p0, ab + 2)
        b = _ld8(p1, 8 * i) if n_read >= 2 else _U(0)
        if n_read >= 3:
            c0, c1 = _ld8(p2, 16 * i), _ld8(p2, 16 * i + 8)
            low = (c0 & _C0F, c1 & _C0F, (c0 >> _U(4)) & _C0F, (c1 >> _U(4)) & _C0F)
        else:
            low = (fill, fill, fill, fill)
        for q in range(4):
            sh = _U(2 * q)
            v = (((a >> sh) & _C03) << _U(6)) | (((b >> sh) & _C03) << _U(4))
            _st8(out, ob + 2 + 8 * q, v | low[q])


@numba.njit(cache=True, nogil=True)
def merge_q5_k(out, p0, p1, p2, p3, fill, n_read):  # pragma: no cover - compiled
    """merge_program for Q5_K split 2|1|1|1 (native.TYPES): plane 0 = d, dmin and scales (16
    bytes), the fifth bits qh as they are (32), then the low nibbles' bits 0x88 four to a byte
    (32); planes 1-3 their bits 0x44, 0x22, 0x11 (32 bytes each); fill: the low nibbles' fill for
    n_read planes."""
    for i in range(out.shape[0]):
        for t in range(48):
            out[i, t] = p0[i, t]
        for q in range(4):
            sh = np.uint8(2 * q)
            for j in range(32):
                x = (p0[i, 48 + j] >> sh) & np.uint8(3)
                v = fill | ((x & np.uint8(1)) << np.uint8(3)) | ((x & np.uint8(2)) << np.uint8(6))
                if n_read >= 2:
                    x = (p1[i, j] >> sh) & np.uint8(3)
                    v |= ((x & np.uint8(1)) << np.uint8(2)) | ((x & np.uint8(2)) << np.uint8(5))
                if n_read >= 3:
                    x = (p2[i, j] >> sh) & np.uint8(3)
                    v |= ((x & np.uint8(1)) << np.uint8(1)) | ((x & np.uint8(2)) << np.uint8(4))
                if n_read >= 4:
                    x = (p3[i, j] >> sh) & np.uint8(3)
                    v |= (x & np.uint8(1)) | ((x & np.uint8(2)) << np.uint8(3))
                out[i, 48 + 32 * q + j] = v


@numba.njit(cache=True, nogil=True)
def merge_q4_kx8(out, p0, p1, p2, fill, n_read, n_out, nb):  # pragma: no cover - compiled
    """merge_q4_k straight into ggml's block_q4_Kx8 (quant/repack.py: 8 rows interleaved, the
    layout repack.repack_q4_Kx8 writes) in one pass: out flat [n_out * nb * 144], n_out a multiple
    of 8, nb blocks per row; planes flat, their blocks' pieces (80, 32, 32 bytes) in row-major
    block order; fill: the word of the code bytes' fill for n_read planes. Each 8-byte piece of
    codes is merged in a register and stored where the interleave puts it."""
    sc = np.empty(64, np.uint8)  # repack.x8_meta's scratch
    mn = np.empty(64, np.uint8)
    o64, w0, w1, w2 = out.view(np.uint64), p0.view(np.uint64), p1.view(np.uint64), p2.view(np.uint64)
    for g in range(0, n_out, 8):
        for b in range(nb):
            o = g * nb * 144 + b * 1152
            x8_meta(out, o, p0, (g * nb + b) * 80, nb * 80, sc, mn)
            base = (o + 128) // 8
            for r in range(8):
                blk = (g + r) * nb + b
                for c in range(8):  # code bytes 8c .. 8c + 7 (low nibbles) and 64 + 8c .. (high)
                    w = w0[blk * 10 + 2 + c]
                    lo = ((w & _C03) << _U(2)) | ((w & _C0C) << _U(4)) | fill
                    hi = ((w & _C30) >> _U(2)) | (w & _CC0) | fill
                    if n_read >= 2:  # bytes 8c.. take bits 2(c // 4).. of plane 1's bytes 8(c % 4)..
                        x = w1[blk * 4 + c % 4]
                        xl, xh = (x >> _U(2 * (c // 4))) & _C03, (x >> _U(2 * (c // 4) + 4)) & _C03
                        lo |= ((xl & _C01) << _U(1)) | ((xl & _C02) << _U(4))
                        hi |= ((xh & _C01) << _U(1)) | ((xh & _C02) << _U(4))
                    if n_read >= 3:
                        x = w2[blk * 4 + c % 4]
                        xl, xh = (x >> _U(2 * (c // 4))) & _C03, (x >> _U(2 * (c // 4) + 4)) & _C03
                        lo |= (xl & _C01) | ((xl & _C02) << _U(3))
                        hi |= (xh & _C01) | ((xh & _C02) << _U(3))
                    o64[base + 8 * c + r] = lo  # piece 8c + r: row r's code bytes 8c ..
                    o64[base + 8 * (c + 8) + r] = hi
