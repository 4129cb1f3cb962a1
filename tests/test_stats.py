"""The one stats tree: what a streamed model reports survives its JSON shape unchanged, and a
document with a renamed or missing field is an error that names the field (not a zero on screen)."""

import json

import pytest

import edgemoe
from edgemoe.runtime.stats import StatsFormatError, hit_rate, stats_from_dict, stats_to_dict


def test_stats_round_trip_through_json_and_a_missing_field_is_named(build_model):
    src = build_model("qwen3moe", ftype="Q4_0")
    with edgemoe.load(src, memory_budget="2GB", quality="max", progress=False) as m:
        m.generate("hello there", max_tokens=4)
        s = m.stats()
    assert s.cache is not None and s.cache.hits + s.cache.misses + s.cache.partial_hits > 0
    d = json.loads(json.dumps(stats_to_dict(s)))
    assert stats_from_dict(d) == s
    assert d["cache"]["hit_rate"] == s.cache.hit_rate

    del d["cache"]["layers"][1]["bytes_read"]
    with pytest.raises(StatsFormatError, match=r"cache\.layers\[1\]\.bytes_read"):
        stats_from_dict(d)


def test_hit_rate_is_none_before_any_lookup():
    assert hit_rate(0, 0, 0) is None
    assert hit_rate(3, 1, 0) == 0.75
