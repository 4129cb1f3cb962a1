"""The markdown table of an `edgemoe bench` JSON, as docs/benchmarks.md shows it.

    python3 tools/bench_table.py BENCH.json

One row per engine, budget and quality: decode and prefill tokens/s, time to first token, MB read
per decoded token, peak RSS over the budget, the expert cache's hit rate, the share of chosen
experts skipped, and each quality's price against max (median and 99th-percentile KL divergence of
the next-token distribution, fed token by token; the share of positions whose most likely token
is max's; the share that is llama.cpp's greedy token).
"""

from __future__ import annotations

import json
import sys


def _kl(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def rows(bench: dict) -> list[str]:
    out = [
        "| budget | engine | quality | lossless | decode tok/s | prefill tok/s | TTFT s | MB read/token | "
        "peak RSS / budget | hit rate | skipped | KL median | KL p99 | top-1 = max | = llama.cpp greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["rows"]:
        head = f"| {r['fraction']:.0%} ({r['budget'] / 2**20:.0f} MiB) | {r['engine']} |"
        if "failed" in r:
            out.append(f"{head} failed: {r['failed']} |")
            continue
        ed = r["engine"] == "edgemoe"
        row = (
            f"{head} {r.get('quality', '-') if ed else '(GGUF as written)'} | "
            f"{'yes' if r.get('lossless', True) else 'no'} | {r['decode_tps']:.2f} | {r['prompt_tps']:.2f} | "
            f"{r['ttft_s']:.2f} | {r['mb_read_per_token']:.1f} | {r['peak_over_budget']:.2f} |"
        )
        if ed:
            row += (
                f" {r['hit_rate']:.1%} | {r['skipped'] / max(r['chosen'], 1):.1%} | {_kl(r.get('kl_median'))} | "
                f"{_kl(r.get('kl_p99'))} | {r['top1_vs_max']:.0%} | {r['greedy_vs_llamacpp']:.0%} |"
            )
        else:
            row += " - | - | - | - | - | - |"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            table = rows(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{args[0]}: not a bench JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
