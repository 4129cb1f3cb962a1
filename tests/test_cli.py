"""The CLI as a user runs it: run, info, eval; and the plain numpy kernel path, forced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import edgemoe_cli as cli
from conftest import kl_per_position, llama_cpp_logits, random_ids


def _stat(stderr: str, name: str) -> str:
    """The value of one row of `edgemoe run --stats`."""
    return next(line[len(name) :].strip() for line in stderr.splitlines() if line.startswith(name + "  "))


def test_run_streams_text(build_model):
    path = build_model("olmoe")
    p = cli("run", "-m", str(path), "The quick brown fox", "--max-tokens", "8", "--temperature", "0", "--stats")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "decode tokens/s" in p.stderr and "resident peak" in p.stderr
    assert _stat(p.stderr, "quality") == "max (lossless)"
    again = cli("run", "-m", str(path), "The quick brown fox", "--max-tokens", "8", "--temperature", "0")
    assert again.stdout == p.stdout


def test_info_describes_the_model(build_model):
    p = cli("info", str(build_model("qwen2moe", "Q8_0")))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for needle in ("qwen2moe", "experts", "top-k", "shared experts  ", "Q8_0", "per expert"):
        assert needle in out, out
    assert "yes" in out.split("shared experts")[1].splitlines()[0]


def test_eval_reports_perplexity_next_to_llama_cpp(build_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    p = cli("eval", "-m", str(build_model("qwen3moe")), "--text", str(text), "--window", "32", "--kv-type", "f32")
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith(("edgemoe", "llama.cpp"))}
    ours, ref = float(rows["edgemoe"][1]), float(rows["llama.cpp"][1])
    assert abs(ours / ref - 1) < 1e-3


WORKER = """
import json, sys, numpy as np, edgemoe
from edgemoe.quant import kernels
with edgemoe.load(sys.argv[1], kv_type="f32", n_ctx=128) as m:
    out = m.logits(json.loads(sys.argv[2]))
np.save(sys.argv[3], out)
print(kernels.BACKEND)
"""


def test_forced_numpy_kernels_match_llama_cpp(build_model, tmp_path):
    for ftype in ("F32", "Q4_K_M"):
        path = build_model("qwen3moe", ftype)
        ids = random_ids(24, 256, seed=5)
        out = tmp_path / f"{ftype}.npy"
        p = subprocess.run(
            [sys.executable, "-c", WORKER, str(path), json.dumps(ids), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "EDGEMOE_KERNELS": "numpy"},
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "numpy"
        ours, ref = np.load(out), llama_cpp_logits(path, ids)
        if ftype == "F32":
            assert np.abs(ours - ref).max() / ref.std() <= 1e-3
        else:  # llama.cpp quantizes activations; the numpy path does not
            assert np.median(kl_per_position(ours, ref)) <= 0.01
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_convert_info_and_budgeted_run(build_model, tmp_path):
    src = build_model("qwen3moe", "Q8_0")
    st = tmp_path / "m.edgemoe"
    p = cli("convert", str(src), "-o", str(st), "--bits", "2,4,8")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(st)
    again = cli("convert", str(src), "-o", str(st))
    assert again.returncode == 2 and "already exists" in again.stderr
    info = cli("info", str(st))
    assert info.returncode == 0 and "matquant, widths 2,4,8" in info.stdout
    run = cli("run", "-m", str(st), "Hello", "--max-tokens", "6", "--temperature", "0", "--stats")
    assert run.returncode == 0, run.stderr
    for needle in ("hits / partial / misses", "bytes read", "layer", "resident by bits"):
        assert needle in run.stderr
    assert _stat(run.stderr, "quality") == "max (lossless)"  # a store's default: every plane, no skipping
    assert _stat(run.stderr, "resident by bits").startswith("8-bit")
    fast = cli("run", "-m", str(st), "Hello", "--max-tokens", "6", "--temperature", "0", "--stats", "--quality", "fast")
    assert fast.returncode == 0, fast.stderr
    assert _stat(fast.stderr, "quality") == "fast (lossy)"
    skipped, _, chosen = _stat(fast.stderr, "skipped experts").split()[:3]  # the README: skipped experts shown
    assert (
        0 <= int(skipped) <= int(chosen)
        and int(chosen) > 0
        and _stat(run.stderr, "skipped experts").startswith("0 of ")
    )
    assert _stat(run.stderr, "prefetch issued / used / cancelled").startswith("0 / 0 / 0")  # prefetch off
    help_text = " ".join(cli("run", "--help").stdout.split())
    assert "max (the default:" in help_text and "fast (the default" not in help_text
    bench_help = " ".join(cli("bench", "--help").stdout.split())
    assert "max (the default; lossless)" in bench_help and "KL divergence" in bench_help
    low = cli("run", "-m", str(st), "Hello", "--max-tokens", "6", "--budget", "1MB")
    assert low.returncode == 2 and "minimum that works is" in low.stderr
    bad = cli("convert", str(src), "-o", str(tmp_path / "x"), "--bits", "4,2")
    assert bad.returncode == 2 and "--bits" in bad.stderr


def _stated_minimum(stderr: str) -> str:
    import re

    m = re.search(r"the minimum that works is \d+ MiB \(--budget (\d+MiB)\)", stderr)
    assert m, stderr
    return m.group(1)


def test_the_minimum_budget_an_error_states_works(build_model, tmp_path):
    """A budget refused before the conversion (from the GGUF's header) and one refused by a store
    (after the dense weights are loaded) each state a minimum; passing it back is accepted, in a
    fresh process, and counts the runtime (it is more than the dense weights and KV cache)."""
    path = build_model("olmoe", "Q4_0", n_embd=256, n_ff_exp=256)
    env = {"EDGEMOE_CACHE": str(tmp_path / "cache")}
    args = ("run", "-m", str(path), "The", "-n", "2", "--temperature", "0", "--ctx", "64")
    p = cli(*args, "--budget", "2MiB", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "runtime" in p.stderr and not (tmp_path / "cache" / "stores").exists(), "refused before converting"
    stated = _stated_minimum(p.stderr)
    assert int(stated[:-3]) > 100, "the runtime alone is over 100 MiB here"
    ok = cli(*args, "--budget", stated, env=env)
    assert ok.returncode == 0, ok.stderr
    store = next(p for p in (tmp_path / "cache" / "stores").iterdir() if p.is_dir())  # beside index.json
    p = cli("run", "-m", str(store), "The", "-n", "2", "--ctx", "64", "--budget", "2MiB", env=env)
    assert p.returncode == 2, p.stderr
    ok = cli("run", "-m", str(store), "The", "-n", "2", "--ctx", "64", "--budget", _stated_minimum(p.stderr), env=env)
    assert ok.returncode == 0, ok.stderr
