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

The code: nested_planes.py holds the plane format (packing, the Scheme base class, the numpy matmul
path), nested_fit.py the least-squares fitting helpers and the reference baselines (rtn_quantize,
naive_msb_slices), nested_kernels.py the numba kernels; this module the schemes themselves.
"""

from __future__ import annotations

import numpy as np

from .nested_fit import _f16, _log_objective, _ls_affine, _ls_affine_multi, _weights
from .nested_kernels import HAVE_NUMBA
from .nested_planes import Scheme, _decompose, _unpack

if HAVE_NUMBA:
    from .nested_kernels import _d2_chain_errs

__all__ = ["Scheme", "D2MoE", "MatQuant", "MatQuantSym", "SCHEMES", "default_bits"]


def default_bits(source_bits: float) -> tuple[int, ...]:
    """Readable widths for a model whose experts ship with `source_bits` bits per weight."""
    return (2, 3, 4) if source_bits <= 5 else (2, 4, 8)


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
                    cs, cm, cerr = (np.where(better, s, cs), np.where(better, m, cm), np.where(better, err, cerr))
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
        planes = [self._build_plane(0, q0.reshape(n_out, n_in).astype(np.uint8), [s0[..., 0], m0[..., 0]])]
        for p in range(1, self.n_planes):
            planes.append(
                self._build_plane(p, (signs[p - 1] > 0).reshape(n_out, n_in).astype(np.uint8), [scales[p - 1]])
            )
        return {
            "planes": planes,
            "q0": q0.reshape(n_out, n_in),
            "s0": s0[..., 0],
            "m0": m0[..., 0],
            "signs": [b.reshape(n_out, n_in) for b in signs],
            "s": scales,
        }

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
        e = _d2_chain_errs(
            W,
            np.ascontiguousarray(a[0]),
            np.ascontiguousarray(s0[..., 0]),
            np.ascontiguousarray(m0[..., 0]),
            np.ascontiguousarray(al),
            (1 << self.widths[0]) - 1,
            self.n_planes,
            readable,
        )
        return [e[:, :, i : i + 1] for i in range(e.shape[2])]

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
        return np.floor(q / d) * d + (d - 1) / 2.0

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
