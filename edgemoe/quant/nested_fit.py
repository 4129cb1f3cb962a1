"""Fitting helpers of the nested schemes (weighted least squares, fp16 rounding, the log objective
summed over widths) and the reference baselines the benchmarks compare them with."""

from __future__ import annotations

import numpy as np

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
            c = np.clip(np.round(q / d), 0, 2**r - 1) * d
        else:
            c = np.floor(q / d) * d + (d - 1) / 2
        out[r] = (s * c + m).reshape(n_out, n_in).astype(np.float32)
    return out
