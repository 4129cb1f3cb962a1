"""`edgemoe bench MODEL --profile P`: llama.cpp and edgemoe on the same GGUF, the same emulated device.

For each budget (a fraction of the GGUF size) both engines run in their own process
(edgemoe.devices.benchrun) inside a memory cgroup capped at that budget (+64 MiB for the interpreter and
libraries, which edgemoe's budget does not count), with the profile's storage read
throttle and readahead, from a cold page cache, with the same threads: llama.cpp memory-mapped
without its weight repacking (which the cap OOM-kills), edgemoe streaming experts from its store
with memory_budget=budget. Prints and saves (JSON, PNG) decode and prefill tokens/s, time to first
token, peak RSS against the budget, bytes read per token, cache hit rate, skipped experts,
sparsity-aware memory bandwidth utilisation (S-MBU, MoE-CAP: bytes of the weights a token uses x
tokens/s / the device's memory bandwidth), the ratios, a prediction from the performance model, and
the pipeline issue's targets with what was reached.

Every edgemoe figure names the quality it was measured at and whether that quality is lossless.
The default is max (lossless: every plane of every chosen expert, nothing skipped); lossy qualities
are opt-in (--quality, repeatable) and each is priced on the same model, at the run's budget,
against max: the tokens of the run (the prompt, then llama.cpp's greedy continuation) are fed one
at a time as decoding does (edgemoe.runtime.evaluate.quality_costs), and the report gives the median and
99th-percentile KL divergence of the next-token distribution against max, the share of positions
whose most likely token is max's (top-1), and the share whose most likely token is llama.cpp's
greedy choice. (Batched prompt evaluation would understate the loss: an expert used by several
tokens gets the width of its most important use.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..fileio import write_text_atomic
from ..runtime import evaluate, streaming
from ..runtime.policy import DEFAULT, Calibration, parse_quality, quality_label
from ..store import reader as store
from . import cgroup
from .benchrun import prompt_ids
from .profiles import Profile, load_profile

CAP_SLACK = 64 * 1024 * 1024
OWN_SEQS = 8  # random-token sequences whose routing the bench reports as the model's own


def ensure_store(model: Path, progress: bool = True) -> Path:
    from ..store.convert import convert

    dst = streaming.cache_dir() / (streaming.store_key(model) + ".edgemoe")
    if not store.is_store(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        print(f"edgemoe: converting {model.name} into {dst}", file=sys.stderr)
        convert(model, dst, progress=progress)
    return dst


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}"


def run_engine(engine: str, path: str, args, extra: list[str] | None = None, cgroups: list[Path] | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edgemoe.devices.benchrun",
        engine,
        path,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--threads",
        str(args.threads),
        *(extra or []),
    ]
    proc = cgroup.run_in(cgroups or [], cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or "").strip().splitlines()[-2:]
    killed = cgroups and cgroup.oom_killed(cgroups)
    return dict(
        engine=engine, failed="OOM-killed under the cap" if killed else f"exit {proc.returncode}: {' | '.join(tail)}"
    )


def model_bytes(model: Path) -> dict:
    """Bytes a decoded token touches: dense (without the embedding table: one row is read) and
    one expert (all its matrices) per MoE layer, from the GGUF."""
    from ..models.config import ModelArgs
    from ..models.gguf_file import GGUFFile
    from ..store.convert import resident_dense_bytes, source_expert_bytes

    f = GGUFFile(model)
    c = ModelArgs.from_gguf(f)
    dense = resident_dense_bytes(f)  # a tied output reads the whole token table: it is resident
    n_moe = sum(not c.is_dense(i) for i in range(c.n_layer))
    expert = source_expert_bytes(f, c)
    out = dict(
        dense=dense,
        expert=expert,
        n_moe=n_moe,
        top_k=c.n_expert_used,
        n_expert=c.n_expert,
        n_vocab=c.n_vocab,
        active=dense + n_moe * c.n_expert_used * expert,
    )
    for key in ("reuse_target", "reuse_calibrated"):  # written by tools/make_bench_model.py
        if f.get("edgemoe.devices.bench." + key) is not None:
            out[key] = [float(x) for x in f.get("edgemoe.devices.bench." + key)]
    f.close()
    return out


def routings(model: Path, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Routing traces of the GGUF's own routers on each token sequence, (experts, gate weights)
    [T, L, K] each, the tokens evaluated one at a time as in decoding; one load of the model."""
    from ..api import load

    with load(model, n_ctx=max(len(s) for s in seqs) + 1) as m:
        return [m.routing_trace(s, weights=True) for s in seqs]


