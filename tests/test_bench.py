"""Device emulation and the side-by-side bench, as a user runs them (root, cgroup v1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe import cgroup

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
    probe = ("import re; cg = open('/proc/self/cgroup').read(); path = re.search(r':memory:(.*)', cg).group(1); "
             "print(open('/sys/fs/cgroup/memory' + path + '/memory.limit_in_bytes').read().strip(), "
             f"open('{ra}').read().strip())")
    p = cli("emulate", "--profile", "emmc-sbc-4gb", "--memory", "256MiB", "--storage", str(tmp_path),
            "--", sys.executable, "-c", probe)
    assert p.returncode == 0, p.stderr
    limit, inside_ra = p.stdout.split()
    assert int(limit) == 256 * 2**20 and inside_ra == "128"
    assert ra.read_text() == before
    assert "emulating emmc-sbc-4gb" in p.stderr
    bad = cli("emulate", "--profile", "no-such-device", "--", "true")
    assert bad.returncode == 2 and "no such profile" in bad.stderr


def test_bench_accepts_a_measured_profile(build_model, tmp_path):
    prof = tmp_path / "here.yaml"
    p = cli("profile", "--storage", str(tmp_path), "--out", str(prof), "--size", "8MiB", "--no-kernels")
    assert p.returncode == 0, p.stderr
    model = build_model("qwen3moe", "Q4_0", n_embd=256, n_ff_exp=256)
    out = tmp_path / "results"
    b = cli("bench", str(model), "--profile", str(prof), "--budgets", "150", "--threads", "1",
            "--prompt-tokens", "8", "--decode-tokens", "4", "--out", str(out))
    assert b.returncode == 0, b.stderr
    assert "edgemoe/llama.cpp decode" in b.stdout and "targets (pipeline issue)" in b.stdout
    data = json.loads(next(out.glob("*.json")).read_text())
    rows = {r["engine"]: r for r in data["rows"]}
    assert set(rows) == {"llama.cpp", "edgemoe"} and all("failed" not in r for r in rows.values())
    assert rows["edgemoe"]["peak_over_budget"] <= 1.05
    assert rows["edgemoe"]["tokens"] and rows["llama.cpp"]["s_mbu"] > 0
    # the oracle and the prediction replay the routing of the very tokens the run processed
    e = rows["edgemoe"]
    assert e["belady_mb_per_token"] > 0 and e["predicted_tps"] > 0 and 0 < e["run_locality"]["consecutive_reuse"] <= 1
