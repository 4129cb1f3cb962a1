"""What `edgemoe bench` shows (edgemoe.devices.bench): the row of each run as it ends, the text
report (the setup, the routing's locality, every run, edgemoe against llama.cpp, the pipeline
issue's targets) and the PNG of the figures against the budget."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

from ..runtime.policy import quality_label
from ..runtime.stats import percent
from .profiles import Profile


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}"


def run_label(r: dict) -> str:
    return quality_label(r["quality"], bool(r.get("lossless")))


def _calibration(mb: dict) -> str:
    """What tools/make_bench_model.py calibrated the file's routing to, when it did."""
    target = mb.get("reuse_target")
    if not target:
        return ""
    figs = [("reuse", "reuse of consecutive tokens' experts")]
    if mb.get("entropy_target"):  # files written before 2026-12-07 have reuse only
        figs += [("entropy", "popularity entropy / uniform"), ("top1", "first expert's share of the top-k mass")]
    return (
        f"; the file's routing was calibrated to {mb.get('routing_source', 'a trained model')} "
        "(tools/make_bench_model.py; averaged over layers, target / reached on its calibration tokens): "
        + ", ".join(
            f"{label} {np.mean(mb[key + '_target']):.1%} / {np.mean(mb[key + '_calibrated']):.1%}"
            for key, label in figs
        )
    )