def replay_setup(st: Path) -> dict:
    """What replay.replay_run needs of a store, as the engine reads it: plane sizes, the planes of
    the lowest width, NAEE's betas (calibration.json) and the transcoded size of a full-width expert."""
    from ..quant.nested import SCHEMES

    reader = store.StoreReader(st)
    try:
        scheme = SCHEMES[reader.scheme_name](reader.bits, reader.group)
        cal = Calibration.load(st, reader.n_layer)
        return dict(
            plane_sizes=[reader.plane_size(p) for p in range(reader.n_planes)],
            low_planes=scheme.planes_for(scheme.widths[0]),
            betas=cal.betas if cal is not None else None,
            full_bytes=streaming.transcoded_bytes(reader),
        )
    finally:
        reader.close()


def predict(prof: Profile, mb: dict, replay: dict) -> float:
    """Performance model: decoded tokens per second from a replay of the run's routing through the
    expert cache (replay.replay_run: the quality's skipping and widths, the store's plane sizes, the
    run's cache capacity). Time per token = compute (the dense bytes and the used experts' bytes at
    their widths, over the profile's memory bandwidth) + reads (the bytes read over its sequential
    read bandwidth, plus one read latency per read). Nothing in it is fitted to a measured run."""
    n = max(replay["tokens"], 1)
    compute = (n * mb["dense"] + replay["expert_bytes_used"]) / (prof.memory_bandwidth_gbps * 1e9)
    io = (
        replay["read_bytes"] / (prof.storage.seq_read_mbps * 1e6)
        + replay["reads"] * prof.storage.read_latency_us * 1e-6
    )
    return n / (compute + io)


