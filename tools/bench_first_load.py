#!/usr/bin/env python3
"""Peak RSS of the first load of a GGUF under a budget, the conversion into a store included.

    python tools/bench_first_load.py MODEL.gguf [--budget-share 0.4] [--tokens 16]

Runs what a user runs, in a fresh process with a fresh store cache directory:
`edgemoe.load(MODEL, memory_budget=B)` (which converts the file) and a greedy generation. Prints
the peak RSS (VmHWM) over the RSS right after `import edgemoe`, against B, and the memory plan.
tests/test_budget_first_load.py runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import edgemoe
from edgemoe.runtime import memory
base = edgemoe.BASELINE_RSS
t0 = time.perf_counter()
m = edgemoe.load(sys.argv[1], memory_budget=int(sys.argv[2]), n_ctx=256, progress=False)
load_s = time.perf_counter() - t0
loaded = memory.peak_rss()
m.generate("The", max_tokens=int(sys.argv[3]), temperature=0, ignore_eos=True)
p, s = m.memory_plan, m.stats()
print(json.dumps(dict(base=base, hwm=memory.peak_rss(), loaded=loaded, load_s=load_s, store=str(m.store_path),
                      runtime=p.runtime, dense=p.dense, kv=p.kv, cache=p.cache_capacity, misses=s.cache.misses,
                      quality=s.quality, decode_tps=s.decode_tokens_per_s)))
"""


def measure(model: Path, budget: int, cache_dir: Path, tokens: int = 16) -> dict:
    """One first load in a fresh process (EDGEMOE_CACHE=cache_dir, which must hold no store of it)."""
    env = dict(os.environ, EDGEMOE_CACHE=str(cache_dir))
    p = subprocess.run(
        [sys.executable, "-c", WORKER, str(model), str(budget), str(tokens)], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        raise RuntimeError(f"first load failed (exit {p.returncode}): {p.stderr.strip()}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(budget=budget, model_bytes=model.stat().st_size, peak=r["hwm"] - r["base"])
    return r


def report(r: dict) -> str:
    mib = 1 << 20
    return (
        f"first load of {r['model_bytes'] / mib:.0f} MiB at a budget of {r['budget'] / mib:.0f} MiB "
        f"(file {r['model_bytes'] / r['budget']:.2f}x the budget), quality {r['quality']}: peak RSS over "
        f"the post-import RSS {r['peak'] / mib:.0f} MiB = {r['peak'] / r['budget']:.2f}x the budget "
        f"({(r['loaded'] - r['base']) / mib:.0f} MiB by the end of the load, {r['load_s']:.1f} s with the "
        f"conversion); plan: runtime {r['runtime'] / mib:.0f} MiB, dense {r['dense'] / mib:.1f} MiB, "
        f"KV {r['kv'] / mib:.1f} MiB, expert cache {r['cache'] / mib:.0f} MiB; {r['misses']} misses, "
        f"decode {r['decode_tps']:.2f} tok/s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--budget-share", type=float, default=0.4, help="budget as a share of the file (default 0.4)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate after the load (default 16)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgemoe-first-load-") as d:
        t0 = time.perf_counter()
        r = measure(a.model, int(a.budget_share * a.model.stat().st_size), Path(d), a.tokens)
    print(report(r))
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
