#!/usr/bin/env python3
"""Replay a routing trace through the expert cache policies and an offline Belady oracle.

    python tools/replay_trace.py --model MODEL.gguf --text FILE [--tokens 256] [--save trace.npy]
    python tools/replay_trace.py --trace trace.npy --expert-bytes N --layers L --experts E
    python tools/replay_trace.py --bench BENCH.json     # each policy on an `edgemoe bench` run's routing

The trace is what each layer's router chose for each token, decoded one token at a time
(Model.routing_trace). Every expert is read whole (all planes), so the figures are bytes read
per token at each cache size: LRU, LFU and the score policy run through edgemoe's ExpertCache
with a reader that only counts; Belady evicts the expert whose next use is farthest away (the
optimum for equal-sized items), the yardstick for the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe.devices.replay import locality, table  # noqa: E402
from edgemoe.runtime.cache import POLICIES  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF or store to trace")
    ap.add_argument("--text", help="text to decode for the trace")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--save", help="save the trace (.npy)")
    ap.add_argument("--trace", help="replay a saved trace instead")
    ap.add_argument("--expert-bytes", type=int, help="bytes of one expert (with --trace)")
    ap.add_argument("--experts", type=int, help="experts per layer (with --trace)")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,0.75", help="cache sizes as fractions of all experts")
    ap.add_argument("--decays", help="also: misses per token of the score policy at these decays (e.g. 0.5,0.9,0.95)")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument(
        "--bench",
        help="an `edgemoe bench` JSON: replay each edgemoe run's routing (its prompt as one "
        "batch, then its tokens) through the cache with each policy, as the engine runs it",
    )
    args = ap.parse_args(argv)
    if args.bench:
        return replay_bench(Path(args.bench))
    if args.trace:
        trace = np.load(args.trace)
        expert_bytes, n_expert = args.expert_bytes, args.experts
    else:
        import edgemoe
        from edgemoe.models.gguf_file import GGUFFile
        from edgemoe.store.convert import EXPERT_SUFFIXES

        with edgemoe.load(args.model, n_ctx=args.tokens + 1) as m:
            ids = m.tokenize(Path(args.text).read_text(encoding="utf-8"))[: args.tokens]
            trace = m.routing_trace(ids)
            n_expert = m.config.n_expert
        gf = GGUFFile(args.model)
        first = int(np.nonzero((trace >= 0).all(axis=(0, 2)))[0][0])  # first MoE layer
        expert_bytes = sum(gf.tensor(f"blk.{first}.{s}").nbytes for s in EXPERT_SUFFIXES.values()) // n_expert
        gf.close()
        if args.save:
            np.save(args.save, trace)
    fractions = [float(x) for x in args.fractions.split(",")]
    loc = locality(trace, n_expert)
    print(
        f"trace: {trace.shape[0]} tokens x {trace.shape[1]} layers x top-{trace.shape[2]}, "
        f"{n_expert} experts/layer, {expert_bytes} bytes/expert"
    )
    print(
        f"locality: top-1/8 experts take {loc['top_eighth_share']:.1%} of picks (uniform 12.5%; uniform picks "
        f"of {loc['tokens']} tokens {loc['sampled_uniform_share']:.1%}), entropy {loc['entropy_bits']:.2f} bits "
        f"(first MoE layer {loc['entropy_bits_first_layer']:.2f}; uniform {loc['uniform_entropy_bits']:.2f}), busiest "
        f"expert {loc['busiest_vs_uniform']:.2f}x uniform ({loc['sampled_uniform_busiest']:.2f}x by chance); "
        f"consecutive-token reuse {loc['consecutive_reuse']:.1%} (uniform {loc['uniform_reuse']:.1%})"
    )
    rows = table(trace, expert_bytes, n_expert, fractions)
    print(
        f"{'cache':>6} {'slots':>6} "
        + " ".join(f"{p + ' MB/tok':>14}" for p in (*POLICIES, "belady"))
        + f" {'best/belady':>12}"
    )
    for r in rows:
        best = min(r[p] for p in POLICIES)
        ratio = best / r["belady"] if r["belady"] else 1.0
        print(
            f"{r['fraction']:>6.0%} {r['slots']:>6} "
            + " ".join(f"{r[p] / 1e6:>14.3f}" for p in (*POLICIES, "belady"))
            + f" {ratio:>12.2f}"
        )
    if args.decays:
        from edgemoe.devices.cachesim import simulate, trace_requests

        reqs = trace_requests(trace)
        T, L = trace.shape[0], trace.shape[1]
        print("score policy, misses per token by decay (per visit of the expert's layer):")
        for d in (float(x) for x in args.decays.split(",")):
            cells = [simulate(reqs, L, n_expert, r["slots"], "score", T, d).sum() / T for r in rows]
            print(f"  decay {d:<5g} " + "  ".join(f"{r['fraction']:.0%}: {c:.1f}" for r, c in zip(rows, cells)))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(locality=loc, rows=rows), indent=1))
    return 0


def replay_bench(path: Path) -> int:
    """MB read per decoded token of each cache policy on the routing of each edgemoe run of a bench
    (edgemoe.devices.replay.replay_run: the run's quality, cache capacity, store), next to what the run
    read and the warmed Belady oracle of the bench."""
    from edgemoe.devices import bench
    from edgemoe.devices.benchrun import prompt_ids
    from edgemoe.devices.replay import replay_run
    from edgemoe.runtime.policy import parse_quality

    d = json.loads(path.read_text())
    model, mb = Path(d["model"]), d["model_bytes"]
    setup = bench.replay_setup(bench.ensure_store(model))
    runs = [r for r in d["rows"] if r["engine"] == "edgemoe" and "cache_capacity" in r]
    prompt = prompt_ids(mb["n_vocab"], d.get("prompt_tokens", 16))
    traces = bench.routings(model, [prompt + r["tokens"][:-1] for r in runs])
    print(
        f"{'budget':>6} {'quality':>8} {'lossless':>8} {'run MB/tok':>11} "
        + " ".join(f"{p + ' MB/tok':>14}" for p in POLICIES)
        + f" {'belady MB/tok':>14}"
    )
    for r, (top, w) in zip(runs, traces):
        cells = []
        for pol in POLICIES:
            rep = replay_run(
                top,
                w,
                capacity=r["cache_capacity"],
                quality=parse_quality(r["quality"]),
                prompt=len(prompt),
                policy=pol,
                **setup,
            )
            cells.append(rep["read_bytes"] / rep["tokens"] / 1e6)
        lossless = {True: "yes", False: "no"}.get(r.get("lossless"), "-")  # "-": a bench from before it was recorded
        print(
            f"{r['fraction']:>6.0%} {r['quality']:>8} {lossless:>8} {r['mb_read_per_token']:>11.1f} "
            + " ".join(f"{c:>14.1f}" for c in cells)
            + f" {r['belady_mb_per_token']:>14.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
