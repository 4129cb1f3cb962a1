"""The text of `edgemoe profile -m`'s report.md, and its PNG plots (matplotlib, where installed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.memory import format_size
from .measure import MiB
from .profiles import Profile

if TYPE_CHECKING:
    from .model_profile import ModelFacts


def write_plots(res: dict, out_dir: Path) -> list[str]:
    """hit_rate.png and popularity.png in out_dir; the names written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from ..runtime.cache import POLICIES

    rows = res["hit_rows"]
    n_total = res["facts"].n_expert * len(res["popularity"]["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    xs = [r["slots"] / n_total for r in rows]
    for ax, suffix, den, title in (
        (axes[0], "", "requests", "whole trace (cold start)"),
        (axes[1], "_warm", "warm_requests", "second half (warm)"),
    ):
        for p in (*POLICIES, "belady"):
            ax.plot(
                xs,
                [1 - r[p + suffix] / max(r[den], 1) for r in rows],
                marker="o",
                ms=3,
                label=p,
                ls="--" if p == "belady" else "-",
            )
        ax.set_xlabel("cache size (fraction of all experts)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title)
    axes[0].set_ylabel("hit rate")
    axes[0].legend()
    fig.suptitle("Expert cache hit rate vs cache size")
    fig.tight_layout()
    fig.savefig(out_dir / "hit_rate.png", dpi=110)
    plt.close(fig)
    pop = res["popularity"]
    counts = pop["counts"][pop["layers"]]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(pop["layers"]) + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, len(pop["layers"]) // 24)
    ax.set_yticks(range(0, len(pop["layers"]), step))
    ax.set_yticklabels(pop["layers"][::step])
    fig.colorbar(im, ax=ax, label="share of the layer's picks")
    ax.set_title("Expert popularity")
    fig.tight_layout()
    fig.savefig(out_dir / "popularity.png", dpi=110)
    plt.close(fig)
    return ["hit_rate.png", "popularity.png"]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def report_markdown(res: dict, model_path, text_path) -> str:
    """The text of report.md from profile_model()'s result."""
    f: ModelFacts = res["facts"]
    T, L, K = res["trace_shape"]
    pop = res["popularity"]
    out = [f"# Model profile: {Path(model_path).name}", ""]
    src = (
        f"the saved trace `{res['trace_path']}`"
        if res.get("trace_path")
        else f"the first {T} tokens of `{text_path}`, decoded one at a time ({res['trace_seconds']:.1f} s)"
    )
    out += [
        f"Trace: {src}: {T} tokens, "
        f"{L} layers ({len(pop['layers'])} MoE), {f.n_expert} experts per layer, top-{K}, "
        f"{res['experts_per_token']:.1f} expert reads per token if nothing were cached.",
        "",
    ]
    out += _sizes_section(res)
    out += _popularity_section(res)
    out += _reuse_section(res)
    out += _hit_rate_section(res)
    out += _prediction_section(res)
    out += _recommendation_section(res, model_path)
    return "\n".join(out)


def _sizes_section(res: dict) -> list[str]:
    f: ModelFacts = res["facts"]
    out = ["## Sizes", "", "| what | bytes |", "|---|---|"]
    for b in f.widths:
        out.append(f"| one expert at {b} bits (nested) | {format_size(f.expert_bytes[b])} |")
    if "source" in f.expert_bytes:
        out.append(f"| one expert as in the GGUF | {format_size(f.expert_bytes['source'])} |")
    out += [
        f"| dense weights (resident) | {format_size(f.dense_bytes)} |",
        f"| dense weights read per token | {format_size(f.dense_touched)} |",
        f"| KV cache at n_ctx={res['ctx_for_budget']} | {format_size(res['kv_bytes_at_ctx'])} |",
        "",
    ]
    out += [*(f"Note: {n}" for n in f.notes), ""] if f.notes else []
    return out


def _popularity_section(res: dict) -> list[str]:
    pop = res["popularity"]
    out = [
        "## Expert popularity",
        "",
        f"Share of a layer's picks that go to its most popular 1/8 of experts (uniform routing: "
        f"{pop['uniform_top_share']:.1%}), and the entropy of its pick distribution (uniform: "
        f"{pop['max_entropy_bits']:.2f} bits).",
        "",
        "| layer | top-1/8 share | entropy (bits) |",
        "|---|---|---|",
    ]
    for l in pop["layers"]:
        out.append(f"| {l} | {pop['top_eighth_share'][l]:.1%} | {pop['entropy_bits'][l]:.2f} |")
    ts = list(pop["top_eighth_share"].values())
    es = list(pop["entropy_bits"].values())
    out += [f"| mean | {np.mean(ts):.1%} | {np.mean(es):.2f} |", ""]
    if "popularity.png" in res["plots"]:
        out += ["![expert popularity](popularity.png)", ""]
    return out


def _reuse_section(res: dict) -> list[str]:
    reu = res["reuse"]
    out = [
        "## Token-to-token reuse",
        "",
        "Segment-cache hit rate (as in arXiv 2505.16056): the fraction of a token's chosen experts in a "
        "layer that at least one of the previous w tokens chose in that layer, averaged over tokens and "
        "MoE layers; uniform = 1 - (1 - k/E)^w, what independent uniform routing would give.",
        "",
        "| window w | measured | uniform |",
        "|---|---|---|",
    ]
    for w, r in reu.items():
        out.append(f"| {w} | {r['measured']:.1%} | {r['uniform']:.1%} |")
    return out


def _hit_rate_section(res: dict) -> list[str]:
    from ..runtime.cache import POLICIES

    f: ModelFacts = res["facts"]
    rows = res["hit_rows"]
    n_total = f.n_expert * len(res["popularity"]["layers"])
    out = [
        "",
        "## Hit rate against cache size",
        "",
        f"Cache size in expert slots (all {n_total} experts = 100%), every expert read whole, each "
        "policy as edgemoe's expert cache runs it; Belady (offline optimum) is the yardstick. "
        "cold: the whole trace from an empty cache (the first use of each expert always misses); "
        f"warm: its last {rows[0]['warm_tokens']} tokens, after the first ones filled the cache.",
        "",
        "| slots | of all | "
        + " | ".join(f"{p} cold" for p in (*POLICIES, "belady"))
        + " | "
        + " | ".join(f"{p} warm" for p in (*POLICIES, "belady"))
        + " |",
        "|---|---|" + "---|" * (2 * len(POLICIES) + 2),
    ]
    for r in rows:
        out.append(
            f"| {r['slots']} | {r['slots'] / n_total:.0%} | "
            + " | ".join(f"{1 - r[p] / r['requests']:.1%}" for p in (*POLICIES, "belady"))
            + " | "
            + " | ".join(f"{1 - r[p + '_warm'] / max(r['warm_requests'], 1):.1%}" for p in (*POLICIES, "belady"))
            + " |"
        )
    out.append("")
    if "hit_rate.png" in res["plots"]:
        out += ["![hit rate vs cache size](hit_rate.png)", ""]
    elif not res["plots"]:
        out += ["(plots skipped: matplotlib is not installed; `pip install edgemoe[plots]`)", ""]
    return out


def _prediction_section(res: dict) -> list[str]:
    prof: Profile = res["profile"]
    out = [
        "## Prediction for this device",
        "",
        f"Device: {prof.name} ({res['profile_source']}): memory {prof.memory_bandwidth_gbps:g} GB/s, storage "
        f"{prof.storage.kind} {prof.storage.seq_read_mbps:g} MB/s sequential reads, "
        f"{prof.storage.read_latency_us:g} us per read; default budget {format_size(prof.default_budget)}.",
        "",
        "Per token: misses = expert reads per token of the best policy at that cache size, warm (the "
        "trace's second half); "
        "t_compute = (dense bytes read + experts per token x expert bytes) / memory bandwidth; "
        "t_io = misses x (expert bytes / sequential-read bandwidth + read latency); "
        "tokens/s = 1 / max(t_compute, t_io). Budget = dense weights + KV cache at "
        f"n_ctx={res['ctx_for_budget']} + runtime estimate + cache slots x expert bytes. Nothing here is "
        "fitted to a measured run (edgemoe.devices.perf_model, docs/profiles.md).",
        "",
        "| bits | slots | policy | budget | fits | MB read/token | bound | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["predictions"]:
        out.append(
            f"| {p['bits']} | {p['slots']} | {p['policy']} | {format_size(p['budget'])} | "
            f"{'yes' if p['fits'] else 'no'} | {p['read_mb_per_token']:.2f} | {p['bound']} | "
            f"{p['tokens_per_s']:.2f} |"
        )
    out.append("")
    return out


def _recommendation_section(res: dict, model_path) -> list[str]:
    f: ModelFacts = res["facts"]
    prof: Profile = res["profile"]
    n_total = f.n_expert * len(res["popularity"]["layers"])
    rec = res["recommendation"]
    out = ["## Recommendation", ""]
    if rec is None:
        out += [
            f"Nothing fits the device's default budget {format_size(prof.default_budget)} at the top width "
            f"(every plane, lossless): the dense weights, KV cache and runtime alone need "
            f"{format_size(res['fixed_bytes'])}, and the smallest cache at that width the rest.",
            "",
        ]
    else:
        out += [
            f"- budget: **{format_size(rec['budget'])}** (of the device's default {format_size(prof.default_budget)})",
            f"- bit width: **{rec['bits']}**, the top width: every plane, lossless (quality max, the default; "
            "a lossy narrower width, where it would help, is below)",
            "- cache size: the smallest predicted within 95% of the fastest cache that fits at that width",
            f"- cache: **{rec['slots']} expert slots** ({rec['slots'] / n_total:.0%} of all experts, "
            f"{format_size(rec['slots'] * f.expert_bytes[rec['bits']])}), policy **{rec['policy']}**",
            f"- predicted decode: **{rec['tokens_per_s']:.2f} tokens/s** ({rec['bound']}-bound, "
            f"{rec['read_mb_per_token']:.2f} MB read per token)",
            "",
        ]
        out += [
            f"`edgemoe run -m {model_path} --budget {_budget_str(rec['budget'])} --policy {rec['policy']} ...` "
            "(quality max, the default: lossless)",
            "",
        ]
    lossy = res.get("lossy_option")
    if lossy is not None:
        gain = f", {lossy['tokens_per_s'] / rec['tokens_per_s']:.2f}x the lossless one" if rec else ""
        out += [
            "Opt-in and lossy: fewer bits per expert relieve the storage bound. "
            f"**{lossy['bits']}-bit experts**, {lossy['slots']} slots ({lossy['policy']}), budget "
            f"{format_size(lossy['budget'])}: predicted {lossy['tokens_per_s']:.2f} tokens/s ({lossy['bound']}-bound"
            f"{gain}). Price it before use: `edgemoe bench` gives a lossy quality's KL divergence against max.",
            "",
            f"`edgemoe run -m {model_path} --budget {_budget_str(lossy['budget'])} --bits {lossy['bits']} "
            f"--policy {lossy['policy']} ...` (lossy)",
            "",
        ]
    return out


def _budget_str(n: int) -> str:
    return f"{math.ceil(n / MiB)}MiB"
