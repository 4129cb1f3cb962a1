"""Routing-trace statistics for `edgemoe profile -m`: expert popularity, token-to-token reuse, and a
fast (numba) re-implementation of the expert cache's policies and Belady giving hit rates against
cache size."""

from __future__ import annotations

import math

import numpy as np

from ..runtime.cache import SCORE_DECAY


def popularity(trace: np.ndarray, n_expert: int) -> dict:
    """Per MoE layer: pick counts, share of picks of the most popular 1/8 of experts, entropy."""
    T, L, K = trace.shape
    layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    counts = np.zeros((L, n_expert), dtype=np.int64)
    top, ent = {}, {}
    n_top = max(1, n_expert // 8)
    for l in layers:
        c = np.bincount(trace[:, l][trace[:, l] >= 0].ravel(), minlength=n_expert)
        counts[l] = c
        p = c / c.sum()
        top[l] = float(np.sort(c)[::-1][:n_top].sum() / c.sum())
        nz = p[p > 0]
        ent[l] = float(-(nz * np.log2(nz)).sum())
    return dict(
        layers=layers,
        counts=counts,
        top_eighth_share=top,
        entropy_bits=ent,
        max_entropy_bits=math.log2(n_expert),
        uniform_top_share=n_top / n_expert,
    )


def reuse(trace: np.ndarray, n_expert: int, windows=(1, 2, 4, 8)) -> dict:
    """Segment-cache hit rate: the fraction of a token's chosen experts (per layer) that some of the
    previous w tokens already chose in that layer, averaged over tokens t >= w and MoE layers."""
    T, L, K = trace.shape
    layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    out = {}
    for w in windows:
        vals = []
        for l in layers:
            sets = [{int(e) for e in trace[t, l] if e >= 0} for t in range(T)]
            for t in range(w, T):
                if not sets[t]:
                    continue
                prev = set().union(*sets[t - w : t])
                vals.append(len(sets[t] & prev) / len(sets[t]))
        out[w] = dict(measured=float(np.mean(vals)) if vals else 0.0, uniform=1 - (1 - K / n_expert) ** w)
    return out


def trace_requests(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, layer, expert) arrays in edgemoe.devices.replay.requests' order: token by token, layer by layer,
    each layer's distinct experts ascending; -1 (dense layers) left out."""
    T, L, K = trace.shape
    tok, lay, exp = [], [], []
    for t in range(T):
        for l in range(L):
            for e in sorted({int(x) for x in trace[t, l]}):
                if e >= 0:
                    tok.append(t)
                    lay.append(l)
                    exp.append(e)
    return np.asarray(tok, np.int64), np.asarray(lay, np.int64), np.asarray(exp, np.int64)


_POLICY_ID = {"lru": 0, "lfu": 1, "score": 2}


def _simulate_py(tok, lay, exp, n_layer, n_expert, slots, policy, T, decay=SCORE_DECAY):
    """Misses per token of edgemoe.runtime.cache.ExpertCache (one plane per expert, as in edgemoe.devices.replay):
    the same eviction order (the policy key, ties to the entry inserted first) and the same score
    (use frequency decayed at every visit of the expert's layer; a visit begins at each new
    (token, layer)). Compiled with numba where available (the cache itself scans every entry per
    eviction in Python, which takes minutes on a 256-token trace of a real model)."""
    key_of = np.full(n_layer * n_expert, -1, np.int64)
    heat = np.zeros(n_layer * n_expert, np.float64)
    heat_at = np.full(n_layer * n_expert, -1, np.int64)
    visits = np.zeros(n_layer, np.int64)
    keys = np.zeros(slots, np.int64)
    last = np.zeros(slots, np.int64)
    uses = np.zeros(slots, np.int64)
    seq = np.zeros(slots, np.int64)
    misses = np.zeros(T, np.int64)
    used = 0
    clock = 0
    seqc = 0
    for i in range(tok.shape[0]):
        l = lay[i]
        if i == 0 or tok[i] != tok[i - 1] or l != lay[i - 1]:
            visits[l] += 1
        k = l * n_expert + exp[i]
        clock += 1
        if heat_at[k] != visits[l]:
            at = max(heat_at[k], 0)
            heat[k] = heat[k] * decay ** (visits[l] - at) + (1 - decay)
            heat_at[k] = visits[l]
        j = key_of[k]
        if j >= 0:
            last[j] = clock
            uses[j] += 1
            continue
        misses[tok[i]] += 1
        while used + 1 > slots:
            best = -1
            bkey = 0.0
            bseq = 0
            for j in range(used):
                if policy == 0:
                    key = float(last[j])
                elif policy == 1:
                    key = uses[j] + last[j] / (clock + 1)
                else:
                    kj = keys[j]
                    lj = kj // n_expert
                    key = heat[kj] * decay ** (visits[lj] - max(heat_at[kj], 0)) + 1e-9 * last[j] / (clock + 1)
                if best < 0 or key < bkey or (key == bkey and seq[j] < bseq):
                    best, bkey, bseq = j, key, seq[j]
            key_of[keys[best]] = -1
            used -= 1
            if best != used:
                keys[best] = keys[used]
                last[best] = last[used]
                uses[best] = uses[used]
                seq[best] = seq[used]
                key_of[keys[best]] = best
        j = used
        used += 1
        keys[j] = k
        last[j] = clock
        uses[j] = 0
        seq[j] = seqc
        seqc += 1
        key_of[k] = j
    return misses


def _belady_py(tok, lay, exp, n_expert, slots, T):
    """Misses per token of edgemoe.devices.replay.replay_belady (evict the farthest next use; ties to the
    entry inserted first)."""
    n = tok.shape[0]
    keyv = lay * n_expert + exp
    next_use = np.full(n, n, np.int64)
    last_seen = np.full(int(keyv.max()) + 1 if n else 1, n, np.int64)
    for i in range(n - 1, -1, -1):
        next_use[i] = last_seen[keyv[i]]
        last_seen[keyv[i]] = i
    key_of = np.full(last_seen.shape[0], -1, np.int64)
    keys = np.zeros(slots, np.int64)
    nxt = np.zeros(slots, np.int64)
    seq = np.zeros(slots, np.int64)
    misses = np.zeros(T, np.int64)
    used = 0
    seqc = 0
    for i in range(n):
        k = keyv[i]
        j = key_of[k]
        if j >= 0:
            nxt[j] = next_use[i]
            continue
        misses[tok[i]] += 1
        if used >= slots:
            best = 0
            for j in range(1, used):
                if nxt[j] > nxt[best] or (nxt[j] == nxt[best] and seq[j] < seq[best]):
                    best = j
            key_of[keys[best]] = -1
            used -= 1
            if best != used:
                keys[best] = keys[used]
                nxt[best] = nxt[used]
                seq[best] = seq[used]
                key_of[keys[best]] = best
        j = used
        used += 1
        keys[j] = k
        nxt[j] = next_use[i]
        seq[j] = seqc
        seqc += 1
        key_of[k] = j
    return misses


try:
    import numba as _numba

    _simulate = _numba.njit(cache=True)(_simulate_py)
    _belady = _numba.njit(cache=True)(_belady_py)
except ImportError:  # pragma: no cover - numba is a dependency; the Python path is slow but right
    _simulate, _belady = _simulate_py, _belady_py


def simulate(
    reqs, n_layer: int, n_expert: int, slots: int, policy: str, T: int, decay: float = SCORE_DECAY
) -> np.ndarray:
    """Misses per token for a policy ("lru", "lfu", "score" with this decay) or "belady" at a cache
    of `slots` experts."""
    tok, lay, exp = reqs
    if policy == "belady":
        return _belady(tok, lay, exp, n_expert, int(slots), T)
    return _simulate(tok, lay, exp, n_layer, n_expert, int(slots), _POLICY_ID[policy], T, float(decay))


def hit_rates(trace: np.ndarray, n_expert: int, slot_counts) -> list[dict]:
    """Per cache size (expert slots): misses of each policy and Belady over the whole trace (cold
    start included) and over its second half after the first half warmed the cache ("warm")."""
    from ..runtime.cache import POLICIES

    T, L, K = trace.shape
    reqs = trace_requests(trace)
    half = T // 2
    tok = reqs[0]
    rows = []
    for s in slot_counts:
        row = dict(
            slots=int(s), requests=int(tok.shape[0]), warm_tokens=T - half, warm_requests=int((tok >= half).sum())
        )
        for p in (*POLICIES, "belady"):
            m = simulate(reqs, L, n_expert, int(s), p, T)
            row[p] = int(m.sum())
            row[p + "_warm"] = int(m[half:].sum())
        rows.append(row)
    return rows
