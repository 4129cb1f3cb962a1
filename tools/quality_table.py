#!/usr/bin/env python3
"""What each quality setting costs, decoded token by token, against the GGUF in llama.cpp.

    python tools/quality_table.py [--model models/shakespeare-moe.gguf] [--text models/data/test.txt]
                                  [--windows 4] [--out docs/quality_table.json]

The text (the bundled model's test split by default) is tokenized without BOS and cut into windows
of 256 tokens. llama.cpp evaluates each window from an empty context (F32 KV cache): the reference.
edgemoe runs the model's default expert store (`edgemoe convert`, no calibration file) at each
quality, feeding every window one token at a time from an empty context, as decoding does (each
quality in a fresh process), first with no budget (every expert stays in memory once read, so a
lossy preset's lower widths apply to first reads only; its skips apply throughout), then under a
budget whose expert cache holds --cache-fraction (40%) of the experts, where a preset's widths
apply to every miss. Per quality, over all scored positions (a window's tokens 2..256 predicted
from the ones before):

- KL(llama.cpp || edgemoe) of the next-token distributions, median and 99th percentile, in nats;
- top-1: share of positions whose most likely next token is llama.cpp's;
- perplexity and its change against llama.cpp's on the same positions;
- of the token-expert pairs the routers chose: the share skipped and the share computed at each width.

Prints a markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgemoe  # noqa: E402
from edgemoe.runtime import evaluate  # noqa: E402
from edgemoe.store.convert import convert  # noqa: E402

WINDOW = 256
# the presets, then the explicit thresholds the docs name ("high,low[,naee]": README, docs/benchmarks.md)
QUALITIES = ["max", "balanced", "fast", "0.6,0.9,1", "1,0.9", "0.5,1"]


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lp = evaluate._log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]


def llama_logits(path: Path, wins: list[np.ndarray]) -> np.ndarray:
    """llama.cpp's logits at the windows' scored positions, each window one batch from an empty context."""
    fn, close = evaluate.llama_cpp_logits_fn(str(path), WINDOW)
    try:
        return np.concatenate([fn(w)[:-1] for w in wins])
    finally:
        close()


def compare(ref: np.ndarray, out: np.ndarray, targets: np.ndarray) -> dict:
    """out's next-token distributions against ref's: KL(ref || out) median and 99th percentile, top-1
    agreement, perplexity and its change against ref's on the same targets."""
    kl = evaluate.kl_divergence(ref, out)
    p = float(np.exp(nll(out, targets).mean()))
    return dict(
        kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)),
        top1=float((out.argmax(-1) == ref.argmax(-1)).mean()),
        ppl=p,
        ppl_delta=p / float(np.exp(nll(ref, targets).mean())) - 1,
    )


def price(
    store: Path, wins: list[np.ndarray], ref: np.ndarray, qualities: list[str], cache_share: float | None = None
) -> list[dict]:
    """Each quality on the store (under the budget whose expert cache holds cache_share of the experts,
    if given; else no budget), every window decoded one token at a time in a fresh process, against
    ref: the reference's logits [positions, vocab] at the windows' scored positions."""
    targets = np.concatenate([w[1:] for w in wins])
    rows = []
    for q in qualities:
        parts, chosen, skipped, by_bits, info = [], 0, 0, {}, {}
        for w in wins:
            load = {"quality": q, "kv_type": "f32", "n_ctx": WINDOW}
            logits, info = evaluate.decode_in_new_process(store, w.tolist(), load, cache_share)
            parts.append(logits[:-1])
            chosen += info["chosen"]
            skipped += info["skipped"]
            for b, n in info["uses_by_bits"].items():
                by_bits[int(b)] = by_bits.get(int(b), 0) + n
        out = np.concatenate(parts)
        row = dict(
            quality=q,
            cache_share=cache_share,
            lossless=info["lossless"],
            **compare(ref, out, targets),
            skipped=skipped / chosen,
            at_bits={b: n / chosen for b, n in sorted(by_bits.items())},
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare-moe.gguf")
    ap.add_argument("--text", type=Path, default=ROOT / "models" / "data" / "test.txt")
    ap.add_argument("--windows", type=int, default=4, help="windows of 256 tokens (default 4: 1,020 positions)")
    ap.add_argument("--qualities", default=";".join(QUALITIES), help="qualities to price, separated by ;")
    ap.add_argument(
        "--cache-fraction",
        type=float,
        default=0.4,
        help="the second half of the table runs under the budget whose expert cache holds this share of the "
        "experts (the first: no budget, every expert stays once read, so a preset's lower widths and skips "
        "apply to first reads only)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "quality_table.json")
    args = ap.parse_args(argv)
    qualities = [q for q in args.qualities.split(";") if q]

    with edgemoe.load(args.model, n_ctx=WINDOW, progress=False) as m:
        toks = m.tokenize(args.text.read_text(encoding="utf-8"), add_bos=False)
    wins = evaluate.windows_of(toks, WINDOW, args.windows)
    targets = np.concatenate([w[1:] for w in wins])
    ref = llama_logits(args.model, wins)
    ref_nll = nll(ref, targets)
    print(f"{args.model.name}: {len(wins)} windows of {WINDOW} tokens of {args.text.name}, {len(targets)} positions")
    print(f"llama.cpp perplexity {np.exp(ref_nll.mean()):.3f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="edgemoe-qtable-") as tmp:
        store = convert(args.model, Path(tmp) / "default.edgemoe", progress=False)
        scheme = json.loads((store / "manifest.json").read_text())["scheme"]
        rows = []
        for frac in (None, args.cache_fraction):
            for r in price(store, wins, ref, qualities, frac):
                rows.append(dict(cache="every expert" if frac is None else f"{frac:.0%} of the experts", **r))

    widths = sorted({b for r in rows for b in r["at_bits"]})
    print()
    print(
        "| expert cache | quality | lossless | median KL | p99 KL | top-1 vs llama.cpp | perplexity | vs llama.cpp "
        "| skipped | " + " | ".join(f"at {b} bits" for b in widths) + " |"
    )
    print("|---" * (9 + len(widths)) + "|")
    for r in rows:
        print(
            f"| {r['cache']} | {r['quality']} | {'yes' if r['lossless'] else 'no'} | "
            f"{r['kl_median']:.1e} | {r['kl_p99']:.1e} | "
            f"{r['top1']:.1%} | {r['ppl']:.3f} | {r['ppl_delta']:+.2%} | {r['skipped']:.1%} | "
            + " | ".join(f"{r['at_bits'].get(b, 0):.1%}" for b in widths)
            + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmpf = args.out.with_suffix(".json.tmp")
    tmpf.write_text(
        json.dumps(
            dict(
                model=str(args.model.resolve().relative_to(ROOT))
                if args.model.resolve().is_relative_to(ROOT)
                else str(args.model),
                text=args.text.name,
                windows=len(wins),
                window=WINDOW,
                positions=int(len(targets)),
                store_scheme=scheme,
                llama_cpp_perplexity=float(np.exp(ref_nll.mean())),
                rows=rows,
            ),
            indent=1,
        )
    )
    os.replace(tmpf, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
