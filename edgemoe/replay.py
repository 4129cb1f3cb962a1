"""Routing-trace replay: bytes read per token by each cache policy, and by an offline Belady oracle.

A trace is what each layer's router chose per token, [tokens, layers, top_k] (Model.routing_trace;
-1 marks dense layers). Every expert is read whole, so the figures compare policies at a cache size
given in expert slots. Belady evicts the expert whose next use is farthest away: the optimum for
equal-sized items, the yardstick for the others.
"""

from __future__ import annotations

import numpy as np

from .cache import POLICIES, ExpertCache


class CountingReader:
    n_planes = 1

    def __init__(self, n_layer: int, expert_bytes: int):
        self.n_layer = n_layer
        self.expert_bytes = expert_bytes

    def plane_size(self, p: int) -> int:
        return self.expert_bytes

    def read_planes(self, layer, expert, first, bufs) -> None:
        pass


def requests(trace: np.ndarray) -> list[tuple[int, int, bool]]:
    """(layer, expert, first of its layer visit) in the order a decoder asks for them: token by
    token, layer by layer."""
    T, L, K = trace.shape
    out = []
    for t in range(T):
        for l in range(L):
            es = sorted(e for e in set(trace[t, l].tolist()) if e >= 0)
            out += [(l, int(e), j == 0) for j, e in enumerate(es)]
    return out


def replay_policy(reqs, n_layer: int, expert_bytes: int, slots: int, policy: str) -> int:
    from . import cache as cache_mod

    cache = ExpertCache(CountingReader(n_layer, expert_bytes), slots * expert_bytes, policy)
    cache_mod_alloc = cache_mod.alloc
    cache_mod.alloc = lambda n: np.empty(0, dtype=np.uint8)  # count only: no memory per entry
    try:
        for layer, e, first in reqs:
            if first:
                cache.visit(layer)
            cache.get(layer, e, 1)
    finally:
        cache_mod.alloc = cache_mod_alloc
    return sum(s.misses for s in cache.layers)


def replay_belady(reqs, slots: int) -> int:
    reqs = [(r[0], r[1]) for r in reqs]
    n = len(reqs)
    next_use = [n] * n
    last: dict = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(reqs[i], n)
        last[reqs[i]] = i
    resident: dict = {}  # key -> its next use
    misses = 0
    for i, key in enumerate(reqs):
        if key not in resident:
            misses += 1
            if len(resident) >= slots:
                victim = max(resident, key=resident.get)
                del resident[victim]
        resident[key] = next_use[i]
    return misses


def table(trace: np.ndarray, expert_bytes: int, n_expert: int, fractions) -> list[dict]:
    T, L, K = trace.shape
    reqs = requests(trace)
    rows = []
    for f in fractions:
        slots = max(K, int(round(f * L * n_expert)))
        row = dict(fraction=f, slots=slots)
        for p in POLICIES:
            row[p] = replay_policy(reqs, L, expert_bytes, slots, p) * expert_bytes / T
        row["belady"] = replay_belady(reqs, slots) * expert_bytes / T
        rows.append(row)
    return rows


def locality(trace: np.ndarray, n_expert: int) -> dict:
    """Popularity skew (share of picks of the top 1/8 of experts; entropy of the picks in bits, mean
    over MoE layers) and token-to-token reuse."""
    T, L, K = trace.shape
    top_share, entropy = [], []
    for l in range(L):
        if (trace[:, l] < 0).all():  # a dense layer
            continue
        counts = np.bincount(trace[:, l].ravel(), minlength=n_expert)
        top = np.sort(counts)[::-1][: max(1, n_expert // 8)]
        top_share.append(top.sum() / counts.sum())
        p = counts[counts > 0] / counts.sum()
        entropy.append(float(-(p * np.log2(p)).sum()))
    moe = [l for l in range(L) if not (trace[:, l] < 0).all()]
    reuse = [len(set(trace[t, l]) & set(trace[t - 1, l])) / K for t in range(1, T) for l in moe]
    return dict(top_eighth_share=float(np.mean(top_share)), uniform_share=1 / 8,
                entropy_bits=float(np.mean(entropy)), entropy_bits_first_layer=entropy[0] if entropy else 0.0,
                uniform_entropy_bits=float(np.log2(n_expert)),
                consecutive_reuse=float(np.mean(reuse)) if reuse else 0.0, uniform_reuse=K / n_expert)
