"""Dual routing and expert skipping: how many bits each chosen expert is read at, and which
chosen experts are skipped, from their gate weights. Training-free.

For a token, rank its chosen experts by gate weight w_1 >= w_2 >= ... and let s_k be the share of
the gate mass held by the better-ranked ones (s_1 = 0). As in HOBBIT (arXiv 2411.01433):
  s_k <= high_mass            -> the expert at the top width (every plane)
  high_mass < s_k <= low_mass -> at the lowest width
  s_k > low_mass              -> skipped
and, as in NAEE (ACL'24), the k-th expert is skipped when w_k < beta_l * w_1, with beta_l per
layer calibrated on text (`edgemoe calibrate`: the median of w_k / w_1 there, times `naee_scale`).
Kept weights are renormalised to the token's original gate mass. An expert used by several
tokens (prefill) gets the width of its most important use. With `prefer_resident`, an expert
that is not a token's first choice and is resident at a usable width is used as it is rather than
upgraded (no stall for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..fileio import write_text_atomic

CALIBRATION = "calibration.json"


@dataclass(frozen=True)
class Quality:
    name: str
    high_mass: float
    low_mass: float
    naee_scale: float  # 0 = no NAEE skipping
    prefer_resident: bool

    @property
    def lossless(self) -> bool:
        """True when this quality computes what "max" computes: every plane of every chosen
        expert, nothing skipped, no resident narrower copy used in place of the full width."""
        return self.high_mass >= 1 and self.low_mass >= 1 and not self.naee_scale and not self.prefer_resident

    def describe(self) -> str:
        if self.name == "max":
            return "every plane of every chosen expert, no skipping"
        skip = f"skip beyond {self.low_mass:.0%} of the gate mass" if self.low_mass < 1 else "no mass skipping"
        naee = f", NAEE skip w_k < {self.naee_scale:g} x beta_l x w_1" if self.naee_scale else ""
        return (
            f"top width while the better-ranked experts hold <= {self.high_mass:.0%} of the gate mass, "
            f"lowest width beyond, {skip}{naee}{', resident planes preferred' if self.prefer_resident else ''}"
        )


PRESETS: dict[str, Quality] = {
    "max": Quality("max", 1.0, 1.0, 0.0, False),
    "balanced": Quality("balanced", 0.6, 1.0, 0.0, True),
    "fast": Quality("fast", 0.4, 0.9, 1.0, True),
}


# The default, for a GGUF in place and for experts streamed from a store alike: "max", lossless
# (every plane of every chosen expert, nothing skipped: the budget changes speed, never results).
# The lossy presets are opt-in; `edgemoe bench` prices each in decode-time KL divergence against
# "max" (edgemoe.runtime.evaluate.decode_loss).
DEFAULT = "max"


def quality_label(quality: str, lossless: bool) -> str:
    """How every figure names the quality it was measured at: "max (lossless)", "fast (lossy)"."""
    return f"{quality} ({'lossless' if lossless else 'lossy'})"


def parse_quality(q: str | None) -> Quality:
    """A preset name, or explicit thresholds 'high,low[,naee_scale]' such as '0.6,0.9,1'; None: DEFAULT."""
    if q is None:
        return PRESETS[DEFAULT]
    if q in PRESETS:
        return PRESETS[q]
    try:
        parts = [float(x) for x in q.split(",")]
    except (ValueError, AttributeError):
        parts = []
    if len(parts) in (2, 3) and all(0 <= x <= 1 for x in parts[:2]) and (len(parts) == 2 or parts[2] >= 0):
        return Quality(q, parts[0], parts[1], parts[2] if len(parts) == 3 else 0.0, True)
    raise EdgeMoEError(
        f"quality {q!r} is not one of {', '.join(PRESETS)} nor thresholds 'high,low[,naee]' with high and low in [0, 1]"
    )


def mass_before(w: np.ndarray) -> np.ndarray:
    """s [T, K]: share of the token's gate mass held by experts ranked better than each slot."""
    total = w.sum(axis=1, keepdims=True)
    order = np.argsort(-w, axis=1, kind="stable")
    ranked = np.take_along_axis(w, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked
    s = np.empty_like(w)
    np.put_along_axis(s, order, before / np.where(total > 0, total, 1), axis=1)
    return s


def skip_mask(w: np.ndarray, q: Quality, beta: float | None) -> np.ndarray:
    """[T, K] True where a chosen expert is skipped (never a token's first choice)."""
    skip = mass_before(w) > q.low_mass
    if q.naee_scale and beta is not None:
        w1 = w.max(axis=1, keepdims=True)
        skip |= w < q.naee_scale * beta * w1
    first = np.argmax(w, axis=1)
    skip[np.arange(len(w)), first] = False
    return skip


def plan_widths(
    top: np.ndarray, w: np.ndarray, skip: np.ndarray, q: Quality, n_planes: int, low_planes: int, resident
) -> dict[int, tuple[int, float]]:
    """{expert: (planes to use, hotness)} for the kept experts of one layer's tokens [T, K]: every
    plane when the expert's most important use has s <= high_mass, else the lowest width's planes;
    with prefer_resident, a non-first expert resident with at least the lowest width's planes is
    used as it is (resident(e) -> planes held). Hotness: the gate weight in decode, the number of
    tokens that chose the expert in prefill."""
    s = mass_before(w)
    wants = {}
    for e in np.unique(top[~skip]):
        use = (top == e) & ~skip
        smin = float(s[use].min())
        n = n_planes if smin <= q.high_mass else min(low_planes, n_planes)
        if q.prefer_resident and smin > 0 and n > low_planes:
            have = resident(int(e))
            if have >= low_planes:
                n = min(n, have)
        wants[int(e)] = (n, float(w[use].max()) if top.shape[0] == 1 else float(use.sum()))
    return wants


def renormalise(w: np.ndarray, skip: np.ndarray) -> np.ndarray:
    kept = np.where(skip, 0.0, w)
    scale = w.sum(axis=1, keepdims=True) / np.maximum(kept.sum(axis=1, keepdims=True), 1e-30)
    return (kept * scale).astype(np.float32)


@dataclass
class Calibration:
    betas: list[float | None]  # per layer; None for dense layers

    @classmethod
    def load(cls, store_root: Path, n_layer: int) -> Calibration | None:
        path = store_root / CALIBRATION
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            betas = raw["betas"]
            if not isinstance(betas, list) or len(betas) != n_layer:
                raise ValueError(f"betas must be a list of {n_layer}")
            return cls([None if b is None else float(b) for b in betas])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EdgeMoEError(f"{path}: bad calibration file ({exc}); run edgemoe calibrate again") from None

    def save(self, store_root: Path, meta: dict) -> Path:
        return write_text_atomic(store_root / CALIBRATION, json.dumps(dict(meta, betas=self.betas), indent=1))


def betas_from_ratios(ratios: list[list[float]]) -> list[float | None]:
    """NAEE's beta_l: the median over calibration tokens of w_k / w_1 for the non-first experts."""
    return [float(np.median(r)) if r else None for r in ratios]
