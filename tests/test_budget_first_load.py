"""The memory budget holds on the first load of a GGUF, the conversion into an expert store included.

The way a user meets it: a fresh process, a fresh store cache directory, `edgemoe.load(gguf,
memory_budget=B)` converting the file and then generating, with the model file at least 2.5x B
(tools/bench_first_load.py makes the measurement). Peak RSS (VmHWM) minus the RSS right after
`import edgemoe` must stay within B + 5%.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
    mb = load_tool("make_bench_model")
    shape = mb.BenchShape(
        n_layer=4, n_embd=1024, n_head=8, n_expert=112, n_expert_used=4, n_ff_exp=1024, vocab=1024, n_ctx_train=512
    )
    return mb.write_bench_model(shape, tmp_path_factory.mktemp("first") / "big.gguf", log=lambda *a, **k: None)


def test_first_load_converts_within_the_budget(big_gguf, tmp_path):
    bench = load_tool("bench_first_load")
    budget = int(big_gguf.stat().st_size / 2.5)
    r = bench.measure(big_gguf, budget, tmp_path / "cache")
    print("\n" + bench.report(r))
    assert Path(r["store"]).parent == tmp_path / "cache" / "stores", "the load must have converted the file"
    assert r["peak"] <= 1.05 * budget, bench.report(r)
    assert r["misses"] > 0
