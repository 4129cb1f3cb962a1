#!/usr/bin/env python3
"""Measure the bundled model and write the figures into its card, between markers.

    python tools/model_card_figures.py [--model models/shakespeare-moe.gguf] [--card models/shakespeare-moe.md]

Fills the block between `<!-- figures:start -->` and `<!-- figures:end -->` with: parameter counts
(total, active per token), validation and test perplexity (edgemoe and llama.cpp, the method of
edgemoe.runtime.evaluate: windows of 256 tokens), and fixed-seed samples produced by `edgemoe run`.
tests/test_bundled.py checks the validation perplexity against this block.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START, END = "<!-- figures:start -->", "<!-- figures:end -->"
WINDOW = 256
PROMPTS = [("ROMEO.\n", 1), ("KING HENRY.\nNow, lords,", 2), ("Enter a Messenger.\n\nMESSENGER.\n", 3)]


def param_counts(path: Path) -> tuple[int, int]:
    from edgemoe.models.config import ModelArgs
    from edgemoe.models.gguf_file import GGUFFile

    f = GGUFFile(path)
    c = ModelArgs.from_gguf(f)
    total = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    experts = sum(int(np.prod(t.shape)) for n, t in f.tensors.items() if n.endswith("_exps.weight"))
    active = total - experts + experts * c.n_expert_used // c.n_expert
    f.close()
    return total, active


def perplexities(path: Path, text_path: Path) -> tuple[float, float, int]:
    import edgemoe
    from edgemoe.runtime import evaluate

    with edgemoe.load(path, n_ctx=WINDOW, kv_type="f32") as m:
        toks = m.tokenize(text_path.read_text(encoding="utf-8"), add_bos=False)
        wins = evaluate.windows_of(toks, WINDOW)
        ours = evaluate.perplexity("edgemoe", m.logits, wins)
    fn, close = evaluate.llama_cpp_logits_fn(str(path), WINDOW)
    try:
        ref = evaluate.perplexity("llama.cpp", fn, wins)
    finally:
        close()
    return ours.perplexity, ref.perplexity, ours.tokens_scored


def sample(path: Path, prompt: str, seed: int) -> str:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe",
            "run",
            "-m",
            str(path),
            prompt,
            "--max-tokens",
            "80",
            "--temperature",
            "0.8",
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return p.stdout.rstrip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare-moe.gguf")
    ap.add_argument("--card", type=Path, default=ROOT / "models" / "shakespeare-moe.md")
    args = ap.parse_args(argv)
    total, active = param_counts(args.model)
    data = ROOT / "models" / "data"
    v_ours, v_ref, v_n = perplexities(args.model, data / "validation.txt")
    t_ours, t_ref, t_n = perplexities(args.model, data / "test.txt")
    lines = [
        START,
        "Measured by `python tools/model_card_figures.py` (perplexity: non-overlapping windows of "
        f"{WINDOW} tokens, no BOS, first token of each window is context only; see edgemoe/runtime/evaluate.py). "
        "`edgemoe eval --text models/data/validation.txt --kv-type f32` (and `test.txt`) prints the same "
        "perplexities, edgemoe's and llama.cpp's.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| parameters, total | {total:,} |",
        f"| parameters, active per token | {active:,} |",
        f"| file size | {args.model.stat().st_size:,} bytes |",
        f"| validation perplexity, edgemoe | {v_ours:.3f} ({v_n:,} tokens scored) |",
        f"| validation perplexity, llama.cpp | {v_ref:.3f} |",
        f"| test perplexity, edgemoe | {t_ours:.3f} ({t_n:,} tokens scored) |",
        f"| test perplexity, llama.cpp | {t_ref:.3f} |",
        "",
        'Samples (`edgemoe run "PROMPT" --max-tokens 80 --temperature 0.8 --seed N`):',
        "",
    ]
    for prompt, seed in PROMPTS:
        lines += [f"seed {seed}, prompt {prompt!r}:", "", "```", prompt + sample(args.model, prompt, seed), "```", ""]
    lines.append(END)
    card = args.card.read_text(encoding="utf-8")
    block = "\n".join(lines)
    if START in card:
        card = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, card, flags=re.S)
    else:
        card = card.rstrip() + "\n\n## Measured figures and samples\n\n" + block + "\n"
    tmp = args.card.with_suffix(".md.tmp")
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, args.card)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
