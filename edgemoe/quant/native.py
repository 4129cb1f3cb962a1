"""Source-exact nested planes: a ggml-quantized matrix's own blocks, split MSB-first into bit planes.

The matquant planes (nested.py) re-fit a matrix; these keep the source's blocks. A ggml block is
metadata (scales, mins, exponents) and code bytes, each byte holding bits of one or two weights'
codes. Each code byte range has one bit mask per plane, most significant bits first (Q4_K's
nibbles: 0xCC | 0x22 | 0x11; Q6_K's 2-bit high fields all in plane 0, then its low nibbles 0xCC |
0x33; Q8_0's int8: 0xC0 | 0x30 | 0x0F). Per block,

    plane 0: [the block's metadata bytes][each code range's bits under mask 0, packed]
    plane p: [each code range's bits under mask p, packed]

where "packed" puts the masked bits of bytes j, j + n, j + 2n ... of a range (n = its length /
slots, slots = 8 / bits per byte under the mask) side by side in byte j. A matrix's plane p is its
blocks' plane-p pieces in block order. The planes together are the source's bytes rearranged: the
store is exactly as large as the source, and merge() puts the blocks back bit for bit, so the full
width runs on ggml's kernel for that type and computes what llama.cpp computes.

Reading the first k < all planes gives width r: every code keeps its top r bits and merge() fills
the missing bits with the upper centre of the bin (the highest missing bit set, the others clear:
c * 2^(B-r) + 2^(B-r-1)), which is again a block of the source's type: a lower width runs on the
same ggml kernel. For MXFP4 (FP4 values 0 .5 1 1.5 2 3 4 6, sign on top) the top two bits are the
sign and whether the magnitude is at least 2; the fill is the upper of the bin's middle values.

Types (bits per code; widths; plane bits): Q4_0, Q4_1, Q4_K, MXFP4 (4; 2,3,4; 2|1|1); Q5_0, Q5_1,
Q5_K (5; 2,3,4,5; 2|1|1|1); Q6_K (6; 2,4,6; 2|2|2); Q8_0 (8; 2,4,8; 2|2|4). Other types (Q2_K,
Q3_K, the IQ types) are not nested: at 2-3.5 bits per weight there is no narrower width worth
reading, and the IQ types' codes index lattices whose leading bits are not a coarser grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
import numpy as np

from .buffers import alloc
from .native_kernels import (
    merge_mxfp4,
    merge_program,
    merge_q4_0,
    merge_q4_1,
    merge_q4_k,
    merge_q4_kx8,
    merge_q5_k,
    merge_q6_k,
    merge_q8_0,
    pad,
    split_blocks,
)

Q = gguf.GGMLQuantizationType


def _runs(mask: int) -> list[tuple[int, int]]:
    """pext(b, mask) = sum((b >> sh) & mk for sh, mk in runs); pdep(x) = sum((x & mk) << sh)."""
    runs, dst, bit = [], 0, 0
    while bit < 8:
        if mask >> bit & 1:
            lo = bit
            while bit < 8 and mask >> bit & 1:
                bit += 1
            n = bit - lo
            runs.append((lo - dst, ((1 << n) - 1) << dst))
            dst += n
        else:
            bit += 1
    return runs


@dataclass(frozen=True)
class CodeRange:
    start: int
    length: int
    masks: tuple[int, ...]  # per plane, MSB first; OR = 0xFF, disjoint
    # fills[k - 1]: the bits set in even and odd bytes when only the first k planes are read
    fills: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class NativeType:
    qtype: Q
    bits: int  # bits of one code
    widths: tuple[int, ...]  # widths[k - 1]: the width read from k planes
    meta: tuple[int, int]  # byte range of the metadata in a block
    ranges: tuple[CodeRange, ...]

    def __post_init__(self):
        # the kernels index by these: a bad mask would write outside a block
        for r in self.ranges:
            acc = 0
            for m in r.masks:
                k = bin(m).count("1")
                if acc & m or (m and (k not in (1, 2, 4, 8) or r.length % (8 // k) or len(_runs(m)) > 2)):
                    raise ValueError(f"{self.qtype.name}: bad plane mask {m:#04x} for a range of {r.length} bytes")
                acc |= m
            if acc != 0xFF or len(r.masks) != len(self.widths) or len(r.fills) != len(self.widths):
                raise ValueError(f"{self.qtype.name}: the plane masks of a range must cover every bit once")

    @property
    def block(self) -> tuple[int, int]:
        return gguf.GGML_QUANT_SIZES[self.qtype]  # (weights, bytes) per block

    @property
    def n_planes(self) -> int:
        return len(self.widths)

    def block_plane_bytes(self) -> list[int]:
        """Bytes of one block in each plane."""
        out = [self.meta[1] - self.meta[0]] + [0] * (self.n_planes - 1)
        for r in self.ranges:
            for p, m in enumerate(r.masks):
                out[p] += r.length * bin(m).count("1") // 8
        return out

    def plane_nbytes(self, n_out: int, n_in: int) -> list[int]:
        qk, _ = self.block
        if n_in % qk:
            raise ValueError(f"{self.qtype.name}: a row of {n_in} weights is not whole blocks of {qk}")
        n = n_out * n_in // qk
        return [n * b for b in self.block_plane_bytes()]

    @functools.cached_property
    def program(self) -> np.ndarray:
        """The kernels' instructions, int64 [steps, 8]: per (range, plane) with a non-zero mask:
        plane, range start, range length, output offset in the plane's block piece, bits per byte,
        then the mask's two runs (shift, mask) packed as sh1 | mk1 << 8 | sh2 << 16 | mk2 << 24,
        the fills (bits 16 (k - 1) ..: the even and odd bytes' fills when k planes are read) and
        whether this is the range's first step."""
        rows = []
        off = [self.meta[1] - self.meta[0]] + [0] * (self.n_planes - 1)
        for r in self.ranges:
            fills = sum((ev | od << 8) << (16 * i) for i, (ev, od) in enumerate(r.fills))
            first = 1
            for p, m in enumerate(r.masks):
                if not m:
                    continue
                k = bin(m).count("1")
                (s1, m1), (s2, m2) = (_runs(m) + [(0, 0)])[:2]
                rows.append([p, r.start, r.length, off[p], k, s1 | m1 << 8 | s2 << 16 | m2 << 24, fills, first])
                off[p] += r.length * k // 8
                first = 0
        return np.array(rows, np.int64)


def _rng(start, length, masks, fills) -> CodeRange:
    return CodeRange(start, length, masks, tuple(f if isinstance(f, tuple) else (f, f) for f in fills))


# The fills put half the codes of a bin one above its centre and half one below (the low nibble
# at the upper, the high nibble at the lower middle code; Q8_0's even bytes at the upper, odd at
# the lower), so a lower width has no bias: its codes average the bin's centre.
_NIB4 = ((0xCC, 0x22, 0x11), (0x12, 0x01, 0))  # 4-bit nibbles: 2|1|1
_NIB5 = ((0x88, 0x44, 0x22, 0x11), (0x34, 0x12, 0x01, 0))  # the low nibbles of 5-bit codes
_HIGH5 = ((0xFF, 0, 0, 0), (0, 0, 0, 0))  # their fifth bits, all in plane 0


def _types() -> dict[Q, NativeType]:
    t = [
        NativeType(Q.Q4_0, 4, (2, 3, 4), (0, 2), (_rng(2, 16, *_NIB4),)),
        NativeType(Q.Q4_1, 4, (2, 3, 4), (0, 4), (_rng(4, 16, *_NIB4),)),
        NativeType(Q.MXFP4, 4, (2, 3, 4), (0, 1), (_rng(1, 16, *_NIB4),)),
        NativeType(Q.Q4_K, 4, (2, 3, 4), (0, 16), (_rng(16, 128, *_NIB4),)),
        NativeType(Q.Q5_0, 5, (2, 3, 4, 5), (0, 2), (_rng(2, 4, *_HIGH5), _rng(6, 16, *_NIB5))),
        NativeType(Q.Q5_1, 5, (2, 3, 4, 5), (0, 4), (_rng(4, 4, *_HIGH5), _rng(8, 16, *_NIB5))),
        NativeType(Q.Q5_K, 5, (2, 3, 4, 5), (0, 16), (_rng(16, 32, *_HIGH5), _rng(48, 128, *_NIB5))),
        # Q6_K: ql [128] low nibbles, qh [64] 2-bit high fields, scales [16], d
        NativeType(
            Q.Q6_K,
            6,
            (2, 4, 6),
            (192, 210),
            (_rng(0, 128, (0, 0xCC, 0x33), (0x78, 0x12, 0)), _rng(128, 64, (0xFF, 0, 0), (0, 0, 0))),
        ),
        # Q8_0: int8 codes; their top bits are bins of the signed range too
        NativeType(Q.Q8_0, 8, (2, 4, 8), (0, 2), (_rng(2, 32, (0xC0, 0x30, 0x0F), ((0x20, 0x1F), (0x08, 0x07), 0)),)),
    ]
    return {n.qtype: n for n in t}


TYPES: dict[Q, NativeType] = _types()

# in a store whose other matrices have four planes (Q5_K_M: Q5_K beside Q6_K), these split finer
FOUR_PLANES: dict[Q, NativeType] = {
    Q.Q6_K: NativeType(
        Q.Q6_K,
        6,
        (2, 4, 5, 6),
        (192, 210),
        (_rng(0, 128, (0, 0xCC, 0x22, 0x11), (0x78, 0x12, 0x01, 0)), _rng(128, 64, (0xFF, 0, 0, 0), (0, 0, 0, 0))),
    ),
    Q.Q8_0: NativeType(
        Q.Q8_0,
        8,
        (2, 4, 6, 8),
        (0, 2),
        (_rng(2, 32, (0xC0, 0x30, 0x0C, 0x03), ((0x20, 0x1F), (0x08, 0x07), (0x02, 0x01), 0)),),
    ),
}


def _natural_planes(qtype) -> int:
    return TYPES[qtype].n_planes if qtype in TYPES else 1


def store_schemes(types: list[dict[str, int] | None]) -> list[NativeScheme | None]:
    """Per layer (None: no experts) the scheme of a native store whose matrices have these source
    types. The store has as many planes as its most finely split type; its widths, by plane count,
    are that type's (a Q4_K_M store: 2,3,4; Q5_K_M: 2,3,4,5, its Q6_K split 2|2|1|1). Where no
    type is nested (Q3_K_S), one plane and one width: the source's bits per weight, rounded."""
    given = [{m: Q(t) for m, t in ts.items()} for ts in types if ts is not None]
    if not given:
        raise ValueError("no layer has experts")
    n_planes = max(_natural_planes(t) for ts in given for t in ts.values())
    widths = None
    for ts in given:
        for t in ts.values():
            nt = layout(t, n_planes)
            if nt is not None and nt.n_planes == n_planes and widths is None:
                widths = nt.widths
    if widths is None:
        qk, size = gguf.GGML_QUANT_SIZES[next(iter(given[0].values()))]
        widths = (max(1, round(size * 8 / qk)),)
    return [None if ts is None else NativeScheme(ts, n_planes, widths) for ts in types]


def layout(qtype, n_planes: int) -> NativeType | None:
    """How a matrix of this type is split in a store of n_planes planes; None: kept whole, in plane 0."""
    qtype = Q(qtype)
    if qtype in FOUR_PLANES and n_planes == 4:
        return FOUR_PLANES[qtype]
    return TYPES.get(qtype)


class NativeScheme:
    """One layer's experts in a store of scheme "native": each matrix in its source type (types:
    matrix -> ggml type), split by layout() into the store's n_planes planes; a matrix with fewer
    planes has empty ones after its last. The store's widths name plane counts (store_schemes)."""

    name = "native"

    def __init__(self, types: dict[str, int], n_planes: int, widths: tuple[int, ...]):
        self.types = {m: Q(t) for m, t in types.items()}
        self.n_planes = n_planes
        self.widths = widths
        self.layouts = {m: layout(t, n_planes) for m, t in self.types.items()}
        self.group = gguf.GGML_QUANT_SIZES[self.types[next(iter(self.types))]][0]

    def __repr__(self) -> str:
        return f"NativeScheme({ {m: t.name for m, t in self.types.items()} })"

    def planes_for(self, bits: int) -> int:
        if bits not in self.widths:
            raise ValueError(f"native: width {bits} is not one of {self.widths}")
        return self.widths.index(bits) + 1

    def plane_nbytes(self, matrix: str, n_out: int, n_in: int) -> list[int]:
        nt = self.layouts[matrix]
        if nt is None:
            qk, size = gguf.GGML_QUANT_SIZES[self.types[matrix]]
            if n_in % qk:
                raise ValueError(f"{self.types[matrix].name}: a row of {n_in} weights is not whole blocks of {qk}")
            sizes = [n_out * n_in // qk * size]
        else:
            sizes = nt.plane_nbytes(n_out, n_in)
        return sizes + [0] * (self.n_planes - len(sizes))

    def split(self, matrix: str, raw: np.ndarray, n_out: int, n_in: int) -> list[np.ndarray]:
        """One matrix's source blocks -> its n_planes planes (empty ones last)."""
        nt = self.layouts[matrix]
        planes = (
            [np.ascontiguousarray(raw).view(np.uint8).reshape(-1)] if nt is None else split_type(nt, raw, n_out, n_in)
        )
        return planes + [np.empty(0, np.uint8)] * (self.n_planes - len(planes))

    def blocks_nbytes(self, matrix: str, n_out: int, n_in: int) -> int:
        qk, bsize = gguf.GGML_QUANT_SIZES[self.types[matrix]]
        return n_out * n_in // qk * bsize

    def merges_packed(self, matrix: str) -> bool:
        """Whether blocks(..., packed=True) writes this matrix in ggml's repacked layout (Q4_K)."""
        return self.layouts[matrix] is TYPES[Q.Q4_K]

    def blocks(
        self,
        matrix: str,
        planes: list[np.ndarray],
        n_out: int,
        n_in: int,
        out: np.ndarray | None = None,
        packed: bool = False,
    ) -> np.ndarray:
        """The first k planes of one matrix -> blocks of its source type (merge(); exact with all),
        in `out` (blocks_nbytes bytes, 32-byte aligned) or a buffer of their own; packed (where
        merges_packed, n_out a multiple of 8): in ggml's block_q4_Kx8 layout, in the same pass."""
        nt = self.layouts[matrix]
        if nt is None:
            return np.asarray(planes[0]).view(np.uint8).reshape(n_out, -1)
        if out is None:
            out = alloc(self.blocks_nbytes(matrix, n_out, n_in))
        if packed:
            return merge_q4_kx8_type(nt, planes[: nt.n_planes], n_out, n_in, out.reshape(n_out, -1))
        return merge_type(nt, planes[: nt.n_planes], n_out, n_in, out.reshape(n_out, -1))


# ---- kernels ----------------------------------------------------------------------------------


def _blocks_of(raw: np.ndarray, nt: NativeType, n_out: int, n_in: int) -> np.ndarray:
    qk, bsize = nt.block
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    want = n_out * n_in // qk * bsize
    if raw.size != want:
        raise ValueError(f"{nt.qtype.name} [{n_out}, {n_in}]: {raw.size} bytes, expected {want}")
    return raw.reshape(-1, bsize)


def split(qtype, raw: np.ndarray, n_out: int, n_in: int) -> list[np.ndarray]:
    """A matrix's ggml blocks (n_out rows of n_in weights) -> its planes, MSB first."""
    return split_type(TYPES[Q(qtype)], raw, n_out, n_in)


def split_type(nt: NativeType, raw: np.ndarray, n_out: int, n_in: int) -> list[np.ndarray]:
    blocks = _blocks_of(raw, nt, n_out, n_in)
    pb = nt.block_plane_bytes()
    planes = [np.empty((len(blocks), b), np.uint8) for b in pb]
    split_blocks(blocks, nt.meta[0], nt.meta[1], nt.program, *pad(planes))
    return [p.reshape(-1) for p in planes]


def merge(qtype, planes: list[np.ndarray], n_out: int, n_in: int, out: np.ndarray | None = None) -> np.ndarray:
    """The first k planes -> blocks of the source's type, uint8 [n_out, row bytes]: with all planes
    the source's own bytes, bit for bit; with fewer, every code's missing bits filled with the upper
    centre of its bin."""
    return merge_type(TYPES[Q(qtype)], planes, n_out, n_in, out)


_NIB4_32 = {Q.Q4_0: merge_q4_0, Q.Q4_1: merge_q4_1, Q.MXFP4: merge_mxfp4}  # 32-weight nibble blocks


def _fill_word(r: CodeRange, k: int) -> np.uint64:
    """A range's fill for k planes as a little-endian word of eight code bytes (even, odd, even ...
    from the range's start)."""
    ev, od = r.fills[k - 1]
    return np.uint64(int.from_bytes(bytes([ev, od] * 4), "little"))


def _checked_planes(nt: NativeType, planes: list[np.ndarray], n_out: int, n_in: int) -> list[np.ndarray]:
    """The first k planes of a matrix as flat contiguous uint8, each checked against its size."""
    want = nt.plane_nbytes(n_out, n_in)
    if not 1 <= len(planes) <= nt.n_planes:
        raise ValueError(f"{nt.qtype.name}: {len(planes)} planes, have 1..{nt.n_planes}")
    flat = []
    for p, plane in enumerate(planes):
        pl = np.ascontiguousarray(plane).view(np.uint8).reshape(-1)
        if pl.size != want[p]:
            raise ValueError(f"{nt.qtype.name}: plane {p} has {pl.size} bytes, expected {want[p]}")
        flat.append(pl)
    return flat


def merge_type(nt: NativeType, planes: list[np.ndarray], n_out: int, n_in: int, out: np.ndarray | None = None):
    k = len(planes)
    qk, bsize = nt.block
    n = n_out * n_in // qk
    views = [pl.reshape(n, -1) for pl in _checked_planes(nt, planes, n_out, n_in)]
    if out is None:
        out = np.empty((n_out, n_in // qk * bsize), np.uint8)
    r = nt.ranges[0]
    # the common layouts have kernels of their own (constant loop lengths, or eight bytes to a
    # word): 3-6x the generic kernel, which follows the layout's program
    if nt.qtype in _NIB4_32 and nt is TYPES[nt.qtype]:  # Q4_0, Q4_1, MXFP4
        v = [x.reshape(-1) for x in pad(views)]
        _NIB4_32[nt.qtype](out.reshape(-1), v[0], v[1], v[2], _fill_word(r, k), k)
    elif nt is TYPES[Q.Q4_K]:
        v = pad(views)
        merge_q4_k(out.reshape(n, bsize), v[0], v[1], v[2], np.array(r.fills[k - 1] * (r.length // 2), np.uint8), k)
    elif nt is TYPES[Q.Q5_K]:
        v = pad(views)
        merge_q5_k(out.reshape(n, bsize), v[0], v[1], v[2], v[3], np.uint8(nt.ranges[1].fills[k - 1][0]), k)
    elif nt is TYPES[Q.Q8_0]:
        v = [x.reshape(-1) for x in pad(views)]
        merge_q8_0(out.reshape(-1), v[0], v[1], v[2], _fill_word(r, k), k)
    elif nt is TYPES[Q.Q6_K]:  # Q4_K_M's and Q5_K_M's down projections: ~3x the generic kernel
        v = pad(views)
        merge_q6_k(out.reshape(n, bsize), v[0], v[1], v[2], np.uint8(r.fills[k - 1][0]), k)
    else:
        merge_program(out.reshape(n, bsize), nt.meta[0], nt.meta[1], nt.program, k, *pad(views))
    return out


def merge_q4_kx8_type(nt: NativeType, planes: list[np.ndarray], n_out: int, n_in: int, out: np.ndarray) -> np.ndarray:
    """merge_type for Q4_K into ggml's block_q4_Kx8 (quant/repack.py) in one pass: the bytes
    repack.repack_q4_Kx8 makes of merge_type's. n_out a multiple of 8; planes 8-byte aligned."""
    k = len(planes)
    if nt is not TYPES[Q.Q4_K] or n_out % 8:
        raise ValueError(f"{nt.qtype.name} [{n_out}, {n_in}]: no repacked merge")
    flat = [pl if pl.ctypes.data % 8 == 0 else pl.copy() for pl in _checked_planes(nt, planes, n_out, n_in)]
    v = [x.reshape(-1) for x in pad(flat)]
    merge_q4_kx8(out.reshape(-1), v[0], v[1], v[2], _fill_word(nt.ranges[0], k), k, n_out, n_in // nt.block[0])
    return out


def dequantize(qtype, planes: list[np.ndarray], n_out: int, n_in: int) -> np.ndarray:
    """float32 [n_out, n_in] at the width of the first len(planes) planes (tests, benchmarks)."""
    blocks = merge(qtype, planes, n_out, n_in)
    return gguf.quants.dequantize(blocks, Q(qtype)).reshape(n_out, n_in).astype(np.float32, copy=False)