def _kl(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def row(r: dict) -> str:
    head = (
        f"{r['fraction']:>5.0%} {r['budget'] / 2**20:>7.0f} MiB {r['engine']:<10} {r.get('quality', '-'):<10} "
        f"{('yes' if r['lossless'] else 'no') if 'lossless' in r else '-':>8}"
    )
    if "failed" in r:
        return f"{head} failed: {r['failed']}"
    hit = percent(r.get("hit_rate"))
    skipped = f"{r['skipped'] / max(r['chosen'], 1):.1%}" if r.get("chosen") else "-"
    pred = f"{r['predicted_tps']:.2f}" if "predicted_tps" in r else "-"
    return (
        f"{head} {r['decode_tps']:>8.2f} {r['prompt_tps']:>8.2f} {r['ttft_s']:>7.2f} {r['mb_read_per_token']:>9.1f} "
        f"{(r['peak_rss'] - r['base_rss']) / 2**20:>8.0f} {r['peak_over_budget']:>6.2f} {hit:>7} {skipped:>7} "
        f"{r['s_mbu']:>6.1%} {pred:>7} {_kl(r.get('kl_median')):>7} {_kl(r.get('kl_p99')):>7} "
        f"{_pct(r.get('top1_vs_max')):>5} {_pct(r.get('greedy_vs_llamacpp')):>6}"
    )


HEADER = (
    f"{'budget':>15} {'engine':<10} {'quality':<10} {'lossless':>8} {'dec t/s':>8} {'pre t/s':>8} {'TTFT s':>7} "
    f"{'MB/token':>9} {'peak MiB':>8} {'/budg':>6} {'hits':>7} {'skipped':>7} {'S-MBU':>6} {'pred.':>7} "
    f"{'KL med':>7} {'KL p99':>7} {'top1':>5} {'=llama':>6}"
)


def _llama_row(rows: list[dict], fraction: float) -> dict | None:
    """llama.cpp's run at a budget (failed or not), which edgemoe's runs there are compared with."""
    return next((x for x in rows if x["fraction"] == fraction and x["engine"] == "llama.cpp"), None)


def report(
    args, prof: Profile, size: int, st: Path, mb: dict, loc: dict, rows: list[dict], cost: dict | None, own_seqs: int
) -> str:
    """The text report of a bench (args: its options; loc: the locality of the model's own routing
    on own_seqs sequences of random tokens; cost: what the qualities were priced on)."""
    lines = [
        f"model {args.model.name} ({size / 2**20:.0f} MiB GGUF, store {st.name}); device {prof.name}: "
        f"reads {'unthrottled' if args.no_throttle else f'{prof.storage.seq_read_mbps:g} MB/s'}, readahead "
        f"{prof.storage.readahead_kb} KB, memory bandwidth {prof.memory_bandwidth_gbps:g} GB/s (profile); "
        f"{args.threads} threads; prompt {args.prompt_tokens}, decode {args.decode_tokens} tokens; machine {machine()}",
        f"routing of this GGUF ({loc['tokens']} random tokens in {own_seqs} sequences): top-1/8 experts take "
        f"{loc['top_eighth_share']:.1%} of picks (uniform picks of as many tokens: "
        f"{loc['sampled_uniform_share']:.1%}), "
        f"entropy {loc['entropy_bits']:.2f} bits ({loc['sampled_uniform_entropy_bits']:.2f}), busiest expert "
        f"{loc['busiest_vs_uniform']:.2f}x uniform ({loc['sampled_uniform_busiest']:.2f}x); consecutive-token reuse "
        f"{loc['consecutive_reuse']:.1%} (independent picks {loc['uniform_reuse']:.1%})" + _calibration(mb),
    ]
    if cost:
        lines.append(
            f"quality: lossless = every plane of every chosen expert, nothing skipped (max; llama.cpp runs the GGUF "
            f"as written). Each edgemoe quality priced against max on the same store: {cost['positions']} tokens (the "
            f"prompt, then {cost['continuation']} tokens) fed one at a time, the run's quality at the run's budget; KL "
            f"med / KL p99 = median / 99th percentile over positions of KL(max || quality) in nats; top1 = positions "
            f"whose most likely token is max's; =llama = of llama.cpp's {cost['greedy_positions']} greedy decode "
            f"choices, those that are also the quality's most likely token"
        )
    lines.append(HEADER)
    lines += [row(r) for r in rows]
    for r in rows:
        if r["engine"] != "edgemoe" or "failed" in r:
            continue
        l = _llama_row(rows, r["fraction"])
        if l is not None and "failed" not in l:
            lines.append(
                f"{r['fraction']:.0%}, {run_label(r)}: edgemoe/llama.cpp decode "
                f"{r['decode_tps'] / l['decode_tps']:.2f}x, prefill {r['prompt_tps'] / l['prompt_tps']:.2f}x, "
                f"bytes/token {r['mb_read_per_token'] / max(l['mb_read_per_token'], 1e-9):.2f}x"
            )
    lines.append("targets (pipeline issue):")
    for r in rows:
        if r["engine"] != "edgemoe" or "failed" in r:
            continue
        l = _llama_row(rows, r["fraction"])
        ratio = (r["decode_tps"] / l["decode_tps"]) if l and "failed" not in l else None
        lines.append(
            f"  budget {r['fraction']:.0%}, {run_label(r)}: decode vs llama.cpp >= 3x: "
            f"{'n/a (llama.cpp ' + l['failed'] + ')' if l and 'failed' in l else f'{ratio:.2f}x' if ratio else 'n/a'}; "
            f"peak RSS <= budget + 5%: {r['peak_over_budget']:.2f}x; bytes/token <= 1.25x Belady: "
            f"{r['mb_read_per_token'] / max(r.get('belady_mb_per_token', 0), 1e-9):.2f}x "
            f"(decode reads {r['mb_read_per_token']:.1f} MB/token, "
            f"Belady {r.get('belady_mb_per_token', 0):.1f} MB/token: "
            f"a cache of the same size reading every expert whole, on this run's routing, warmed by its prompt"
            + (
                f": top-1/8 experts {r['run_locality']['top_eighth_share']:.1%} of picks, consecutive reuse "
                f"{r['run_locality']['consecutive_reuse']:.1%})"
                if "run_locality" in r
                else ")"
            )
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Decode and prefill speed, bytes read and each quality's price against the budget, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("edgemoe: matplotlib is not installed (pip install 'edgemoe[plots]'): no PNG", file=sys.stderr)
        return
    ok = [r for r in rows if "failed" not in r]
    fracs = sorted({r["fraction"] for r in ok})
    series = [("llama.cpp", None)] + [
        ("edgemoe", q) for q in dict.fromkeys(r["quality"] for r in ok if r["engine"] == "edgemoe")
    ]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    panels = (
        ("decode_tps", "decode tokens/s"),
        ("prompt_tps", "prefill tokens/s"),
        ("mb_read_per_token", "MB read per token"),
        ("kl_median", "KL vs max, nats: median (o-), p99 (x--)"),
        ("top1_vs_max", "top-1 agreement with max"),
        ("greedy_vs_llamacpp", "agreement with llama.cpp greedy"),
    )
    for n, (engine, q) in enumerate(series):
        pts = [
            next(
                (r for r in ok if r["fraction"] == f and r["engine"] == engine and (q is None or r["quality"] == q)),
                None,
            )
            for f in fracs
        ]
        if not any(pts):
            continue
        label = "llama.cpp (GGUF)" if q is None else f"edgemoe {run_label(next(p for p in pts if p))}"
        color = "tab:gray" if q is None else colours[(n - 1) % len(colours)]
        for ax, (key, name) in zip(axes.flat, panels):
            have = [(f * 100, p[key]) for f, p in zip(fracs, pts) if p and p.get(key) is not None]
            if have:
                xs, ys = zip(*have)
                ax.plot(
                    xs,
                    [y * 100 for y in ys] if key in ("top1_vs_max", "greedy_vs_llamacpp") else ys,
                    "o-",
                    color=color,
                    label=label,
                )
            if key == "kl_median":
                p99 = [(f * 100, p["kl_p99"]) for f, p in zip(fracs, pts) if p and p.get("kl_p99") is not None]
                if p99:
                    ax.plot(*zip(*p99), "x--", color=color)
                ax.set_yscale("symlog", linthresh=1e-4)
            if key in ("top1_vs_max", "greedy_vs_llamacpp"):
                ax.set_ylim(0, 105)
                ax.set_ylabel("% of positions")
            ax.set_xlabel("budget, % of the GGUF")
            ax.set_title(name)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
