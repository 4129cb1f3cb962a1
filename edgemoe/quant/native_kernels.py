"""The compiled kernels of edgemoe.quant.native: split a matrix's blocks into planes and merge the
first k planes back, generically (driven by a layout's program, NativeType.program) and for the
common layouts with constant loop lengths (Q4_K, Q5_K, 32-weight nibble blocks, Q6_K, Q8_0), which
the compiler vectorizes; tests check every one against the generic merge at every width."""

from __future__ import annotations

import numba
import numpy as np

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


@numba.njit(cache=True, nogil=True)
def merge_nib4_16(out, m0, m1, s, p0, o0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    """merge_program for one code range of 16 bytes (32 weights) of 4-bit nibbles split 0xCC | 0x22 |
    0x11 (Q4_0, Q4_1, MXFP4), its loop lengths constants; fill: the range's fill bytes for n_read planes."""
    for i in range(out.shape[0]):
        for t in range(m1 - m0):
            out[i, m0 + t] = p0[i, t]
        for j in range(8):
            a = p0[i, o0 + j]
            lo = a & np.uint8(15)
            hi = a >> np.uint8(4)
            out[i, s + j] = fill[j] | ((lo & np.uint8(3)) << np.uint8(2)) | ((lo & np.uint8(12)) << np.uint8(4))
            out[i, s + 8 + j] = fill[8 + j] | ((hi & np.uint8(3)) << np.uint8(2)) | ((hi & np.uint8(12)) << np.uint8(4))
        if n_read == 3:  # both lower planes in one pass
            for j in range(4):
                b1, b2 = p1[i, j], p2[i, j]
                for q in range(4):
                    x = (b1 >> np.uint8(2 * q)) & np.uint8(3)
                    y = (b2 >> np.uint8(2 * q)) & np.uint8(3)
                    out[i, s + 4 * q + j] |= (
                        ((x & np.uint8(1)) << np.uint8(1))
                        | ((x & np.uint8(2)) << np.uint8(4))
                        | (y & np.uint8(1))
                        | ((y & np.uint8(2)) << np.uint8(3))
                    )
        elif n_read == 2:
            for j in range(4):
                b1 = p1[i, j]
                for q in range(4):
                    x = (b1 >> np.uint8(2 * q)) & np.uint8(3)
                    out[i, s + 4 * q + j] |= ((x & np.uint8(1)) << np.uint8(1)) | ((x & np.uint8(2)) << np.uint8(4))


@numba.njit(cache=True, nogil=True)
def merge_q4_k(out, p0, p1, p2, fill, n_read):  # pragma: no cover - compiled
    """merge_nib4_16 for Q4_K (metadata bytes 0-15, codes 16-143)."""
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
def merge_q8_0(out, p0, p1, p2, fe, fo, n_read):  # pragma: no cover - compiled
    """merge_program for Q8_0 split 2|2|4 (native.TYPES): plane 0 = d (2 bytes), then the codes'
    bits 0xC0 four to a byte (8 bytes); plane 1 their bits 0x30 (8 bytes); plane 2 their low
    nibbles two to a byte (16 bytes); fe / fo: the fill of even / odd codes for n_read planes."""
    for i in range(out.shape[0]):
        out[i, 0] = p0[i, 0]
        out[i, 1] = p0[i, 1]
        for q in range(4):
            sh = np.uint8(2 * q)
            for j in range(8):
                v = ((p0[i, 2 + j] >> sh) & np.uint8(3)) << np.uint8(6)
                if n_read >= 2:
                    v |= ((p1[i, j] >> sh) & np.uint8(3)) << np.uint8(4)
                out[i, 2 + 8 * q + j] = v
        if n_read == 3:
            for q in range(2):
                sh = np.uint8(4 * q)
                for j in range(16):
                    out[i, 2 + 16 * q + j] |= (p2[i, j] >> sh) & np.uint8(15)
        else:
            for c in range(0, 32, 2):
                out[i, 2 + c] |= fe
                out[i, 3 + c] |= fo


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
