"""Token sampling in llama.cpp's order: penalties -> top-k -> top-p -> min-p -> temperature -> draw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgeMoEError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise EdgeMoEError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeMoEError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise EdgeMoEError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise EdgeMoEError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise EdgeMoEError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise EdgeMoEError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        z = np.array(logits, dtype=np.float64)  # [V]
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and history:
            seen = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
            vals = z[seen]
            z[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0.0:
            return int(np.argmax(z))
        idx = np.argsort(-z, kind="stable")  # candidates, best first
        if p.top_k > 0:
            idx = idx[: p.top_k]
        cand = z[idx]
        probs = _softmax(cand)
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, cand, probs = idx[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep_mask = probs >= p.min_p * probs[0]
            idx, cand = idx[keep_mask], cand[keep_mask]
        probs = _softmax(cand / p.temperature)
        return int(idx[self.rng.choice(len(idx), p=probs)])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


class StopFilter:
    """Generated text cut at the first stop string; text that may be the start of one is held
    back until the next piece shows whether it is."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be emitted now, whether a stop string was hit)."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.pending) - hold
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