def smbu(active_bytes: float, tps: float, prof: Profile) -> float:
    return active_bytes * tps / (prof.memory_bandwidth_gbps * 1e9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="edgemoe bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", type=Path, help="GGUF model")
    ap.add_argument("--profile", required=True, help="device profile to emulate")
    ap.add_argument("--budgets", default="0.4", help="budgets as fractions of the GGUF size (default 0.4)")
    ap.add_argument(
        "--quality",
        action="append",
        default=None,
        metavar="Q",
        help=f"edgemoe quality: {DEFAULT} (the default; lossless), or opt-in lossy ones (balanced, fast, "
        "thresholds 'high,low[,naee]'); repeat to run several at every budget, e.g. --quality max "
        "--quality fast. Each is priced against max: decode-time KL divergence, top-1 agreement with "
        "max, greedy-token agreement with llama.cpp",
    )
    ap.add_argument("--prefetch", action="store_true", help="edgemoe: prefetch the next layer's experts")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--engines", default="llama.cpp,edgemoe")
    ap.add_argument("--no-throttle", action="store_true", help="no read throttle (this machine's storage speed)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the JSON and PNG")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the readahead is restored
    if not args.model.is_file():
        raise EdgeMoEError(f"{args.model}: no such GGUF file")
    prof = load_profile(args.profile)
    qualities = list(dict.fromkeys(args.quality or [DEFAULT]))
    for q in qualities:
        parse_quality(q)  # a bad name is an error now, not after the first runs
    size = args.model.stat().st_size
    st = ensure_store(args.model)
    device, disk = cgroup.block_device_of(st)
    bps = None if args.no_throttle else int(prof.storage.seq_read_mbps * 1e6)
    mb = model_bytes(args.model)
    from .replay import locality, replay_belady, replay_run, requests

    rows = []
    with cgroup.readahead(disk, prof.storage.readahead_kb):
        for frac in (float(f) for f in args.budgets.split(",")):
            budget = int(frac * size)
            for engine, quality in [
                (e, q) for e in args.engines.split(",") for q in (qualities if e == "edgemoe" else [None])
            ]:
                cgroup.drop_caches()
                extra = (
                    ["--budget", str(budget), "--quality", quality] + (["--prefetch"] if args.prefetch else [])
                    if engine == "edgemoe"
                    else []
                )
                path = str(st if engine == "edgemoe" else args.model)
                # the cap also holds what edgemoe's budget does not count (the interpreter and the
                # libraries' pages, the RSS before `import edgemoe`): both engines get that slack
                with cgroup.limits(mem_bytes=budget + CAP_SLACK, read_bps=bps, device=device) as cgs:
                    r = run_engine(engine, path, args, extra, cgs)
                r.update(fraction=frac, budget=budget)
                if engine == "edgemoe":
                    r.setdefault("quality", quality)
                if "failed" not in r:
                    n_dec = max(len(r["tokens"]) - 1, 1)
                    r["mb_read_per_token"] = r["decode_read"] / n_dec / 1e6
                    r["s_mbu"] = smbu(mb["active"], r["decode_tps"], prof)
                    r["peak_over_budget"] = (r["peak_rss"] - r["base_rss"]) / budget
                rows.append(r)
                print(_row(r), file=sys.stderr, flush=True)
    # routing traces, after the runs (the model is loaded once, outside the capped runs): the
    # model's own on OWN_SEQS sequences of random tokens as long as a run's, and for each edgemoe
    # run the same trace as the run (its prompt, then the tokens it generated and fed back) for the
    # Belady oracle and the prediction
    prompt = prompt_ids(mb["n_vocab"], args.prompt_tokens)
    runs = [r for r in rows if r["engine"] == "edgemoe" and "cache_capacity" in r]
    own = [tuple(prompt_ids(mb["n_vocab"], args.prompt_tokens + args.decode_tokens, seed)) for seed in range(OWN_SEQS)]
    seqs = list(dict.fromkeys(own + [tuple(prompt + r["tokens"][:-1]) for r in runs]))
    traces = dict(zip(seqs, routings(args.model, [list(q) for q in seqs])))
    loc = locality([traces[q][0] for q in own], mb["n_expert"])
    setup = replay_setup(st)
    for r in runs:
        top, w = traces[tuple(prompt + r["tokens"][:-1])]
        dec = top[args.prompt_tokens :]
        slots = max(mb["top_k"], r["cache_capacity"] // max(mb["expert"], 1))
        # Belady on the run's whole routing, warmed by the prompt, counted over the decode as the run is
        warm = len(requests(top[: args.prompt_tokens]))
        r["belady_mb_per_token"] = replay_belady(requests(top), slots, warm) * mb["expert"] / len(dec) / 1e6
        r["run_locality"] = locality(dec, mb["n_expert"])
        rep = replay_run(
            top,
            w,
            capacity=r["cache_capacity"],
            quality=parse_quality(r["quality"]),
            prompt=args.prompt_tokens,
            **setup,
        )
        r["predicted_tps"] = predict(prof, mb, rep)
        r["predicted_mb_per_token"] = rep["read_bytes"] / max(rep["tokens"], 1) / 1e6
    cost = price_qualities(st, rows, prompt, args.prefetch)
    report = _report(args, prof, size, st, mb, loc, rows, cost)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.model.stem}-{prof.name}"
    data = dict(
        model=str(args.model),
        file_bytes=size,
        profile=prof.name,
        machine=machine(),
        when=time.time(),
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        qualities=qualities,
        quality_cost=cost,
        locality=loc,
        model_bytes=mb,
        rows=rows,
        throttle_bps=bps,
    )
    write_text_atomic(args.out / (stem + ".json"), json.dumps(data, indent=1))
    (args.out / (stem + ".txt")).write_text(report + "\n")
    measured = {r["quality"]: r for r in rows if r["engine"] == "edgemoe" and "lossless" in r}  # one per quality
    _plot(
        rows,
        args.out / (stem + ".png"),
        f"{args.model.name} on {prof.name}; edgemoe at {', '.join(map(_quality_label, measured.values()))}",
    )
    return 0


