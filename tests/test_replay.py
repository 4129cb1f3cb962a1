"""The trace replay tool: Belady is the lower bound, and the policies are compared fairly."""

from __future__ import annotations

import numpy as np


def _tool():
    from edgemoe.devices import replay

    return replay


def test_belady_on_a_cyclic_trace():
    rt = _tool()
    # one layer, top-1, experts cycling 0,1,2: LRU with 2 slots misses every time; Belady does not
    trace = np.array([[[e]] for e in [0, 1, 2] * 10])
    reqs = rt.requests(trace)
    assert rt.replay_policy(reqs, 1, 100, 2, "lru") == 30
    assert rt.replay_belady(reqs, 2) < 20


def _brute_force_misses(trace: np.ndarray, slots: int) -> tuple[int, int]:
    """(LRU misses, Belady misses) of a cache of `slots` whole experts on the trace, written from
    the definitions alone: requests token by token, layer by layer, each layer's distinct experts
    ascending (-1 skipped); LRU evicts the least recently requested; Belady the one whose next
    request is farthest away (never again = infinitely far; ties to the earliest inserted)."""
    reqs = [
        (l, int(e))
        for t in range(trace.shape[0])
        for l in range(trace.shape[1])
        for e in sorted(set(trace[t, l].tolist()))
        if e >= 0
    ]
    lru: list = []  # least recent first
    lru_misses = 0
    for key in reqs:
        if key in lru:
            lru.remove(key)
        else:
            lru_misses += 1
            if len(lru) == slots:
                lru.pop(0)
        lru.append(key)
    resident: list = []  # insertion order
    opt_misses = 0
    for i, key in enumerate(reqs):
        if key in resident:
            continue
        opt_misses += 1
        if len(resident) == slots:

            def next_use(k, i=i):
                return next((j for j in range(i + 1, len(reqs)) if reqs[j] == k), len(reqs))

            resident.remove(max(resident, key=next_use))  # max keeps the first of equals
        resident.append(key)
    return lru_misses, opt_misses


def test_belady_and_lru_figures_match_a_brute_force_reference():
    """Per token bytes = misses x expert bytes / tokens, with the misses of a reference written from
    the policies' definitions (not from the trace's own maximum)."""
    rt = _tool()
    rng = np.random.default_rng(0)
    trace = rng.integers(0, 16, size=(200, 3, 2))
    rows = rt.table(trace, expert_bytes=1000, n_expert=16, fractions=[0.25, 0.5])
    assert [r["slots"] for r in rows] == [12, 24]  # fraction x 3 layers x 16 experts
    for r in rows:
        lru, opt = _brute_force_misses(trace, r["slots"])
        assert r["lru"] == lru * 1000 / 200
        assert r["belady"] == opt * 1000 / 200
        for p in ("lru", "lfu", "score"):
            assert r["belady"] <= r[p]
    assert rows[1]["belady"] < rows[0]["belady"]
    loc = rt.locality(trace, 16)
    assert 0 < loc["consecutive_reuse"] < 0.5


def test_belady_warm_up_requests_are_not_counted():
    rt = _tool()
    trace = np.array([[[e]] for e in [0, 1, 0, 1, 0, 1]])
    reqs = rt.requests(trace)
    assert rt.replay_belady(reqs, 2) == 2  # the two cold misses
    assert rt.replay_belady(reqs, 2, count_from=2) == 0  # warmed by the first two tokens


def test_locality_counts_reuse_within_each_sequence_and_the_chance_baseline():
    rt = _tool()
    a = np.zeros((10, 2, 2), dtype=np.int64)
    a[..., 1] = 1  # every token of sequence a picks experts 0 and 1
    b = a + 2  # sequence b: experts 2 and 3
    loc = rt.locality([a, b], 8)
    assert loc["consecutive_reuse"] == 1.0 and loc["reuse_per_layer"] == [1.0, 1.0]  # no pair spans a and b
    assert loc["tokens"] == 20 and loc["busiest_vs_uniform"] == 2.0
    # independent uniform picks of as many tokens look a little skewed by chance, never below uniform
    assert 1 / 8 <= loc["sampled_uniform_share"] < loc["top_eighth_share"]


def test_replay_run_reads_fewer_bytes_at_lower_quality():
    from edgemoe.runtime.policy import PRESETS

    rt = _tool()
    rng = np.random.default_rng(1)
    T, L, K, E = 40, 3, 4, 16
    top = np.argsort(rng.random((T, L, E)), -1)[..., :K]
    w = rng.dirichlet(np.ones(K) * 0.5, size=(T, L)).astype(np.float32)
    planes = [1000, 500, 500]
    runs = {q: rt.replay_run(top, w, planes, 1, 20 * 2000, PRESETS[q], None, 8) for q in ("max", "fast")}
    assert runs["max"]["tokens"] == 32
    assert runs["fast"]["read_bytes"] < runs["max"]["read_bytes"]
    assert runs["fast"]["expert_bytes_used"] < runs["max"]["expert_bytes_used"]
    # at max every chosen expert is used whole
    assert runs["max"]["expert_bytes_used"] == 32 * L * K * 2000
