from __future__ import annotations

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.runtime.sampling import Sampler, SamplingParams


def draw(params: SamplingParams, logits, n=2000, history=()):
    s = Sampler(params)
    return np.array([s(np.asarray(logits, dtype=np.float32), list(history)) for _ in range(n)])


def test_greedy_is_argmax():
    assert set(draw(SamplingParams(temperature=0), [0.1, 3.0, 2.9], n=10)) == {1}


def test_top_k_limits_candidates():
    got = draw(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0), [3, 2.9, 2.8, 2.7])
    assert set(got) == {0, 1}


def test_top_p_keeps_the_nucleus():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    got = draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=0), logits)
    assert set(got) == {0, 1}


def test_min_p_drops_the_tail():
    logits = np.log([0.6, 0.3, 0.05, 0.05])
    got = draw(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0), logits)
    assert set(got) == {0, 1}


def test_temperature_sharpens():
    logits = [1.0, 0.0]
    hot = (draw(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), logits) == 0).mean()
    cold = (draw(SamplingParams(temperature=0.3, top_k=0, top_p=1.0, min_p=0.0, seed=1), logits) == 0).mean()
    assert cold > hot + 0.2


def test_repeat_penalty_discourages_seen_tokens():
    p = SamplingParams(temperature=0, repeat_penalty=2.0)
    assert draw(p, [2.0, 1.5], n=1, history=[0])[0] == 1
    assert draw(SamplingParams(temperature=0), [2.0, 1.5], n=1, history=[0])[0] == 0


def test_seed_reproducible():
    p = SamplingParams(temperature=1.0, seed=42)
    logits = np.random.default_rng(0).normal(size=100)
    assert (draw(p, logits, n=50) == draw(p, logits, n=50)).all()


@pytest.mark.parametrize(
    "kw", [dict(temperature=-0.1), dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-1), dict(repeat_penalty=0)]
)
def test_bad_params(kw):
    with pytest.raises(EdgeMoEError):
        SamplingParams(**kw)
