"""Device emulation and the side-by-side bench, as a user runs them (root, cgroup v1)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

from edgemoe.devices import cgroup

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (cgroup.CGROOT / "memory").is_dir(),
    reason="device emulation needs root and the cgroup v1 memory controller",
)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], capture_output=True, text=True, timeout=timeout)


def test_emulate_caps_memory_and_restores_readahead(tmp_path):
    _, disk = cgroup.block_device_of(tmp_path)
    ra = Path(f"/sys/block/{disk}/queue/read_ahead_kb")
    before = ra.read_text()
    probe = (
        "import re; cg = open('/proc/self/cgroup').read(); path = re.search(r':memory:(.*)', cg).group(1); "
        "print(open('/sys/fs/cgroup/memory' + path + '/memory.limit_in_bytes').read().strip(), "
        f"open('{ra}').read().strip())"
    )
    p = cli(
        "emulate",
        "--profile",
        "emmc-sbc-4gb",
        "--memory",
        "256MiB",
        "--storage",
        str(tmp_path),
        "--",
        sys.executable,
        "-c",
        probe,
    )
    assert p.returncode == 0, p.stderr
    limit, inside_ra = p.stdout.split()
    assert int(limit) == 256 * 2**20 and inside_ra == "128"
    assert ra.read_text() == before
    assert "emulating emmc-sbc-4gb" in p.stderr
    bad = cli("emulate", "--profile", "no-such-device", "--", "true")
    assert bad.returncode == 2 and "no such profile" in bad.stderr


def _bench_model(path: Path) -> Path:
    """An OLMoE-shaped Q4_0 GGUF whose experts (4 layers x 64 x 1.77 MB = 453 MB) dwarf what the
    runtime holds (~180 MiB), so a budget below the expert bytes still leaves an expert cache
    that must evict; written without the routing calibration (a few seconds)."""
    mod = load_tool("make_bench_model")
    shape = mod.BenchShape(
        n_layer=4, n_embd=1024, n_head=8, n_expert=64, n_expert_used=4, n_ff_exp=1024, vocab=1024, n_ctx_train=512
    )
    return mod.write_bench_model(shape, path, log=lambda *a, **k: None, calibrate=False)


def test_bench_at_a_binding_budget_prices_lossy_qualities(tmp_path):
    """edgemoe bench on a measured profile at a budget below the model's expert bytes: the expert
    cache holds a fraction of them and evicts, and peak RSS stays within budget + 5% for every
    quality run (a cache that ignored its capacity would be OOM-killed under the cap, or over the
    budget); a lossy preset comes with its decode-time price against max, and max with none."""
    prof = tmp_path / "here.yaml"
    p = cli("profile", "--storage", str(tmp_path), "--out", str(prof), "--size", "8MiB", "--no-kernels")
    assert p.returncode == 0, p.stderr
    model = _bench_model(tmp_path / "bench.gguf")
    out = tmp_path / "results"
    b = cli(
        "bench",
        str(model),
        "--profile",
        str(prof),
        "--budgets",
        "0.7",
        "--threads",
        "1",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--quality",
        "max",
        "--quality",
        "fast",
        "--out",
        str(out),
    )
    assert b.returncode == 0, b.stderr
    assert "edgemoe/llama.cpp decode" in b.stdout and "targets (pipeline issue)" in b.stdout
    data = json.loads(next(out.glob("*.json")).read_text())
    rows = {(r["engine"], r["quality"]): r for r in data["rows"]}
    assert set(rows) == {("llama.cpp", "gguf"), ("edgemoe", "max"), ("edgemoe", "fast")}
    failed = {k: r["failed"] for k, r in rows.items() if "failed" in r}
    assert not failed, f"runs failed (a cache that outgrows its budget is OOM-killed under the cap): {failed}"
    mb = data["model_bytes"]
    experts = mb["expert"] * mb["n_moe"] * mb["n_expert"]
    for q in ("max", "fast"):
        e = rows["edgemoe", q]
        budget = e["budget"]
        used = e["peak_rss"] - e["base_rss"]
        assert used <= 1.05 * budget, f"{q}: peak {used / 2**20:.0f} MiB over budget {budget / 2**20:.0f} MiB"
        assert e["peak_over_budget"] == pytest.approx(used / budget)
        # the budget binds: below the expert bytes, the cache a fraction of them, experts evicted
        assert budget < experts and e["cache_capacity"] < 0.5 * experts, (budget, e["cache_capacity"], experts)
        assert e["misses"] > 0 and e["evictions"] > 0
        # and the check has teeth: holding every expert instead of the cache's share would break it
        assert used - e["cache_capacity"] + experts > 1.05 * budget
    assert rows["llama.cpp", "gguf"]["s_mbu"] > 0 and rows["edgemoe", "max"]["tokens"]
    # the oracle and the prediction replay the routing of the very tokens the run processed
    for q in ("max", "fast"):
        e = rows["edgemoe", q]
        assert (
            e["belady_mb_per_token"] > 0 and e["predicted_tps"] > 0 and 0 < e["run_locality"]["consecutive_reuse"] <= 1
        )
    # every figure names its quality; lossy ones are priced against max, token by token
    cost = data["quality_cost"]
    assert data["qualities"] == ["max", "fast"] and cost["positions"] == 8 + 4
    assert cost["continuation"] == "llama.cpp greedy" and cost["greedy_positions"] == 4 + 1
    m, f = rows["edgemoe", "max"], rows["edgemoe", "fast"]
    assert m["lossless"] is True and f["lossless"] is False and rows["llama.cpp", "gguf"]["lossless"] is True
    assert m["kl_median"] == 0 and m["kl_p99"] == 0 and m["top1_vs_max"] == 1.0  # the budget changes nothing at max
    for key in ("kl_median", "kl_p99", "kl_mean", "kl_max"):
        assert math.isfinite(f[key]) and f[key] >= 0, (key, f[key])
    assert f["kl_median"] <= f["kl_p99"] <= f["kl_max"] and f["kl_positions"] == 12
    assert 0 <= f["top1_vs_max"] <= 1 and 0 <= f["greedy_vs_llamacpp"] <= 1 and 0 <= m["greedy_vs_llamacpp"] <= 1
    head = next(line for line in b.stdout.splitlines() if line.lstrip().startswith("budget"))
    assert all(c in head for c in ("quality", "lossless", "KL med", "KL p99", "top1", "=llama"))
    table = {tuple(line.split()[3:5]): line.split() for line in b.stdout.splitlines() if line.startswith("  70% ")}
    assert table["edgemoe", "max"][5] == "yes" and table["edgemoe", "fast"][5] == "no"
    assert table["edgemoe", "max"][-4:] == ["0", "0", "100%", f"{m['greedy_vs_llamacpp']:.0%}"]
    assert table["edgemoe", "fast"][-4:-2] == [f"{f['kl_median']:.1e}", f"{f['kl_p99']:.1e}"] or f["kl_median"] == 0
    assert "fast (lossy)" in b.stdout and "max (lossless)" in b.stdout
    if importlib.util.find_spec("matplotlib") is not None:  # the PNG has the same columns
        assert next(out.glob("*.png")).stat().st_size > 0
