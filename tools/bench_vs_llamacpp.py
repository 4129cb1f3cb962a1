#!/usr/bin/env python3
"""edgemoe against llama.cpp (llama-cpp-python) on the same GGUF, side by side in one run.

Each engine runs in its own process (edgemoe.devices.benchrun) with the same threads, prompt and greedy
decode; llama.cpp in its default configuration (weights repacked in RAM). Prints prompt and decode
tokens/s, load time, peak RSS over the post-import RSS, and the edgemoe / llama.cpp ratios; edgemoe
at its default quality, max (lossless: the GGUF in place, every weight), which the table names.

    python tools/bench_vs_llamacpp.py MODEL.gguf [--prompt-tokens 32] [--decode-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe.devices.bench import machine, run_engine  # noqa: E402
from edgemoe.runtime.policy import quality_label  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    size = os.path.getsize(args.model)
    res = {
        e: run_engine(e, args.model, args, ["--repack"] if e == "llama.cpp" else []) for e in ("llama.cpp", "edgemoe")
    }
    for r in res.values():
        if "failed" in r:
            raise SystemExit(f"{r['engine']} failed: {r['failed']}")
    mib = 1024 * 1024
    print(
        f"model {args.model}: {size / mib:.0f} MiB; {args.threads} threads; prompt {args.prompt_tokens} tokens, "
        f"greedy decode {args.decode_tokens} tokens; machine: {machine()}"
    )
    print(
        f"{'engine':<10} {'quality':<17} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13} "
        f"{'peak RSS - base':>16} {'/ file':>7}"
    )
    for e, r in res.items():
        used = r["peak_rss"] - r["base_rss"]
        quality = quality_label(r["quality"], r["lossless"])
        print(
            f"{e:<10} {quality:<17} {r['load_s']:>7.2f} {r['prompt_tps']:>13.2f} {r['decode_tps']:>13.2f} "
            f"{used / mib:>12.0f} MiB {used / size:>7.2f}"
        )
    a, b = res["edgemoe"], res["llama.cpp"]
    print(
        f"ratio edgemoe/llama.cpp: prompt {a['prompt_tps'] / b['prompt_tps']:.2f}x, "
        f"decode {a['decode_tps'] / b['decode_tps']:.2f}x, peak RSS "
        f"{(a['peak_rss'] - a['base_rss']) / (b['peak_rss'] - b['base_rss']):.2f}x"
    )
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    print(f"greedy tokens identical: {same}/{len(a['tokens'])}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(
                dict(model=args.model, file_bytes=size, machine=machine(), results=res, when=time.time()), f, indent=1
            )
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
