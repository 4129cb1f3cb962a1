"""The memory budget is a promise: peak RSS over a whole generation stays within budget + 5%.

Measured in a fresh process as VmHWM minus the RSS right after `import edgemoe` (not the cache's
own counter), on a store at least 10x that post-import RSS, at a budget under 50% of the
expert bytes, so experts must be evicted and re-read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

from edgemoe.store.convert import convert

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys
import edgemoe
base = edgemoe.BASELINE_RSS
m = edgemoe.load(sys.argv[1], memory_budget=int(sys.argv[2]), n_ctx=256, progress=False)
out = m.generate("The", max_tokens=48, temperature=0.8, seed=1, ignore_eos=True)
s = m.stats()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(base=base, hwm=hwm, misses=s.cache.misses, evictions=s.cache.evictions,
                      bytes_read=s.cache.bytes_read, cache_max=s.cache.cache_capacity, plan=str(m.memory_plan))))
"""


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    mb = load_tool("make_bench_model")
    d = tmp_path_factory.mktemp("big")
    shape = mb.BenchShape(
        n_layer=4, n_embd=1024, n_head=8, n_expert=96, n_expert_used=4, n_ff_exp=1024, vocab=1024, n_ctx_train=512
    )
    src = mb.write_bench_model(shape, d / "big.gguf", log=lambda *a, **k: None)
    st = convert(src, d / "big.edgemoe", progress=False, distinct_experts=4)
    src.unlink()
    return st


def test_peak_rss_stays_within_budget(big_store):
    man = json.loads((big_store / "manifest.json").read_text())
    per_expert = sum(sum(man["plane_bytes"][m]) for m in ("gate", "up", "down"))
    expert_bytes = per_expert * man["n_layer"] * man["n_expert"]
    budget = int(0.45 * expert_bytes)
    p = subprocess.run(
        [sys.executable, "-c", WORKER, str(big_store), str(budget)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    store_bytes = sum(f.stat().st_size for f in big_store.iterdir())
    assert store_bytes >= 10 * r["base"], "the model must dwarf the post-import RSS"
    used = r["hwm"] - r["base"]
    assert used <= 1.05 * budget, f"peak {used / 2**20:.0f} MiB over budget {budget / 2**20:.0f} MiB: {r}"
    assert r["misses"] > 0 and r["evictions"] > 0


KV_WORKER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")  # n_ctx beyond the training context
import edgemoe
base = edgemoe.BASELINE_RSS
m = edgemoe.load(sys.argv[1], memory_budget=int(sys.argv[2]), n_ctx=int(sys.argv[3]), progress=False)
lent_at_load = m._budget.lent
out = m.generate("The", max_tokens=40, temperature=0.8, seed=1, ignore_eos=True)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
p = m.memory_plan
print(json.dumps(dict(base=base, hwm=hwm, kv=p.kv, scratch=p.scratch, lent_at_load=lent_at_load,
                      lent=m._budget.lent, touched=m._kv.held_bytes(), capacity=m._experts.cache.capacity,
                      plan_capacity=p.cache_capacity, misses=m.stats().cache.misses)))
"""


def test_the_expert_cache_holds_what_the_kv_cache_does_not_use(big_store):
    """The KV cache and the attention scratch are reserved at n_ctx (128 + 32 MiB here at 8192
    positions), but a short chat writes a few pages of them: the expert cache holds the rest and
    gives it back before the context uses it, so under cache pressure peak RSS is 0.9-1.05x the
    budget even where those reservations are a quarter of it."""
    man = json.loads((big_store / "manifest.json").read_text())
    per_expert = sum(sum(man["plane_bytes"][m]) for m in ("gate", "up", "down"))
    budget = int(0.5 * per_expert * man["n_layer"] * man["n_expert"]) + (300 << 20)
    p = subprocess.run(
        [sys.executable, "-c", KV_WORKER, str(big_store), str(budget), "8192"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["kv"] >= budget // 5, r
    assert r["lent_at_load"] >= r["kv"], "an empty context holds no KV page and runs nothing"
    assert 0 < r["touched"] < r["kv"] // 2 and r["kv"] - r["touched"] < r["lent"] < r["lent_at_load"], r
    assert r["capacity"] == r["plan_capacity"] + r["lent"] and r["misses"] > 0, r
    used = r["hwm"] - r["base"]
    assert 0.9 * budget <= used <= 1.05 * budget, f"peak {used / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB: {r}"


ONNX_WORKER = r"""
import json, sys
import edgemoe
base = edgemoe.BASELINE_RSS
m = edgemoe.load(sys.argv[1], memory_budget=int(sys.argv[2]), n_ctx=256, progress=False, quality="max",
                 onnx_experts=dict(min_rows=2, min_batch=1))
out = m.generate("The", max_tokens=32, temperature=0.8, seed=1, ignore_eos=True)
c = m.stats().cache
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(base=base, hwm=hwm, sessions=c.onnx_sessions, onnx_bytes=c.onnx_bytes,
                      pool=m.memory_plan.onnx_pool, refused=m._experts.onnx.refused,
                      ort_rows=c.backend_rows["onnxruntime"], misses=c.misses)))
"""


ONNX_PROBE = r"""
import sys
import edgemoe
with edgemoe.load(sys.argv[1], n_ctx=256, progress=False, quality="max", preload=False,
                  onnx_experts=dict(min_rows=2, min_batch=1)) as m:
    p = m.memory_plan
    print(p.budget - p.cache_capacity - p.onnx_pool)
"""


@pytest.mark.filterwarnings("ignore:.*fewer than the top nested width")
def test_onnxruntime_sessions_stay_within_budget(tmp_path):
    """onnxruntime expert sessions hold their own copy of an expert's weights: they live in a pool
    carved out of the expert cache, so peak RSS still stays within budget + 5% (an 8-bit store:
    onnxruntime takes its batches; here every call, min_batch=1, so sessions come and go)."""
    pytest.importorskip("onnxruntime")
    mb = load_tool("make_bench_model")
    shape = mb.BenchShape(
        n_layer=4, n_embd=1024, n_head=8, n_expert=32, n_expert_used=4, n_ff_exp=512, vocab=1024, n_ctx_train=512
    )
    src = mb.write_bench_model(shape, tmp_path / "m.gguf", log=lambda *a, **k: None)
    st = convert(src, tmp_path / "m.edgemoe", bits=(2, 4, 8), progress=False, distinct_experts=4)
    man = json.loads((st / "manifest.json").read_text())
    per_expert = sum(sum(man["plane_bytes"][m]) for m in ("gate", "up", "down"))
    # what the process holds besides the expert cache (dense, KV, scratch, the runtime with
    # onnxruntime loaded), measured by a load of its own, plus 45% of the experts
    probe = subprocess.run([sys.executable, "-c", ONNX_PROBE, str(st)], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr
    budget = int(0.45 * per_expert * man["n_layer"] * man["n_expert"]) + int(probe.stdout.strip().splitlines()[-1])
    p = subprocess.run(
        [sys.executable, "-c", ONNX_WORKER, str(st), str(budget)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    used = r["hwm"] - r["base"]
    assert used <= 1.05 * budget, f"peak {used / 2**20:.0f} MiB over budget {budget / 2**20:.0f} MiB: {r}"
    assert r["sessions"] > 0 and r["ort_rows"] > 0 and r["misses"] > 0
    assert 0 < r["onnx_bytes"] <= r["pool"]
