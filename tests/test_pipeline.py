"""The HEBF I/O pipeline, prefetch, dual routing and skipping."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import fixed_cache, random_ids

import edgemoe
from edgemoe.runtime import pipeline, policy
from edgemoe.store.convert import convert


def test_hebf_order():
    reqs = [
        pipeline.Request(0, 3, 3, hotness=1.0, queue=[0, 1, 2]),
        pipeline.Request(0, 7, 3, hotness=5.0, queue=[1, 2]),  # plane 0 already resident
        pipeline.Request(0, 1, 3, hotness=2.0, queue=[0, 1, 2]),
    ]
    assert pipeline.hebf_order(reqs) == [(7, 1), (7, 2), (1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)]


def test_hotness_from_routing():
    top = np.array([[0, 1], [1, 2], [1, 0]])
    w = np.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]], dtype=np.float32)
    wants = pipeline.wants_from_routing(top, w, lambda e: 3)
    assert wants == {0: (3, 2.0), 1: (3, 3.0), 2: (3, 1.0)}  # prefill: tokens that chose it
    one = pipeline.wants_from_routing(top[:1], w[:1], lambda e: 3)
    assert one == {0: (3, pytest.approx(0.6)), 1: (3, pytest.approx(0.4))}  # decode: gate weight


def test_skipping_rule_and_renormalisation():
    w = np.array([[0.5, 0.3, 0.15, 0.05], [0.85, 0.08, 0.04, 0.03]], dtype=np.float32)
    s = policy.mass_before(w)
    np.testing.assert_allclose(s[0], [0.0, 0.5, 0.8, 0.95], atol=1e-6)
    q = policy.Quality("t", high_mass=0.5, low_mass=0.9, naee_scale=0.0, prefer_resident=False)
    skip = policy.skip_mask(w, q, beta=None)
    assert skip.tolist() == [[False, False, False, True], [False, False, True, True]]
    naee = policy.Quality("n", 1.0, 1.0, naee_scale=1.0, prefer_resident=False)
    assert policy.skip_mask(w, naee, beta=0.2).tolist() == [[False, False, False, True], [False, True, True, True]]
    kept = policy.renormalise(w, skip)
    np.testing.assert_allclose(kept.sum(axis=1), w.sum(axis=1), rtol=1e-6)
    assert (kept[skip] == 0).all()
    np.testing.assert_allclose(kept[0, :3] / kept[0, 0], w[0, :3] / w[0, 0], rtol=1e-6)  # ratios kept
    with pytest.raises(edgemoe.EdgeMoEError):
        policy.parse_quality("1.5,0.5")
    assert policy.parse_quality("0.5,0.8,1").naee_scale == 1.0


@pytest.fixture(scope="module")
def store16(build_model, tmp_path_factory):
    src = build_model("qwen3moe", "F32", n_embd=128, n_ff_exp=128, n_expert=16, n_expert_used=4, n_layer=3)
    return convert(src, tmp_path_factory.mktemp("pl") / "p.edgemoe", progress=False)


def test_max_quality_pipeline_equals_plain_cache(store16):
    ids = random_ids(20, 256, seed=3)
    with edgemoe.load(store16, quality="max", kv_type="f32", pipeline=False) as m:
        plain = m.logits(ids)
        plain_tokens = [r.token for r in m.stream(ids[:6], max_tokens=8, temperature=0, ignore_eos=True)]
    with edgemoe.load(store16, quality="max", kv_type="f32", prefetch=True) as m:
        np.testing.assert_array_equal(m.logits(ids), plain)
        fixed_cache(m)
        m.set_budget(m.memory_plan.minimum_budget + m.memory_plan.min_cache)  # tight: evictions while piping
        np.testing.assert_array_equal(m.logits(ids), plain)
        assert [r.token for r in m.stream(ids[:6], max_tokens=8, temperature=0, ignore_eos=True)] == plain_tokens
        c = m.stats().cache
        assert c.evictions + c.downgrades > 0 and c.prefetch_issued > 0


@pytest.mark.filterwarnings("ignore:.*beyond the model's training context")  # 512 + warm-up > its 512
def test_a_prompt_reads_each_expert_once_per_layer(store16):
    """A prompt of up to N_SPAN tokens runs layer by layer: each expert its tokens chose is read
    once per layer, however small the cache (in batches of 64 tokens each batch read them again)."""
    ids = random_ids(512, 256, seed=5)  # N_SPAN
    with edgemoe.load(store16, kv_type="f32", n_ctx=576, preload=False) as m:
        m.set_budget(m.memory_plan.minimum_budget + m.memory_plan.min_cache)  # a cache of ~one layer's
        before = m.stats().cache  # the warm-up token's reads
        m.logits(ids)
        c = m.stats().cache
    reads = c.misses + c.partial_hits - before.misses - before.partial_hits
    assert 3 * 8 <= reads <= 3 * 16, reads  # 3 MoE layers of 16 experts
    assert c.evictions > 0  # the cache was too small to keep the layers' experts between batches


def test_compute_starts_before_the_last_read(store16):
    with edgemoe.load(store16, kv_type="f32", preload=False) as m:
        pl = m._experts.pipeline
        m._experts.cache.clear()
        pl.read_delay_s = 0.005  # a slow device: 5 ms per plane
        pl.log_reads = True
        starts = []
        orig = m._experts.ffn

        def timed(i, e, planes, x):
            starts.append((i, time.perf_counter()))
            return orig(i, e, planes, x)

        m._experts.ffn = timed
        m.logits(random_ids(8, 256, seed=1))
        first_layer = [t for i, t in starts if i == 0]
        last_read_layer0 = max(end for (l, e, p, s, end) in pl.read_log if l == 0)
        assert min(first_layer) < last_read_layer0


def test_prefetch_is_cancelled_when_wrong(store16):
    with edgemoe.load(store16, kv_type="f32", preload=False) as m:
        pl = m._experts.pipeline
        pl.read_delay_s = 0.2  # keep the prefetches queued, even on a busy machine
        with pl.cond:
            pl.prefetch(2, {0: (1, 1.0), 1: (1, 1.0), 2: (1, 1.0)})
        done = []
        pl.run_layer(2, {1: (1, 1.0)}, lambda e, planes: done.append(e))
        assert done == [1]
        assert pl.prefetch_hits >= 1 and pl.prefetch_cancelled >= 1
        assert not [r for r in pl.prefetches if r.layer == 2]


def test_cache_accounting_stays_within_capacity_while_the_pipeline_runs(store16):
    """Cache accounting, not the memory budget: the cache's byte counter (resident planes plus the
    reservations of reads in flight on the I/O threads) never passes its capacity, and once idle it
    is the sum of what the entries' buffers really hold. The process's RSS against the budget is
    tested in tests/test_budget_rss.py (VmHWM of a fresh process)."""
    with edgemoe.load(store16, kv_type="f32") as m:
        fixed_cache(m)
        m.set_budget(m.memory_plan.minimum_budget + m.memory_plan.min_cache // 2)
        cache = m._experts.cache
        worst = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                worst[0] = max(worst[0], cache.state().nbytes)
                time.sleep(0.0005)

        t = threading.Thread(target=watch)
        t.start()
        try:
            for k in range(3):
                m.logits(random_ids(24, 256, seed=k))
        finally:
            stop.set()
            t.join()
        assert 0 < worst[0] <= cache.capacity
        assert m.stats().cache.evictions > 0
        state = cache.state()
        held = [h.buffer_bytes for h in state.held.values()]
        assert [h.nbytes for h in state.held.values()] == held
        assert state.nbytes == sum(held)


def test_quality_presets_read_fewer_bytes(store16):
    ids = random_ids(32, 256, seed=2)
    read = {}
    for q in ("max", "balanced", "fast"):
        with edgemoe.load(store16, kv_type="f32", quality=q, prefetch=False, preload=False) as m:
            m.logits(ids)
            c = m.stats().cache
            read[q] = c.bytes_read
            if q == "fast":
                assert c.skipped > 0
            if q != "max":
                assert min(c.uses_by_bits) < max(c.uses_by_bits)
    assert read["fast"] < read["balanced"] < read["max"]
