#!/usr/bin/env python3
"""Budgets from the minimum to the whole model: edgemoe against llama.cpp under the same memory cap.

For each budget (a fraction of the GGUF file size) both engines run in their own process inside a
memory cgroup capped at that budget (root, cgroup v1), from a cold page cache, optionally with a
read throttle and the device's readahead: llama.cpp memory-mapped without its weight repacking
(which a cap OOM-kills), edgemoe streaming experts from its store with memory_budget=budget.
Prints decode and prompt tokens/s, MB read from storage per decoded token, peak RSS against the
budget, the expert cache hit rate, and the edgemoe / llama.cpp decode ratio; --json saves it.

    python tools/bench_budget.py MODEL.gguf [--fractions 1,0.5,0.3] [--read-mbps 250] [--readahead-kb 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_vs_llamacpp import machine, run_engine  # noqa: E402

from edgemoe import cgroup, store, streaming  # noqa: E402
from edgemoe.convert import convert  # noqa: E402


def ensure_store(model: Path) -> Path:
    dst = streaming.cache_dir() / (streaming.store_key(model) + ".edgemoe")
    if not store.is_store(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {model} -> {dst}", file=sys.stderr)
        convert(model, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--fractions", default="1,0.5,0.3", help="budgets as fractions of the GGUF size")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--read-mbps", type=float, default=None, help="throttle storage reads (MB/s)")
    ap.add_argument("--readahead-kb", type=int, default=None, help="the disk's readahead during the runs")
    ap.add_argument("--engines", default="llama.cpp,edgemoe")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    size = args.model.stat().st_size
    st = ensure_store(args.model)
    device, disk = cgroup.block_device_of(st)
    read_bps = int(args.read_mbps * 1e6) if args.read_mbps else None
    rows = []
    with cgroup.readahead(disk, args.readahead_kb):
        for frac in (float(f) for f in args.fractions.split(",")):
            budget = int(frac * size)
            for engine in args.engines.split(","):
                cgroup.drop_caches()
                extra = ["--budget", str(budget)] if engine == "edgemoe" else []
                path = str(st if engine == "edgemoe" else args.model)
                with cgroup.limits(mem_bytes=budget, read_bps=read_bps, device=device) as cgs:
                    def join(cgs=cgs):
                        for d in cgs:
                            (d / "cgroup.procs").write_text(str(os.getpid()))
                    r = run_engine(engine, path, args, extra, preexec=join)
                    if "failed" in r and cgroup.oom_killed(cgs):
                        r["failed"] = "OOM-killed under the cap"
                r.update(fraction=frac, budget=budget)
                rows.append(r)
                print(_row(r), file=sys.stderr, flush=True)
    mib = 1024 * 1024
    print(f"model {args.model.name}: {size / mib:.0f} MiB GGUF; store {st}; {args.threads} threads; "
          f"prompt {args.prompt_tokens}, decode {args.decode_tokens} tokens; read throttle "
          f"{args.read_mbps or 'none'} MB/s; readahead {args.readahead_kb or 'unchanged'} KB; machine: {machine()}")
    print(f"{'budget':>14} {'engine':<10} {'decode tok/s':>12} {'prompt tok/s':>12} {'MB read/tok':>11} "
          f"{'peak RSS MiB':>12} {'/budget':>7} {'hit rate':>8}")
    for r in rows:
        print(_row(r))
    for frac in sorted({r["fraction"] for r in rows}, reverse=True):
        pair = {r["engine"]: r for r in rows if r["fraction"] == frac and "failed" not in r}
        if len(pair) == 2:
            print(f"{frac:>5.0%}: decode edgemoe/llama.cpp {pair['edgemoe']['decode_tps'] / pair['llama.cpp']['decode_tps']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(args.model), file_bytes=size, machine=machine(),
                                                   args=vars(args) | {"model": str(args.model)}, rows=rows,
                                                   when=time.time()), indent=1))
    return 0


def _row(r: dict) -> str:
    head = f"{r['fraction']:>5.0%} {r['budget'] / 2**20:>6.0f} MiB {r['engine']:<10}"
    if "failed" in r:
        return f"{head} failed: {r['failed']}"
    per_tok = r["decode_read"] / max(len(r["tokens"]) - 1, 1) / 1e6
    used = r["peak_rss"] - r["base_rss"]
    hit = f"{r['hit_rate']:.1%}" if "hit_rate" in r else "-"
    return (f"{head} {r['decode_tps']:>12.2f} {r['prompt_tps']:>12.2f} {per_tok:>11.1f} "
            f"{used / 2**20:>12.0f} {used / r['budget']:>7.2f} {hit:>8}")


if __name__ == "__main__":
    raise SystemExit(main())
