#!/usr/bin/env python3
"""Perplexity of the bundled model (its test split) against nested widths, independent
quantization, skipping thresholds, quality presets and memory budget; a table and a PNG.

    python tools/quality_sweep.py [--model models/shakespeare-moe.gguf] [--text models/data/test.txt]
                                  [--max-windows 40] [--out docs/quality_sweep]

Rows:
- the GGUF itself, in llama.cpp and in edgemoe (the reference lines);
- nested stores read at each of their widths (the default store, native for the bundled model's
  Q8_0 experts; matquant 2,3,4 and 2,4,8; d2moe 2,3,4);
- independent quantization at the same widths (a one-width matquant store: its own fitted scales);
- quality presets and explicit thresholds on the default store, with NAEE calibrated on the
  validation split;
- budgets (100%, 50%, 30% of the experts beyond the minimum): with every plane read the
  perplexity must not move; presets that prefer resident planes may.

Perplexity is computed in 64-token batches, which understates what a lossy quality loses in
decoding (an expert used by several tokens of a batch gets the width of its most important use),
so the quality and budget rows also give the decode-time price against max on the first
--kl-tokens tokens of the text, fed one at a time (edgemoe.runtime.evaluate.quality_costs, the code
`edgemoe bench` prices its lossy runs with): median and 99th-percentile KL(max || quality) in nats
and the share of positions whose most likely token is max's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgemoe  # noqa: E402
from edgemoe.runtime import evaluate  # noqa: E402
from edgemoe.runtime.policy import PRESETS  # noqa: E402
from edgemoe.store.convert import convert  # noqa: E402

WINDOW = 256


def ppl(path, wins, **load) -> tuple[float, dict]:
    with edgemoe.load(path, n_ctx=WINDOW, kv_type="f32", progress=False, **load) as m:
        r = evaluate.perplexity("edgemoe", m.logits, wins)
        s = m.stats()
        c = s.cache
        tokens = sum(len(w) for w in wins)
        extra = {}
        if c is not None:
            extra = dict(
                mb_read_per_token=c.bytes_read / tokens / 1e6,
                skipped=c.skipped / max(c.chosen, 1),
                uses_by_bits=c.uses_by_bits,
                hit_rate=c.hit_rate,
            )
        return r.perplexity, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare-moe.gguf")
    ap.add_argument("--text", type=Path, default=ROOT / "models" / "data" / "test.txt")
    ap.add_argument("--calibration", type=Path, default=ROOT / "models" / "data" / "validation.txt")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "quality_sweep")
    ap.add_argument(
        "--kl-tokens",
        type=int,
        default=128,
        help="tokens fed one at a time for the decode-time KL against max (0: none)",
    )
    args = ap.parse_args(argv)
    rows: list[dict] = []

    def add(group: str, name: str, value: float, **extra) -> None:
        base = rows[1]["ppl"] if len(rows) > 1 else value
        rows.append(
            dict(group=group, name=name, ppl=value, vs_max=value / base - 1 if group != "reference" else 0.0, **extra)
        )
        print(
            f"{group:<12} {name:<34} {value:>9.3f} {rows[-1]['vs_max']:>+8.2%} "
            + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()),
            flush=True,
        )

    with edgemoe.load(args.model, n_ctx=WINDOW) as m:
        toks = m.tokenize(args.text.read_text(encoding="utf-8"), add_bos=False)
    wins = evaluate.windows_of(toks, WINDOW, args.max_windows)
    print(f"{args.model.name}: {len(wins)} windows of {WINDOW} tokens of {args.text.name}")
    fn, close = evaluate.llama_cpp_logits_fn(str(args.model), WINDOW)
    try:
        add("reference", "GGUF in llama.cpp", evaluate.perplexity("llama.cpp", fn, wins).perplexity)
    finally:
        close()
    with tempfile.TemporaryDirectory(prefix="edgemoe-sweep-") as tmp:
        tmp = Path(tmp)
        # rows[1] is the "max" baseline every other row is compared with: the default store at max
        default_store = convert(args.model, tmp / "default.edgemoe", progress=False)
        scheme = json.loads((default_store / "manifest.json").read_text())["scheme"]
        name, bits = scheme["name"], scheme["bits"]
        value, extra = ppl(default_store, wins)
        add("max", f"store {name} {','.join(map(str, bits))}, max", value, **extra)
        add("reference", "GGUF in edgemoe", ppl(args.model, wins)[0])
        for b in bits[:-1]:  # the default store's own lower widths
            add("nested", f"{name} {','.join(map(str, bits))} read at {b} bits", ppl(default_store, wins, bits=b)[0])
        for scheme, family in (("matquant", (2, 3, 4)), ("matquant", (2, 4, 8)), ("d2moe", (2, 3, 4))):
            st = convert(
                args.model,
                tmp / f"{scheme}-{'-'.join(map(str, family))}.edgemoe",
                bits=family,
                scheme=scheme,
                progress=False,
            )
            for b in family:
                add("nested", f"{scheme} {','.join(map(str, family))} read at {b} bits", ppl(st, wins, bits=b)[0])
        for b in (2, 4, 8):  # one-width matquant planes come in 1, 2, 4 or 8 bits
            st = convert(args.model, tmp / f"rtn{b}.edgemoe", bits=(b,), scheme="matquant", progress=False)
            add("independent", f"{b}-bit alone (own scales)", ppl(st, wins)[0])
        # NAEE thresholds calibrated on the validation split
        from edgemoe.cli import main as cli

        rc = cli(["calibrate", "-m", str(default_store), "--text", str(args.calibration), "--tokens", "4096"])
        if rc:
            raise SystemExit("calibration failed")
        kl_ids = toks[: args.kl_tokens]

        def price(**load) -> dict:
            """Decode-time KL against max (evaluate.quality_costs), for the row's load options."""
            if not kl_ids:
                return {}
            [c] = evaluate.quality_costs(default_store, kl_ids, [load], kv_type="f32")
            return dict(lossless=c.lossless, kl_median=c.kl_median, kl_p99=c.kl_p99, top1_vs_max=c.top1_vs_max)

        for q in list(PRESETS) + ["1,0.9", "1,0.8", "1,1,0.5", "1,1,1", "0.5,1", "0.3,1"]:
            value, extra = ppl(default_store, wins, quality=q)
            add("quality", f"quality {q}", value, **extra, **price(quality=q))
        with edgemoe.load(default_store, n_ctx=WINDOW, progress=False) as m:
            plan = m.memory_plan
        experts = plan.cache_capacity
        for frac in (1.0, 0.5, 0.3):
            budget = plan.minimum_budget + int(frac * (experts - plan.min_cache))
            for q in ("max", "balanced"):
                value, extra = ppl(default_store, wins, memory_budget=budget, quality=q)
                add("budget", f"{frac:.0%} of experts, {q}", value, **extra, **price(quality=q, memory_budget=budget))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmpf = args.out.with_suffix(".json.tmp")
    tmpf.write_text(
        json.dumps(
            dict(
                model=str(args.model),
                text=str(args.text),
                windows=len(wins),
                kl_tokens=min(args.kl_tokens, len(toks)),
                rows=rows,
            ),
            indent=1,
        )
    )
    os.replace(tmpf, args.out.with_suffix(".json"))
    _plot(rows, args.out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    names = [f"{r['group']}: {r['name']}" for r in rows]
    ax.barh(
        range(len(rows)),
        [r["ppl"] for r in rows],
        color=["tab:gray" if r["group"] == "reference" else "tab:blue" for r in rows],
    )
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(rows[1]["ppl"] * 1.02, color="tab:red", linestyle="--", label="max + 2%")
    ax.set_xlabel("test perplexity (lower is better)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
