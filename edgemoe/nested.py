"""Nested (matryoshka) bit-plane quantization of expert matrices.

One stored copy of a weight matrix W [n_out, n_in] as a list of *planes*; the first k planes are
themselves a usable low-bit matrix. Every plane is one self-contained contiguous uint8 buffer:

    [packed codes: n_out * n_in * nbits / 8 bytes][fp16 per-group scales: n_scale * n_out * G * 2 bytes]

with G = n_in / group groups per row (group runs along n_in). Packed codes are row-major, a row's
codes in nr = n_in*nbits/8 consecutive bytes; byte k of a row holds in bits [j*nbits, (j+1)*nbits)
the code of column j*nr + k (so the kernel decodes a whole row with long contiguous loops that
LLVM vectorizes). Scales are fp16 [n_out, G] arrays, one after the other.

Two schemes (SCHEMES):

"d2moe" (D2MoE, arXiv 2504.15299, residual binarization):
    plane 0: b1-bit asymmetric codes Q0 (b1 = widths[0]) + fp16 scale s0 and fp16 offset m0
             per group: W^_b1 = s0 * Q0 + m0   (= s0 * (Q0 - z) with z = -m0/s0)
    plane i: 1 bit B_i per weight + fp16 scale s_i per group: R = W - W^ -> sign(R) in {+1,-1},
             W^ += s_i * (2 B_i - 1)
    widths (2,3,4): 3 planes; widths (2,4,8): 7 planes (planes_for(4) = 3, planes_for(8) = 7).
    Fits, per group: base (s0, m0) candidates from a grid over clipping ratios, each also refined
    by alternating weighted least squares (codes <-> closed-form (s0, m0)); residual scales
    s_i = alpha * sum(a |R|) / sum(a) + (1 - alpha) * max|R| / 2 (alpha = 1: the closed-form LS
    scale of that plane, best for the next width alone; alpha = 0: halve the residual range, a
    binary expansion, best for the top width). The encoder picks the base candidate and alpha per
    group minimizing sum over readable widths of log(error) (every width counts, relatively).
    With act_scale the weights are a = act_scale^2 per input column (activation-aware: the
    error is E||x W^T - x W^_k^T||^2 for independent inputs of those magnitudes); else a = 1.

"matquant" (MatQuant arXiv 2502.06786 slicing, MatGPTQ arXiv 2602.03537 joint-width fit):
    One B-bit code q per weight (B = widths[-1]: INT8 for (2,4,8), INT4 for (2,3,4)), split
    MSB-first into the width increments: (2,4,8) -> bits 7-6 | 5-4 | 3-0; (2,3,4) -> 3-2 | 1 | 0.
    Plane 0 also holds the per-group fp16 scale s and offset m.
    Reading the first k planes gives width r and the code c_r = q >> (B - r); it is reconstructed
    at the centre of its bin:  W^_r = s * (c_r * d + (d - 1) / 2) + m,  d = 2^(B - r).
    This is MatQuant's rounded slice S(q', r) = clamp(round(q' / d), 0, 2^r - 1) * d taken in a
    domain offset by half an r-bit step, q' = q - (d-1)/2: for q = c*d + j (0 <= j < d),
    round((q - (d-1)/2) / d) = c exactly, so the rounded slice *is* the top bits and the planes need
    no carry or sign bits; every width's grid is centred on the int range (uniform bins, none half
    or 1.5 wide at the ends as plain S(q, r) has). The bins nest (a width-r bin is a union of
    width-(r+1) bins), so for given (s, m) the code minimizing the error summed over all widths
    (MatGPTQ's per-weight code search) is the nearest full-width code; the joint choice is the
    per-group (s, m), fitted by a grid over clipping ratios plus alternating weighted least
    squares on the error summed over all widths (optionally activation-weighted, as above).

Both schemes read as W^[o, i] = C[o, g] + sum_p A[p, o, g] * code_p[o, i] (g = i // group), with
per-group coefficients from the fp16 scales (d2moe: A_0 = s0, A_p = 2 s_p, C = m0 - sum s_p;
matquant: one B-bit code, A = s, C = m + s (d-1)/2).
matmul() computes x @ W^T on the packed planes: a numba kernel (njit parallel over output rows,
cache=True, fastmath off) decodes one row's codes into a uint8 scratch row, then multiply-adds
x * (A * code) per group into per-lane float32 accumulators, plus C * sum(x over the group); no
float32 copy of the matrix is made. Without numba a numpy fallback dequantizes tiles of rows
(<= 256 KiB of float32) and uses BLAS.
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised by whichever path is installed
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    HAVE_NUMBA = False

__all__ = ["Scheme", "D2MoE", "MatQuant", "SCHEMES", "default_bits", "rtn_quantize",
           "naive_msb_slices", "HAVE_NUMBA"]

_PACKABLE = (1, 2, 4, 8)
_TILE_BYTES = 256 * 1024  # float32 scratch bound for the numpy fallback


def default_bits(source_bits: float) -> tuple[int, ...]:
    """Readable widths for a model whose experts ship with `source_bits` bits per weight."""
    return (2, 3, 4) if source_bits <= 5 else (2, 4, 8)


# ---- packing ------------------------------------------------------------------------------------

def _pack(codes: np.ndarray, nbits: int, span: int) -> np.ndarray:
    """codes uint8 [n_out, n_in] (values < 2^nbits) -> packed uint8 [n_out * n_in * nbits / 8].
    Within each run of `span` columns (the planes use span = n_in, a whole row) with
    nb = span*nbits/8 bytes, byte k holds the code of column j*nb + k in bits [j*nbits, ...)."""
    n_out, n_in = codes.shape
    slots = 8 // nbits
    nb = span * nbits // 8
    c = codes.reshape(n_out, n_in // span, slots, nb).astype(np.uint8)
    out = np.zeros((n_out, n_in // span, nb), np.uint8)
    for j in range(slots):
        out |= (c[:, :, j, :] << np.uint8(j * nbits)).astype(np.uint8)
    return out.reshape(-1)


def _unpack(packed: np.ndarray, nbits: int, span: int, n_out: int, n_in: int) -> np.ndarray:
    """Inverse of _pack: uint8 [n_out, n_in]."""
    slots = 8 // nbits
    nb = span * nbits // 8
    p = packed.reshape(n_out, n_in // span, 1, nb)
    sh = (np.arange(slots, dtype=np.uint8) * nbits).reshape(1, 1, slots, 1)
    c = (p >> sh) & np.uint8((1 << nbits) - 1)
    return c.reshape(n_out, n_in)


def _decompose(bits: int) -> list[int]:
    if bits not in _PACKABLE:
        raise ValueError(f"a plane of {bits} bits cannot be packed (supported: {_PACKABLE})")
    return [bits]


# ---- fitting helpers ------------------------------------------------------------------------------

def _weights(act_scale: np.ndarray | None, n_in: int, group: int) -> np.ndarray:
    """Per input column LS weight a = act_scale^2 (normalized), as [G, group] float64."""
    if act_scale is None:
        return np.ones((n_in // group, group))
    a = np.asarray(act_scale, dtype=np.float64).reshape(-1)
    if a.shape[0] != n_in:
        raise ValueError(f"act_scale has {a.shape[0]} entries, expected n_in={n_in}")
    a = np.abs(a) ** 2
    mean = a.mean()
    a = a / mean if mean > 0 else np.ones_like(a)
    a = np.maximum(a, 1e-6)  # a column never seen still counts a little
    return a.reshape(n_in // group, group)


def _f16(a: np.ndarray) -> np.ndarray:
    """Round to what an fp16 store keeps (finite), back in float64."""
    return np.clip(a, -65504.0, 65504.0).astype(np.float16).astype(np.float64)


def _ls_affine(w: np.ndarray, g: np.ndarray, a: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """Weighted LS  w ~ s*g + m  per group (reduce over `axis`); returns (s, m) keepdims."""
    A = np.broadcast_to(a, w.shape)
    S0 = A.sum(axis=axis, keepdims=True)
    Sg = (A * g).sum(axis=axis, keepdims=True)
    Sgg = (A * g * g).sum(axis=axis, keepdims=True)
    Sw = (A * w).sum(axis=axis, keepdims=True)
    Sgw = (A * g * w).sum(axis=axis, keepdims=True)
    det = S0 * Sgg - Sg * Sg
    ok = det > 1e-12 * np.maximum(S0 * Sgg, 1e-300)
    s = np.where(ok, (S0 * Sgw - Sg * Sw) / np.where(ok, det, 1.0), 0.0)
    m = np.where(ok, (Sw - s * Sg) / S0, Sw / S0)
    return s, m


def _log_objective(errs, ref) -> np.ndarray:
    """sum over widths of log(error); scale-free across widths (per group, keepdims)."""
    floor = 1e-12 * ref + 1e-300
    return sum(np.log(e + floor) for e in errs)


def _ls_affine_multi(W, grids, a, lam) -> tuple[np.ndarray, np.ndarray]:
    """Weighted LS  W ~ s*g_r + m  jointly over widths r (weights a per column, lam_r per group)."""
    S0 = Sg = Sgg = Sw = Sgw = 0.0
    aw = a * W
    sa = a.sum(-1, keepdims=True) * np.ones_like(W[..., :1])
    saw = aw.sum(-1, keepdims=True)
    for g, lr in zip(grids, lam):
        ag = a * g
        S0 = S0 + lr * sa
        Sg = Sg + lr * ag.sum(-1, keepdims=True)
        Sgg = Sgg + lr * (ag * g).sum(-1, keepdims=True)
        Sw = Sw + lr * saw
        Sgw = Sgw + lr * (ag * W).sum(-1, keepdims=True)
    det = S0 * Sgg - Sg * Sg
    ok = det > 1e-12 * np.maximum(S0 * Sgg, 1e-300)
    s = np.where(ok, (S0 * Sgw - Sg * Sw) / np.where(ok, det, 1.0), 0.0)
    m = np.where(ok, (Sw - s * Sg) / S0, Sw / S0)
    return s, m


def rtn_quantize(w: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Reference: independent round-to-nearest asymmetric min-max per-group quantization
    (Q = clamp(round(W/s) + z), fp16 scale, integer zero point); returns the float32 W^."""
    n_out, n_in = w.shape
    g = w.astype(np.float64).reshape(n_out, n_in // group, group)
    lo = np.minimum(g.min(-1, keepdims=True), 0.0)
    hi = np.maximum(g.max(-1, keepdims=True), 0.0)
    qmax = (1 << bits) - 1
    s = _f16((hi - lo) / qmax)
    s = np.where(s > 0, s, 1.0)
    z = np.clip(np.round(-lo / s), 0, qmax)
    q = np.clip(np.round(g / s) + z, 0, qmax)
    return (s * (q - z)).reshape(n_out, n_in).astype(np.float32)


def naive_msb_slices(w: np.ndarray, widths, group: int = 128, mode: str = "round") -> dict:
    """Naive baseline: RTN INT8 (min-max per group), then MSB slices of its codes.
    mode "round": MatQuant's S(q, r) = clamp(round(q / 2^(8-r)), 0, 2^r-1) * 2^(8-r), read with
    the INT8 scale/zero; mode "trunc": top r bits, reconstructed at the bin centre.
    Returns {r: float32 W^_r}."""
    n_out, n_in = w.shape
    g = w.astype(np.float64).reshape(n_out, n_in // group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = _f16((hi - lo) / 255.0)
    s = np.where(s > 0, s, 1.0)
    m = _f16(lo)
    q = np.clip(np.round((g - m) / s), 0, 255)
    out = {}
    for r in widths:
        d = 2.0 ** (8 - r)
        if mode == "round":
            c = np.clip(np.round(q / d), 0, 2 ** r - 1) * d
        else:
            c = np.floor(q / d) * d + (d - 1) / 2
        out[r] = (s * c + m).reshape(n_out, n_in).astype(np.float32)
    return out


# ---- schemes ---------------------------------------------------------------------------------------

class Scheme:
    """One nested bit-plane format. Subclasses define plane layout, encode and coefficients."""

    name: str = ""

    def __init__(self, bits: tuple[int, ...] = (2, 3, 4), group: int = 128):
        bits = tuple(int(b) for b in bits)
        if not bits or list(bits) != sorted(set(bits)) or bits[0] < 1 or bits[-1] > 8:
            raise ValueError(f"bits must be strictly ascending widths in 1..8, got {bits}")
        if group <= 0 or group % 8:
            raise ValueError(f"group must be a positive multiple of 8, got {group}")
        self.widths = bits
        self.group = int(group)
        self.plane_bits: list[int] = []  # bits per weight of each plane's codes
        self.plane_nscales: list[int] = []  # fp16 [n_out, G] arrays stored in each plane
        self._width_planes: dict[int, int] = {}
        self._layout()

    def _layout(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.widths}, group={self.group})"

    @property
    def n_planes(self) -> int:
        return len(self.plane_bits)

    def planes_for(self, bits: int) -> int:
        """How many leading planes make a `bits`-wide matrix."""
        try:
            return self._width_planes[int(bits)]
        except KeyError:
            raise ValueError(f"{self.name}: width {bits} is not one of {self.widths}") from None

    def width_of(self, n_planes: int) -> int:
        """The width read from the first n_planes planes (must be a readable prefix)."""
        for w, k in self._width_planes.items():
            if k == n_planes:
                return w
        raise ValueError(f"{self.name}: {n_planes} planes is not a readable prefix "
                         f"(readable: {sorted(self._width_planes.values())})")

    def _check_shape(self, n_out: int, n_in: int) -> None:
        if n_out <= 0 or n_in <= 0 or n_in % self.group:
            raise ValueError(f"shape [{n_out}, {n_in}]: n_in must be a positive multiple of "
                             f"group={self.group}")

    def plane_nbytes(self, n_out: int, n_in: int) -> list[int]:
        self._check_shape(n_out, n_in)
        G = n_in // self.group
        return [n_out * n_in * b // 8 + ns * n_out * G * 2
                for b, ns in zip(self.plane_bits, self.plane_nscales)]

    # -- plane (de)serialization --
    def _build_plane(self, p: int, codes: np.ndarray, scales: list[np.ndarray]) -> np.ndarray:
        parts = [_pack(codes, self.plane_bits[p], codes.shape[1])]  # row-wide slots
        for s in scales:
            parts.append(np.ascontiguousarray(s, dtype=np.float16).reshape(-1).view(np.uint8))
        return np.ascontiguousarray(np.concatenate(parts))

    def _split_plane(self, plane: np.ndarray, p: int, n_out: int, n_in: int):
        b = self.plane_bits[p]
        ncode = n_out * n_in * b // 8
        G = n_in // self.group
        plane = np.asarray(plane)
        if plane.dtype != np.uint8 or plane.ndim != 1:
            plane = np.ascontiguousarray(plane).view(np.uint8).reshape(-1)
        want = self.plane_nbytes(n_out, n_in)[p]
        if plane.shape[0] != want:
            raise ValueError(f"{self.name}: plane {p} has {plane.shape[0]} bytes, expected {want} "
                             f"for shape [{n_out}, {n_in}]")
        codes = plane[:ncode]
        sc = plane[ncode:].view(np.float16).reshape(self.plane_nscales[p], n_out, G) \
            if self.plane_nscales[p] else None
        return codes, sc

    def _check_planes(self, planes, n_out, n_in) -> list:
        self._check_shape(n_out, n_in)
        k = len(planes)
        if k < 1 or k > self.n_planes:
            raise ValueError(f"{self.name}: got {k} planes, have 1..{self.n_planes}")
        self.width_of(k)
        return [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in planes]

    # -- coefficients: W^[o, g*group + i] = C[o, g] + sum_p A[p, o, g] * code_p[o, g*group + i] --
    def _coefs(self, scales: list, k: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _kind(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mult(self, k: int) -> np.ndarray:
        return np.ones(k, np.float64)

    def dequantize(self, planes: list[np.ndarray], n_out: int, n_in: int) -> np.ndarray:
        """float32 [n_out, n_in] from the first len(planes) planes (tests / benchmarks only)."""
        planes = self._check_planes(planes, n_out, n_in)
        return _dequant_rows(self, planes, n_out, n_in, 0, n_out)

    def matmul(self, planes: list[np.ndarray], n_out: int, n_in: int, x: np.ndarray,
               backend: str | None = None) -> np.ndarray:
        """x float32 [T, n_in] (or [n_in]) -> [T, n_out] = x @ W^T on the packed planes.
        backend: None (numba if installed), "numba" or "numpy"."""
        planes = self._check_planes(planes, n_out, n_in)
        squeeze = np.ndim(x) == 1
        x2 = np.ascontiguousarray(x[None, :] if squeeze else x, dtype=np.float32)
        if x2.ndim != 2 or x2.shape[1] != n_in:
            raise ValueError(f"x of shape {list(np.shape(x))} does not match n_in={n_in}")
        use = backend or ("numba" if HAVE_NUMBA else "numpy")
        if use == "numba":
            if not HAVE_NUMBA:
                raise RuntimeError("numba is not installed")
            xs = x2.reshape(x2.shape[0], n_in // self.group, self.group).sum(-1, dtype=np.float32)
            y = _nested_matmul(tuple(planes), np.array(self.plane_bits[:len(planes)], np.int64),
                               np.array(self.plane_nscales[:len(planes)], np.int64),
                               self._kind(), self._mult(len(planes)), self._offset(len(planes)),
                               n_out, n_in, self.group, x2, xs, self._msym())
        elif use == "numpy":
            y = _matmul_numpy(self, planes, n_out, n_in, x2)
        else:
            raise ValueError(f"backend {backend!r}: expected 'numba' or 'numpy'")
        return y[0] if squeeze else y

    def _offset(self, k: int) -> float:
        return 0.0

    def _msym(self) -> float:
        return 0.0

    def encode(self, w: np.ndarray, act_scale: np.ndarray | None = None) -> list[np.ndarray]:
        parts = self.encode_parts(w, act_scale)
        return parts["planes"]

    def encode_parts(self, w, act_scale=None) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class D2MoE(Scheme):
    """Base b1-bit asymmetric plane + 1-bit residual sign planes (D2MoE)."""

    name = "d2moe"
    n_grid = 6  # clipping ratios tried for the base range
    alphas = (1.0, 0.0, 0.25, 0.5, 0.75)  # residual-scale rules tried (see _chain)
    n_iter = 2  # alternating LS passes for the base

    def _layout(self) -> None:
        b1 = self.widths[0]
        _decompose(b1)
        self.plane_bits = [b1] + [1] * (self.widths[-1] - b1)
        self.plane_nscales = [2] + [1] * (self.widths[-1] - b1)
        self._width_planes = {w: 1 + w - b1 for w in self.widths}

    def _kind(self) -> int:
        return 0

    def encode_parts(self, w: np.ndarray, act_scale: np.ndarray | None = None) -> dict:
        """Encode; returns {"planes", "q0", "s0", "m0", "signs": [+-1 arrays], "s": [scales]}
        (the parts are what the scheme definition reconstructs from; tests use them)."""
        w = np.asarray(w, dtype=np.float32)
        n_out, n_in = w.shape
        self._check_shape(n_out, n_in)
        gs, G = self.group, n_in // self.group
        W = w.astype(np.float64).reshape(n_out, G, gs)
        a = _weights(act_scale, n_in, gs)[None]  # [1, G, gs]
        qmax = (1 << self.widths[0]) - 1
        lo, hi = W.min(-1, keepdims=True), W.max(-1, keepdims=True)
        ref = (a * W * W).sum(-1, keepdims=True)
        best_obj = np.full((n_out, G, 1), np.inf)
        best_s = np.zeros((n_out, G, 1))
        best_m = np.zeros((n_out, G, 1))
        best_a = np.ones((n_out, G, 1))
        for ratio in np.linspace(1.0, 0.5, self.n_grid):
            mid = (hi + lo) / 2
            half = (hi - lo) / 2 * ratio
            s = (2 * half) / qmax
            m = mid - half
            cs, cm, cerr = None, None, None
            for it in range(self.n_iter + 1):  # alternate codes <-> LS (s, m) on the base
                s, m = _f16(s), _f16(m)
                safe = np.where(s != 0, s, 1.0)
                q = np.clip(np.round((W - m) / safe), 0, qmax)
                err = (a * (W - (s * q + m)) ** 2).sum(-1, keepdims=True)
                if cerr is None:
                    cs, cm, cerr = s, m, err
                else:
                    better = err < cerr
                    cs, cm, cerr = (np.where(better, s, cs), np.where(better, m, cm),
                                    np.where(better, err, cerr))
                if it < self.n_iter:
                    s, m = _ls_affine(W, q, a, axis=-1)
            # choose the base for every width at once: run the residual chain and score
            # sum over widths of log(error) (a relative gain counts the same at any width)
            # (both the plain clipped range and its LS refinement are candidates: the refinement
            # is best at b1 bits but can cost the higher widths)
            s_init, m_init = _f16((2 * half) / qmax), _f16(mid - half)
            for cs_, cm_ in ((s_init, m_init), (cs, cm)):
                for alpha in self.alphas[:2]:
                    obj = _log_objective(self._chain_errs(W, a, cs_, cm_, alpha), ref)
                    better = obj < best_obj
                    best_obj = np.where(better, obj, best_obj)
                    best_s = np.where(better, cs_, best_s)
                    best_m = np.where(better, cm_, best_m)
                    best_a = np.where(better, alpha, best_a)
        s0, m0 = best_s, best_m
        for alpha in self.alphas[2:]:  # refine the residual-scale rule for the chosen base
            obj = _log_objective(self._chain_errs(W, a, s0, m0, alpha), ref)
            better = obj < best_obj
            best_obj = np.where(better, obj, best_obj)
            best_a = np.where(better, alpha, best_a)
        _, q0, signs, scales = self._chain(W, a, s0, m0, best_a)
        planes = [self._build_plane(0, q0.reshape(n_out, n_in).astype(np.uint8),
                                    [s0[..., 0], m0[..., 0]])]
        for p in range(1, self.n_planes):
            planes.append(self._build_plane(
                p, (signs[p - 1] > 0).reshape(n_out, n_in).astype(np.uint8), [scales[p - 1]]))
        return {"planes": planes, "q0": q0.reshape(n_out, n_in), "s0": s0[..., 0],
                "m0": m0[..., 0], "signs": [b.reshape(n_out, n_in) for b in signs],
                "s": scales}

    def _chain_errs(self, W, a, s0, m0, alpha) -> list:
        """Errors at each readable width of _chain (numba when available: ~10x faster; scales are
        not rounded to fp16 there, which only matters for choosing among candidates)."""
        if not HAVE_NUMBA:
            return self._chain(W, a, s0, m0, alpha)[0]
        n_out, G, gs = W.shape
        readable = np.zeros(self.n_planes, np.bool_)
        for k in self._width_planes.values():
            readable[k - 1] = True
        al = np.broadcast_to(np.asarray(alpha, np.float64), (n_out, G, 1))[..., 0]
        e = _d2_chain_errs(W, np.ascontiguousarray(a[0]), np.ascontiguousarray(s0[..., 0]),
                           np.ascontiguousarray(m0[..., 0]), np.ascontiguousarray(al),
                           (1 << self.widths[0]) - 1, self.n_planes, readable)
        return [e[:, :, i:i + 1] for i in range(e.shape[2])]

    def _chain(self, W, a, s0, m0, alpha=1.0):
        """Base codes + residual sign planes for base (s0, m0); errors at each readable width.

        Residual scale s_i = alpha * LS + (1 - alpha) * max|R| / 2, per group: alpha = 1 is the
        closed-form least-squares scale sum(a |R|) / sum(a) (best for the plane alone); alpha = 0
        halves the residual's range each plane (a binary expansion: the planes then make a
        uniform grid, best for the top width). The encoder picks alpha per group."""
        qmax = (1 << self.widths[0]) - 1
        safe = np.where(s0 != 0, s0, 1.0)
        q0 = np.clip(np.round((W - m0) / safe), 0, qmax)
        rec = (s0 * q0 + m0).astype(np.float32).astype(np.float64)
        errs = {}
        R = W - rec
        signs, scales = [], []
        sa = a.sum(-1, keepdims=True)
        for p in range(self.n_planes):
            if p:
                B = np.where(R >= 0, 1.0, -1.0)
                absR = np.abs(R)
                sp = (a * absR).sum(-1, keepdims=True) / sa
                if not np.all(np.asarray(alpha) == 1.0):
                    sp = alpha * sp + (1.0 - alpha) * 0.5 * absR.max(-1, keepdims=True)
                sp = _f16(sp)
                R = R - sp * B
                signs.append(B)
                scales.append(sp[..., 0])
            if p + 1 in self._width_planes.values():
                errs[p + 1] = (a * R * R).sum(-1, keepdims=True)
        return list(errs.values()), q0, signs, scales

    @staticmethod
    def reconstruct(parts: dict, k: int, group: int) -> np.ndarray:
        """The scheme definition: W^_k = s0*Q0 + m0 + sum_{i<k} s_i * B_i (float64)."""
        q0 = parts["q0"]
        rep = lambda s: np.repeat(s.astype(np.float64), group, axis=1)  # noqa: E731
        rec = rep(parts["s0"]) * q0 + rep(parts["m0"])
        for i in range(k - 1):
            rec = rec + rep(parts["s"][i]) * parts["signs"][i]
        return rec

    def _coefs(self, scales: list, k: int):
        s0 = scales[0][0].astype(np.float32)
        C = scales[0][1].astype(np.float32)
        A = [s0]
        for p in range(1, k):
            sp = scales[p][0].astype(np.float32)
            A.append(sp + sp)
            C = C - sp
        return A, C


class MatQuant(Scheme):
    """MSB-sliced B-bit codes with bin-centred slices, (s, m) fitted for all widths at once."""

    name = "matquant"
    n_grid = 8
    n_iter = 3

    def _layout(self) -> None:
        prev = 0
        self.plane_bits, self.plane_nscales = [], []
        for i, w in enumerate(self.widths):
            _decompose(w - prev)
            self.plane_bits.append(w - prev)
            self.plane_nscales.append(2 if i == 0 else 0)
            self._width_planes[w] = i + 1
            prev = w
        self.B = self.widths[-1]

    def _kind(self) -> int:
        return 1

    def _mult(self, k: int) -> np.ndarray:
        # plane p's code sits at bit (B - cumulative bits through p) of q
        cum = np.cumsum(self.plane_bits[:k])
        return (2.0 ** (self.B - cum)).astype(np.float64)

    def _offset(self, k: int) -> float:
        d = 2.0 ** (self.B - self.widths[k - 1])
        return (d - 1) / 2

    def _grid(self, q: np.ndarray, r: int) -> np.ndarray:
        d = 2 ** (self.B - r)
        return (np.floor(q / d) * d + (d - 1) / 2.0)

    def encode_parts(self, w: np.ndarray, act_scale: np.ndarray | None = None) -> dict:
        """Encode; returns {"planes", "q" (B-bit codes), "s", "m"} (tests use the parts)."""
        w = np.asarray(w, dtype=np.float32)
        n_out, n_in = w.shape
        self._check_shape(n_out, n_in)
        gs, G = self.group, n_in // self.group
        W = w.astype(np.float64).reshape(n_out, G, gs)
        a = _weights(act_scale, n_in, gs)[None]
        qmax = (1 << self.B) - 1
        lo, hi = W.min(-1, keepdims=True), W.max(-1, keepdims=True)
        ref = (a * W * W).sum(-1, keepdims=True)
        best_obj = np.full((n_out, G, 1), np.inf)
        best_s = np.zeros((n_out, G, 1))
        best_m = np.zeros((n_out, G, 1))
        for ratio in np.linspace(1.0, 0.5, self.n_grid):
            mid = (hi + lo) / 2
            half = (hi - lo) / 2 * ratio
            s = 2 * half / (qmax + 1)  # u = (W - m)/s in [-1/2, qmax + 1/2]
            m = mid - half + s / 2
            for it in range(self.n_iter + 1):
                s, m = _f16(s), _f16(m)
                safe = np.where(s != 0, s, 1.0)
                # joint code search: the bins nest, so the nearest full-width code is the
                # minimizer of the error summed over every width (see module docstring)
                q = np.clip(np.round((W - m) / safe), 0, qmax)
                gr = [self._grid(q, r) for r in self.widths]
                errs = [(a * (W - (s * g + m)) ** 2).sum(-1, keepdims=True) for g in gr]
                obj = _log_objective(errs, ref)
                better = obj < best_obj
                best_obj = np.where(better, obj, best_obj)
                best_s = np.where(better, s, best_s)
                best_m = np.where(better, m, best_m)
                if it < self.n_iter:
                    # (s, m) for all widths at once: weighted LS on the stacked widths, width r
                    # weighted 1/err_r (an IRLS step on sum_r log err_r)
                    fl = [e + 1e-12 * ref + 1e-300 for e in errs]
                    lo_e = np.minimum.reduce(fl)
                    lam = [lo_e / e for e in fl]  # in (0, 1]: no overflow on exact groups
                    s, m = _ls_affine_multi(W, gr, a, lam)
        s, m = best_s, best_m
        safe = np.where(s != 0, s, 1.0)
        q = np.clip(np.round((W - m) / safe), 0, qmax).reshape(n_out, n_in).astype(np.int64)
        return {"planes": self.from_codes(q, s[..., 0], m[..., 0]), "q": q, "s": s[..., 0], "m": m[..., 0]}

    def codes(self, planes: list[np.ndarray], n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every plane of one matrix -> its B-bit codes uint8 [n_out, n_in] and fp16 s, m [n_out, G]
        (the inverse of from_codes)."""
        q = np.zeros((n_out, n_in), dtype=np.uint8)
        shift = self.B
        s = m = None
        for p, plane in enumerate(planes):
            codes, sc = self._split_plane(plane, p, n_out, n_in)
            b = self.plane_bits[p]
            shift -= b
            q |= _unpack(codes, b, n_in, n_out, n_in) << np.uint8(shift)
            if sc is not None:
                s, m = sc[0], sc[1]
        return q, s, m

    def from_codes(self, q: np.ndarray, s: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
        """Planes for given B-bit codes q [n_out, n_in] and per-group fp16 s, m [n_out, G]: the
        full width reconstructs s*q + m. Used directly for Q4_0/Q4_1 sources, whose own codes and
        block scales then come back exactly at 4 bits."""
        scales = self._stored_scales(s, m)
        planes = []
        cum = 0
        for p, b in enumerate(self.plane_bits):
            cum += b
            codes = ((q >> (self.B - cum)) & ((1 << b) - 1)).astype(np.uint8)
            planes.append(self._build_plane(p, codes, scales if p == 0 else []))
        return planes

    def _stored_scales(self, s: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
        """What plane 0 stores of the per-group scale and offset."""
        return [s, m]

    def reconstruct(self, parts: dict, k: int) -> np.ndarray:
        """The scheme definition: W^_r = s * (S(q, r) + (d-1)/2) + m with the slice
        S(q, r) = (q >> (B - r)) << (B - r), r = width of k planes (float64)."""
        r = self.widths[k - 1]
        rep = lambda v: np.repeat(v.astype(np.float64), self.group, axis=1)  # noqa: E731
        return rep(parts["s"]) * self._grid(parts["q"].astype(np.float64), r) + rep(parts["m"])

    def _coefs(self, scales: list, k: int):
        s = scales[0][0].astype(np.float32)
        m = scales[0][1].astype(np.float32)
        A = [s * np.float32(mu) for mu in self._mult(k)]
        C = m + s * np.float32(self._offset(k))
        return A, C


class MatQuantSym(MatQuant):
    """MatQuant whose offset is always -2^(B-1) times the scale (w = s * (q - 2^(B-1))), so only
    s is stored: what a Q4_0 (or Q8_0 at 8 bits) source is, exactly. Its planes are smaller: at
    group 32, 0.5 bit per weight less (the 2-bit width reads 2.5 bits per weight, not 3)."""

    name = "matquant-sym"

    def _layout(self) -> None:
        super()._layout()
        self.plane_nscales[0] = 1

    def _kind(self) -> int:
        return 2

    def _msym(self) -> float:
        return -float(1 << (self.B - 1))

    def _split_plane(self, plane: np.ndarray, p: int, n_out: int, n_in: int):
        codes, sc = super()._split_plane(plane, p, n_out, n_in)
        if sc is None:
            return codes, None
        s = sc[0]
        return codes, np.stack([s, (s.astype(np.float32) * np.float32(self._msym())).astype(np.float16)])

    def encode_parts(self, w: np.ndarray, act_scale: np.ndarray | None = None) -> dict:
        """Per group, the scale s (offset -2^(B-1) s) among shrinking fractions of the range that
        minimizes the error summed in log over every width (as MatQuant's fit, with m tied to s)."""
        w = np.asarray(w, dtype=np.float32)
        n_out, n_in = w.shape
        self._check_shape(n_out, n_in)
        half = float(1 << (self.B - 1))
        W = w.astype(np.float64).reshape(n_out, n_in // self.group, self.group)
        a = _weights(act_scale, n_in, self.group)[None]
        ref = (a * W * W).sum(-1, keepdims=True)
        top = np.maximum(-W.min(-1, keepdims=True) / half, W.max(-1, keepdims=True) / (half - 1))
        best_obj = np.full(top.shape, np.inf)
        best_s = np.zeros(top.shape)
        for ratio in np.linspace(1.0, 0.5, self.n_grid):
            s = _f16(top * ratio)
            safe = np.where(s != 0, s, 1.0)
            q = np.clip(np.round(W / safe) + half, 0, 2 * half - 1)
            errs = [(a * (W - s * (self._grid(q, r) - half)) ** 2).sum(-1, keepdims=True) for r in self.widths]
            obj = _log_objective(errs, ref)
            better = obj < best_obj
            best_obj = np.where(better, obj, best_obj)
            best_s = np.where(better, s, best_s)
        s = best_s
        safe = np.where(s != 0, s, 1.0)
        q = np.clip(np.round(W / safe) + half, 0, 2 * half - 1).reshape(n_out, n_in).astype(np.int64)
        s = s[..., 0]
        m = s * -half
        return {"planes": self.from_codes(q, s, m), "q": q, "s": s, "m": m}

    def _stored_scales(self, s: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
        s16 = np.asarray(s, dtype=np.float16)
        if not np.array_equal(np.asarray(m, np.float32), s16.astype(np.float32) * np.float32(self._msym())):
            raise ValueError(f"{self.name}: offsets are not -2^(B-1) times the scales")
        return [s16]


SCHEMES: dict[str, type[Scheme]] = {"d2moe": D2MoE, "matquant": MatQuant, "matquant-sym": MatQuantSym}


# ---- numpy paths ------------------------------------------------------------------------------

def _dequant_rows(sch: Scheme, planes: list, n_out: int, n_in: int, r0: int, r1: int) -> np.ndarray:
    k = len(planes)
    gs = sch.group
    split = [sch._split_plane(planes[p], p, n_out, n_in) for p in range(k)]
    scales = [None if sc is None else sc[:, r0:r1] for _, sc in split]
    A, C = sch._coefs(scales, k)
    out = np.repeat(C, gs, axis=1).astype(np.float32)
    for p in range(k):
        b = sch.plane_bits[p]
        rb = n_in * b // 8
        codes = _unpack(split[p][0][r0 * rb:r1 * rb], b, n_in, r1 - r0, n_in)
        out += np.repeat(A[p], gs, axis=1) * codes.astype(np.float32)
    return out


def _matmul_numpy(sch: Scheme, planes: list, n_out: int, n_in: int, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], n_out), np.float32)
    step = max(1, _TILE_BYTES // (4 * n_in))
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        y[:, r0:r1] = x @ _dequant_rows(sch, planes, n_out, n_in, r0, r1).T
    return y


# ---- numba kernel -----------------------------------------------------------------------------------

_P2 = np.array([2.0 ** (e - 25) for e in range(32)])  # fp16 exponent -> scale of (1024 + f)

if HAVE_NUMBA:
    @numba.njit(cache=True, inline="always")
    def _h2f(p, off):
        """fp16 (little-endian bytes p[off], p[off+1]) -> float32, exactly."""
        h = np.int64(p[off]) | (np.int64(p[off + 1]) << 8)
        e = (h >> 10) & 0x1F
        f = h & 0x3FF
        if e == 0:
            v = f * 5.960464477539063e-08  # 2^-24
        elif e == 31:
            v = np.inf if f == 0 else np.nan
        else:
            v = (1024 + f) * _P2[e]  # table, not pow(): this runs once per group and plane
        if h & 0x8000:
            v = -v
        return np.float32(v)

    _U = np.uint64

    @numba.njit(parallel=True, cache=True)
    def _nested_matmul(planes, nbits, nscales, kind, mult, offset, n_out, n_in, group, x, xs, msym):
        """y[t, o] = sum_g C[o,g] xs[t,g] + sum_i x[t,i] * (sum_p A[p,o,g] code_p[o,i]).

        Per output row: decode each plane's row into a uint8 code row (long contiguous loops;
        matquant ORs its planes into one B-bit code row), then per group multiply-add
        x * (A * code) into `group` lanes per t. fastmath stays off: no float sum is reassociated
        (the lanes are independent accumulators, summed pairwise once per row), and indices are
        unsigned so the loops carry no negative-index wraparound code; LLVM vectorizes them.
        T > 1: a group's weights are built once into a `group`-float scratch, then used T times.
        No float copy of the matrix is made (scratch: P code rows + one group of floats)."""
        T = x.shape[0]
        G = n_in // group
        P = len(planes)
        PC = P if kind == 0 else 1  # code rows kept
        y = np.empty((T, n_out), np.float32)
        # T == 1 and every plane's row slots hold whole groups: decode inside the multiply-add
        fused = T == 1
        for p in range(P):
            if (n_in * nbits[p] // 8) % group:
                fused = False
        for o in numba.prange(n_out):
            codes = np.empty((0 if fused else PC, n_in), np.uint8)
            lane = np.zeros((T, group), np.float32)
            cf = np.empty(group, np.float32)
            Ag = np.empty((P, G), np.float32)
            cacc = np.zeros(T, np.float32)
            # ---- decode the row's codes
            for p in range(0 if fused else P):
                pl = planes[p]
                b = nbits[p]
                nr = n_in * b // 8
                st = _U(o * nr)
                mask = (1 << b) - 1
                if kind == 0:
                    dst = codes[p]
                    for j in range(8 // b):
                        sh = j * b
                        d0 = _U(j * nr)
                        for k in range(nr):
                            dst[d0 + _U(k)] = np.uint8((pl[st + _U(k)] >> sh) & mask)
                else:
                    dst = codes[0]
                    up = int(round(np.log2(mult[p])))
                    for j in range(8 // b):
                        sh = j * b
                        d0 = _U(j * nr)
                        if p == 0:
                            for k in range(nr):
                                dst[d0 + _U(k)] = np.uint8(((pl[st + _U(k)] >> sh) & mask) << up)
                        else:
                            for k in range(nr):
                                dst[d0 + _U(k)] |= np.uint8(((pl[st + _U(k)] >> sh) & mask) << up)
            # ---- per-group coefficients from the fp16 scales
            p0 = planes[0]
            soff = n_out * n_in * nbits[0] // 8
            for g in range(G):
                gi = o * G + g
                s0 = _h2f(p0, soff + 2 * gi)
                if kind == 2:  # symmetric matquant: the offset is msym * s, not stored
                    m0 = np.float32(msym) * s0
                else:
                    m0 = _h2f(p0, soff + 2 * (n_out * G) + 2 * gi)
                if kind == 0:  # d2moe: W = (m0 - sum s_p) + s0*Q0 + sum 2 s_p B_p
                    C = m0
                    Ag[0, g] = s0
                    for p in range(1, P):
                        sp = _h2f(planes[p], n_out * n_in * nbits[p] // 8 + 2 * gi)
                        Ag[p, g] = sp + sp
                        C = C - sp
                else:  # matquant: W = (m + s (d-1)/2) + s * code, code = sum_p code_p 2^up_p
                    C = m0 + s0 * np.float32(offset)
                    Ag[0, g] = s0
                    if fused:
                        for p in range(P):
                            Ag[p, g] = s0 * np.float32(mult[p])
                for t in range(T):
                    cacc[t] += C * xs[t, g]
            # ---- multiply-add (1-D row views hoisted out of the loops: they vectorize)
            if fused:
                ln = lane[0]
                xr = x[0]
                for p in range(P):
                    pl = planes[p]
                    b = nbits[p]
                    nr = n_in * b // 8
                    st = o * nr
                    mask = (1 << b) - 1
                    for j in range(8 // b):
                        sh = j * b
                        for gg in range(nr // group):
                            col0 = j * nr + gg * group
                            a = Ag[p, col0 // group]
                            b0 = _U(st + gg * group)
                            c0 = _U(col0)
                            for k in range(group):
                                i = _U(k)
                                ln[i] += xr[c0 + i] * (a * np.float32((pl[b0 + i] >> sh) & mask))
            elif T == 1:
                ln = lane[0]
                xr = x[0]
                for g in range(G):
                    c0 = _U(g * group)
                    for p in range(PC):
                        a = Ag[p, g]
                        cr = codes[p]
                        for k in range(group):
                            i = _U(k)
                            ln[i] += xr[c0 + i] * (a * np.float32(cr[c0 + i]))
            else:
                for g in range(G):
                    c0 = _U(g * group)
                    a = Ag[0, g]
                    cr = codes[0]
                    for k in range(group):
                        cf[k] = a * np.float32(cr[c0 + _U(k)])
                    for p in range(1, PC):
                        a = Ag[p, g]
                        cr = codes[p]
                        for k in range(group):
                            cf[k] += a * np.float32(cr[c0 + _U(k)])
                    for t in range(T):
                        ln = lane[t]
                        xr = x[t]
                        for k in range(group):
                            i = _U(k)
                            ln[i] += xr[c0 + i] * cf[i]
            for t in range(T):
                h = group
                while h % 2 == 0 and h > 1:  # pairwise halving while it divides evenly
                    h //= 2
                    for k in range(h):
                        lane[t, _U(k)] += lane[t, _U(k) + _U(h)]
                acc = np.float32(0.0)
                for k in range(h):
                    acc += lane[t, k]
                y[t, o] = acc + cacc[t]
        return y

    @numba.njit(parallel=True, cache=True)
    def _d2_chain_errs(W, a, s0, m0, alpha, qmax, nplanes, readable):
        n_out, G, gs = W.shape
        nw = 0
        for p in range(nplanes):
            if readable[p]:
                nw += 1
        out = np.empty((n_out, G, nw))
        for o in numba.prange(n_out):
            R = np.empty(gs)
            for g in range(G):
                s = s0[o, g]
                m = m0[o, g]
                safe = s if s != 0 else 1.0
                sa = 0.0
                for i in range(gs):
                    sa += a[g, i]
                for i in range(gs):
                    q = min(max(np.round((W[o, g, i] - m) / safe), 0.0), qmax)
                    R[i] = W[o, g, i] - np.float64(np.float32(s * q + m))
                wi = 0
                al = alpha[o, g]
                for p in range(nplanes):
                    if p:
                        sl = 0.0
                        mx = 0.0
                        for i in range(gs):
                            v = abs(R[i])
                            sl += a[g, i] * v
                            mx = max(mx, v)
                        sp = al * (sl / sa) + (1.0 - al) * 0.5 * mx
                        for i in range(gs):
                            R[i] = R[i] - sp if R[i] >= 0 else R[i] + sp
                    if readable[p]:
                        e = 0.0
                        for i in range(gs):
                            e += a[g, i] * R[i] * R[i]
                        out[o, g, wi] = e
                        wi += 1
        return out
