"""Routing-trace replay: bytes read per token by each cache policy, and by an offline Belady oracle.

A trace is what each layer's router chose per token, [tokens, layers, top_k] (Model.routing_trace;
-1 marks dense layers). Every expert is read whole, so the figures compare policies at a cache size
given in expert slots. Belady evicts the expert whose next use is farthest away: the optimum for
equal-sized items, the yardstick for the others.
"""

from __future__ import annotations

import numpy as np

from ..runtime.cache import POLICIES, ExpertCache
from ..runtime.policy import Quality, plan_widths, renormalise, skip_mask

_NOTHING = np.zeros(0, dtype=np.uint8)  # a plane a replay does not hold


class PlaneCounter:
    """A store reader that reads nothing: it counts the bytes and the reads asked of it."""

    def __init__(self, n_layer: int, plane_sizes: list[int] | list[list[int]]):
        """plane_sizes: one expert's plane bytes, the same in every layer, or a list per layer."""
        per_layer = bool(plane_sizes) and isinstance(plane_sizes[0], list)
        self.n_layer = n_layer
        self.sizes = [list(x) for x in plane_sizes] if per_layer else [list(plane_sizes)] * n_layer
        self.n_planes = max(len(x) for x in self.sizes)
        self.bytes = 0
        self.reads = 0

    def plane_sizes(self, layer: int) -> list[int]:
        return self.sizes[layer]

    def read_new(self, layer, expert, first, n) -> list[np.ndarray]:
        self.reads += 1
        self.bytes += sum(self.sizes[layer][first : first + n])
        return [_NOTHING] * n


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
    cache = ExpertCache(PlaneCounter(n_layer, [expert_bytes]), slots * expert_bytes, policy)
    for layer, e, first in reqs:
        if first:
            cache.visit(layer)
        cache.get(layer, e, 1)
    return cache.state().misses


def replay_run(
    trace: np.ndarray,
    weights: np.ndarray,
    plane_sizes: list[int] | list[list[int]],
    low_planes: int,
    capacity: int,
    quality: Quality,
    betas: list | None,
    prompt: int,
    policy: str = "score",
    full_bytes: int | None = None,
) -> dict:
    """A run replayed through the expert cache as the engine runs it: the first `prompt` tokens as
    one prefill batch, then one token at a time. Each MoE layer's chosen experts (trace [T, L, K])
    and gate weights go through the quality's skipping and widths (policy.skip_mask, plan_widths)
    and the cache (its capacity and policy; the store's plane sizes, per layer where they differ;
    full_bytes: what a full-width expert is charged once transcoded,
    quant.transcode.transcoded_bytes). Counted over the decoded tokens: tokens, bytes read, reads,
    and the bytes of the experts used at their widths."""
    T, L, K = trace.shape
    counter = PlaneCounter(L, plane_sizes)
    cache = ExpertCache(counter, capacity, policy)
    n_planes = counter.n_planes
    used = 0
    steps = ([slice(0, prompt)] if prompt else []) + [slice(t, t + 1) for t in range(prompt, T)]
    for step in steps:
        if step.start == prompt:
            start = (counter.bytes, counter.reads)
        for layer in range(L):
            top, w = trace[step, layer], weights[step, layer].astype(np.float64)
            if (top < 0).all():
                continue
            beta = betas[layer] if betas else None
            skip = skip_mask(w, quality, beta) if quality.name != "max" else np.zeros(top.shape, dtype=bool)
            if skip.any():
                w = renormalise(w, skip)

            wants = plan_widths(
                top, w, skip, quality, n_planes, low_planes, lambda e, layer=layer: cache.resident(layer, e)
            )
            cache.visit(layer)
            for e in sorted(wants, key=lambda e: (-wants[e][1], e)):
                cache.get(layer, e, wants[e][0])
                if full_bytes:  # transcoded at full width, as StoreExperts._fast_form does
                    cache.fast_form(layer, e, lambda planes: ({}, full_bytes))
            if step.start >= prompt:
                used += sum(sum(counter.plane_sizes(layer)[:n]) for n, _ in wants.values())
    return dict(
        tokens=T - prompt, read_bytes=counter.bytes - start[0], reads=counter.reads - start[1], expert_bytes_used=used
    )


def replay_belady(reqs, slots: int, count_from: int = 0) -> int:
    """Misses of an offline Belady cache of `slots` experts on the requests, counted from request
    `count_from` on (the ones before only warm the cache)."""
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
            misses += i >= count_from
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


def locality(traces: np.ndarray | list[np.ndarray], n_expert: int) -> dict:
    """Popularity skew and token-to-token reuse of one routing trace (T, L, K) or of several
    sequences' traces (reuse is counted within each sequence).

    Per MoE layer: the share of the picks that go to the layer's most popular 1/8 of experts, the
    entropy of the picks in bits, the busiest expert's share over the uniform share, and the mean
    share of a token's experts that the previous token also chose; each averaged over the layers.
    `sampled_*` are what independent uniform top-K picks give for the same number of tokens (a short
    trace looks skewed by chance alone)."""
    traces = [traces] if isinstance(traces, np.ndarray) else list(traces)
    L, K = traces[0].shape[1:]
    moe = [l for l in range(L) if not all((t[:, l] < 0).all() for t in traces)]
    picks = np.concatenate([t.reshape(len(t), L, K) for t in traces])[:, moe]  # (N, M, K)

    def popularity(p: np.ndarray) -> tuple[float, float, float, float]:
        share, ent, busiest = [], [], []
        for l in range(p.shape[1]):
            c = np.bincount(p[:, l].ravel(), minlength=n_expert) / p[:, l].size
            share.append(np.sort(c)[::-1][: max(1, n_expert // 8)].sum())
            nz = c[c > 0]
            ent.append(-(nz * np.log2(nz)).sum())
            busiest.append(c.max() * n_expert)
        return float(np.mean(share)), float(np.mean(ent)), float(np.mean(busiest)), float(ent[0]) if ent else 0.0

    share, ent, busiest, ent0 = popularity(picks)
    rng = np.random.default_rng(0)
    uni = np.argsort(rng.random((len(picks), max(len(moe), 1), n_expert)), -1)[..., :K]
    u_share, u_ent, u_busiest, _ = popularity(uni)
    per_layer = []
    for l in moe:
        same = [(t[1:, l, :, None] == t[:-1, l, None, :]).any(-1).sum(-1) / K for t in traces if len(t) > 1]
        per_layer.append(float(np.concatenate(same).mean()) if same else 0.0)
    return dict(
        tokens=len(picks),
        top_eighth_share=share,
        uniform_share=1 / 8,
        sampled_uniform_share=u_share,
        entropy_bits=ent,
        entropy_bits_first_layer=ent0,
        uniform_entropy_bits=float(np.log2(n_expert)),
        sampled_uniform_entropy_bits=u_ent,
        busiest_vs_uniform=busiest,
        sampled_uniform_busiest=u_busiest,
        consecutive_reuse=float(np.mean(per_layer)) if per_layer else 0.0,
        reuse_per_layer=per_layer,
        uniform_reuse=K / n_expert,
    )
