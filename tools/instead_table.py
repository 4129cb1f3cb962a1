#!/usr/bin/env python3
"""What a user could run instead: smaller llama.cpp quantizations of the bundled model beside
edgemoe's quality presets on its Q4_K_M file.

    python tools/instead_table.py --source F16.gguf [--reference models/shakespeare-moe.gguf]
                                  [--types Q3_K_M,Q3_K_S,Q2_K,...] [--windows 4] [--out docs/instead_table.json]

--source is the model before quantization (the F16 export: `python tools/export_qwen3moe_gguf.py
build/shakespeare-moe/hf F16.gguf --qtype f16 --max-mb 0` after tools/train_default_model.py).
Each type is made from it by llama.cpp's quantizer without an importance matrix (a type llama.cpp
refuses so is listed with its refusal). On the test split, in windows of 256 tokens evaluated by
llama.cpp from an empty context: file size, bits per weight of the expert tensors, perplexity,
and KL(Q4_K_M || file) of the next-token distributions (median, 99th percentile) with the share of
positions whose most likely token is the Q4_K_M file's. The edgemoe rows are the reference file's
default store at each quality under a budget whose expert cache holds 40% of the experts (a
preset's lower widths apply to every miss), decoded token by token (tools/quality_table.py's
method) against the same Q4_K_M logits. Memory: a llama.cpp file runs in about its size plus the KV cache; edgemoe's
store runs under any budget from its minimum (`edgemoe info`), its speed set by the budget.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from quality_table import WINDOW, compare, llama_logits, price  # noqa: E402

import edgemoe  # noqa: E402
from edgemoe.runtime import evaluate  # noqa: E402
from edgemoe.store.convert import convert  # noqa: E402
from edgemoe.testing.synth import quantize_model  # noqa: E402

# smaller than Q4_K_M, the K-quants and every IQ type, smallest last
TYPES = ["Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S"]
TYPES += ["IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
QUALITIES = ["max", "balanced", "fast"]


def expert_bpw(path: Path) -> float:
    """Bits per weight of the expert tensors."""
    bits = weights = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if "_exps" in t.name:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return bits / weights


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the unquantized model (F16 GGUF)")
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "shakespeare-moe.gguf")
    ap.add_argument("--text", type=Path, default=ROOT / "models" / "data" / "test.txt")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "instead_table.json")
    args = ap.parse_args(argv)

    with edgemoe.load(args.reference, n_ctx=WINDOW, progress=False) as m:
        toks = m.tokenize(args.text.read_text(encoding="utf-8"), add_bos=False)
    wins = evaluate.windows_of(toks, WINDOW, args.windows)
    targets = np.concatenate([w[1:] for w in wins])

    ref = llama_logits(args.reference, wins)

    def row(name: str, path: Path) -> dict:
        r = dict(
            engine="llama.cpp",
            file=name,
            bytes=path.stat().st_size,
            expert_bpw=expert_bpw(path),
            **compare(ref, llama_logits(path, wins), targets),
        )
        print(json.dumps(r), flush=True)
        return r

    rows = [row(f"Q4_K_M ({args.reference.name})", args.reference)]
    with tempfile.TemporaryDirectory(prefix="edgemoe-instead-") as tmp:
        for t in [t for t in args.types.split(",") if t]:
            path = Path(tmp) / f"{t}.gguf"
            try:
                quantize_model(args.source, path, t)
            except RuntimeError as e:
                rows.append(dict(engine="llama.cpp", file=t, refused=str(e)))
                print(f"{t}: refused ({e})", flush=True)
                continue
            rows.append(row(t, path))
            path.unlink()
        store = convert(args.reference, Path(tmp) / "default.edgemoe", progress=False)
        # what a preset costs shows where memory is short: an expert cache of 40% of the experts
        for r in price(store, wins, ref, QUALITIES, 0.4):
            rows.append(dict(engine="edgemoe", file=f"Q4_K_M store, 40% of experts cached, {r['quality']}", **r))

    print()
    print(
        "| engine | file / setting | size MB | expert bits/weight | perplexity | vs Q4_K_M | median KL | p99 KL "
        "| top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['engine']} | {r['file']} | refused without an importance matrix | | | | | | |")
            continue
        if r["engine"] == "llama.cpp":
            size, bpw = f"{r['bytes'] / 1e6:.1f}", f"{r['expert_bpw']:.2f}"
        else:  # the store's file is the Q4_K_M's; its width per expert use, and the uses skipped
            size = "its store"
            bpw = ", ".join(f"{b}-bit width {s:.0%}" for b, s in r["at_bits"].items()) + f", skipped {r['skipped']:.0%}"
        print(
            f"| {r['engine']} | {r['file']} | {size} | {bpw} | {r['ppl']:.3f} | {r['ppl_delta']:+.2%} | "
            f"{r['kl_median']:.1e} | {r['kl_p99']:.1e} | {r['top1']:.1%} |"
        )
    tmpf = args.out.with_suffix(".json.tmp")
    tmpf.parent.mkdir(parents=True, exist_ok=True)
    tmpf.write_text(json.dumps(dict(windows=len(wins), positions=int(len(targets)), rows=rows), indent=1))
    os.replace(tmpf, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
