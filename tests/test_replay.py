"""The trace replay tool: Belady is the lower bound, and the policies are compared fairly."""

from __future__ import annotations

import numpy as np

def _tool():
    from edgemoe import replay

    return replay


def test_belady_on_a_cyclic_trace():
    rt = _tool()
    # one layer, top-1, experts cycling 0,1,2: LRU with 2 slots misses every time; Belady does not
    trace = np.array([[[e]] for e in [0, 1, 2] * 10])
    reqs = rt.requests(trace)
    assert rt.replay_policy(reqs, 1, 100, 2, "lru") == 30
    assert rt.replay_belady(reqs, 2) < 20


def test_belady_is_a_lower_bound_and_figures_are_per_token():
    rt = _tool()
    rng = np.random.default_rng(0)
    trace = rng.integers(0, 16, size=(200, 3, 2))
    rows = rt.table(trace, expert_bytes=1000, n_expert=16, fractions=[0.25, 0.5])
    for r in rows:
        for p in ("lru", "lfu", "score"):
            assert r["belady"] <= r[p]
        assert r["lru"] <= 3 * 2 * 1000  # never more than every expert of every layer per token
    assert rows[1]["belady"] < rows[0]["belady"]
    loc = rt.locality(trace, 16)
    assert 0 < loc["consecutive_reuse"] < 0.5