def price_qualities(st: Path, rows: list[dict], prompt: list[int], prefetch: bool = False) -> dict:
    """Each edgemoe run's quality priced against max on the same store (evaluate.quality_costs):
    each run's quality loaded fresh at the run's budget, max without a budget; the token sequence
    is the prompt then llama.cpp's greedy continuation (without a llama.cpp run: the first
    lossless edgemoe run's, else the first run's), fed one at a time. Adds kl_median, kl_p99,
    kl_mean, kl_max, top1_vs_max and greedy_vs_llamacpp (None without a llama.cpp run) to each
    run's row; returns what was measured on."""
    runs = [r for r in rows if r["engine"] == "edgemoe" and "failed" not in r]
    if not runs:
        return {}
    llama = next((r for r in rows if r["engine"] == "llama.cpp" and "failed" not in r), None)
    source = llama or next((r for r in runs if r.get("lossless")), runs[0])
    cont = list(source["tokens"])
    fed = list(prompt) + cont[:-1]  # position i predicts token i + 1: the last token needs no step
    targets = [-1] * (len(prompt) - 1) + cont if llama is not None else None
    losses = evaluate.quality_costs(
        st,
        fed,
        [dict(quality=r["quality"], memory_budget=r["budget"]) for r in runs],
        targets=targets,
        prefetch=prefetch,
    )
    for r, loss in zip(runs, losses):
        r.update(
            kl_median=loss.kl_median,
            kl_p99=loss.kl_p99,
            kl_mean=loss.kl_mean,
            kl_max=loss.kl_max,
            top1_vs_max=loss.top1_vs_max,
            greedy_vs_llamacpp=loss.reference_agreement,
            kl_positions=loss.positions,
        )
    return dict(
        positions=len(fed),
        continuation="llama.cpp greedy" if llama is not None else f"edgemoe {source['quality']} greedy",
        greedy_positions=len(cont) if llama is not None else 0,
        method="tokens fed one at a time from a fresh context (teacher-forced decode), each run's quality "
        "at the run's budget against max without a budget; KL(max || quality) in nats per position",
    )


def _quality_label(r: dict) -> str:
    return quality_label(r["quality"], bool(r.get("lossless")))


def _calibration(mb: dict) -> str:
    """What tools/make_bench_model.py calibrated the file's routing to, when it did."""
    target = mb.get("reuse_target")
    if not target:
        return ""
    return (
        f"; the file was calibrated to a trained model's reuse (tools/make_bench_model.py): target "
        f"{np.mean(target):.1%} averaged over layers, {np.mean(mb['reuse_calibrated']):.1%} reached on its "
        f"calibration tokens"
    )


def _kl(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _row(r: dict) -> str:
    head = (
        f"{r['fraction']:>5.0%} {r['budget'] / 2**20:>7.0f} MiB {r['engine']:<10} {r.get('quality', '-'):<10} "
        f"{('yes' if r['lossless'] else 'no') if 'lossless' in r else '-':>8}"
    )
    if "failed" in r:
        return f"{head} failed: {r['failed']}"
    hit = f"{r['hit_rate']:.1%}" if "hit_rate" in r else "-"
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


def _report(
    args, prof: Profile, size: int, st: Path, mb: dict, loc: dict, rows: list[dict], cost: dict | None = None
) -> str:
    lines = [
        f"model {args.model.name} ({size / 2**20:.0f} MiB GGUF, store {st.name}); device {prof.name}: "
        f"reads {'unthrottled' if args.no_throttle else f'{prof.storage.seq_read_mbps:g} MB/s'}, readahead "
        f"{prof.storage.readahead_kb} KB, memory bandwidth {prof.memory_bandwidth_gbps:g} GB/s (profile); "
        f"{args.threads} threads; prompt {args.prompt_tokens}, decode {args.decode_tokens} tokens; machine {machine()}",
        f"routing of this GGUF ({loc['tokens']} random tokens in {OWN_SEQS} sequences): top-1/8 experts take "
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
    lines += [_row(r) for r in rows]
    for r in rows:
        if r["engine"] != "edgemoe" or "failed" in r:
            continue
        l = _llama_row(rows, r["fraction"])
        if l is not None and "failed" not in l:
            lines.append(
                f"{r['fraction']:.0%}, {_quality_label(r)}: edgemoe/llama.cpp decode "
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
            f"  budget {r['fraction']:.0%}, {_quality_label(r)}: decode vs llama.cpp >= 3x: "
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


def _plot(rows: list[dict], path: Path, title: str) -> None:
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
        label = "llama.cpp (GGUF)" if q is None else f"edgemoe {_quality_label(next(p for p in pts if p))}"
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
