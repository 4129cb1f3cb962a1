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
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..fileio import write_text_atomic
from ..options import Parser, add_threads_option
from ..quant.threads import env_threads
from ..quant.transcode import transcoded_bytes
from ..runtime import evaluate
from ..runtime.policy import DEFAULT, Calibration, parse_quality
from ..store import catalog
from ..store import reader as store
from . import cgroup
from .bench_report import machine, plot, report, row, run_label
from .benchrun import prompt_ids
from .perf_model import predict
from .profiles import Profile, load_profile
from .replay import locality, replay_belady, replay_run, requests

CAP_SLACK = 64 * 1024 * 1024
OWN_SEQS = 8  # random-token sequences whose routing the bench reports as the model's own


def ensure_store(model: Path, progress: bool = True) -> Path:
    from ..store.convert import convert

    found, fp = catalog.find_store(model)
    if found is not None:
        return found
    dst = catalog.cache_store(model, fp)
    print(f"edgemoe: converting {model.name} into {dst}", file=sys.stderr)
    return convert(model, dst, progress=progress)


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
        *(["--ctx", str(args.ctx)] if getattr(args, "ctx", None) else []),
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
    for fig in ("reuse", "entropy", "top1"):  # written by tools/make_bench_model.py
        for key in (f"{fig}_target", f"{fig}_calibrated"):
            if f.get("edgemoe.devices.bench." + key) is not None:
                out[key] = [float(x) for x in f.get("edgemoe.devices.bench." + key)]
    if f.get("edgemoe.devices.bench.routing_source") is not None:
        out["routing_source"] = str(f.get("edgemoe.devices.bench.routing_source"))
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
    reader = store.StoreReader(st)
    try:
        cal = Calibration.load(st, reader.n_layer)
        return dict(
            plane_sizes=[reader.plane_sizes(i) for i in range(reader.n_layer)],
            low_planes=1,
            betas=cal.betas if cal is not None else None,
            full_bytes=transcoded_bytes(reader),
        )
    finally:
        reader.close()


def smbu(active_bytes: float, tps: float, prof: Profile) -> float:
    return active_bytes * tps / (prof.memory_bandwidth_gbps * 1e9)


def _parser() -> argparse.ArgumentParser:
    ap = Parser(prog="edgemoe bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("-n", "--decode-tokens", type=int, default=16, help="tokens to decode per run (default 16)")
    ap.add_argument(
        "--ctx",
        type=int,
        default=None,
        help="context size of both engines (default: the prompt and decoded tokens + 8; a chat's is "
        "4096, whose KV cache edgemoe's expert cache borrows until the context fills)",
    )
    add_threads_option(ap, "threads for both engines")
    ap.add_argument("--engines", default="llama.cpp,edgemoe")
    ap.add_argument("--no-throttle", action="store_true", help="no read throttle (this machine's storage speed)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the JSON and PNG")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.threads = args.threads or env_threads()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the readahead is restored
    if not args.model.is_file():
        raise EdgeMoEError(f"{args.model}: no such GGUF file")
    prof = load_profile(args.profile)
    qualities = list(dict.fromkeys(args.quality or [DEFAULT]))
    for q in qualities:
        parse_quality(q)  # a bad name is an error now, not after the first runs
    size = args.model.stat().st_size
    st = ensure_store(args.model)
    bps = None if args.no_throttle else int(prof.storage.seq_read_mbps * 1e6)
    mb = model_bytes(args.model)
    rows = _run_budgets(args, prof, st, size, qualities, bps, mb)
    prompt = prompt_ids(mb["n_vocab"], args.prompt_tokens)
    loc = _replay_runs(args, prof, st, mb, rows, prompt)
    cost = price_qualities(st, rows, prompt, args.prefetch)
    text = report(args, prof, size, st, mb, loc, rows, cost, OWN_SEQS)
    print(text)
    results = dict(qualities=qualities, quality_cost=cost, locality=loc, model_bytes=mb, rows=rows, throttle_bps=bps)
    _write(args, prof, size, text, results)
    return 0


def _run_budgets(
    args, prof: Profile, st: Path, size: int, qualities: list[str], bps: int | None, mb: dict
) -> list[dict]:
    """Every budget, every engine (edgemoe at each quality), each in its own process capped at the
    budget, from a cold page cache, under the profile's read throttle and readahead: their rows,
    each printed as it ends."""
    device, disk = cgroup.block_device_of(st)
    runs = [(e, q) for e in args.engines.split(",") for q in (qualities if e == "edgemoe" else [None])]
    rows = []
    with cgroup.readahead(disk, prof.storage.readahead_kb):
        for frac in (float(f) for f in args.budgets.split(",")):
            budget = int(frac * size)
            for engine, quality in runs:
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
                print(row(r), file=sys.stderr, flush=True)
    return rows


def _replay_runs(args, prof: Profile, st: Path, mb: dict, rows: list[dict], prompt: list[int]) -> dict:
    """Routing traces, after the runs (the model is loaded once, outside the capped runs): the
    model's own on OWN_SEQS sequences of random tokens as long as a run's, whose locality it
    returns, and for each edgemoe run the same trace as the run (its prompt, then the tokens it
    generated and fed back) for the Belady oracle and the prediction (perf_model.predict), which it
    adds to the run's row."""
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
        # per decoded token: the dense weights and the used experts at their widths; the replay's reads
        n = max(rep["tokens"], 1)
        pred = predict(prof, mb["dense"] + rep["expert_bytes_used"] / n, rep["read_bytes"] / n, rep["reads"] / n)
        r["predicted_tps"] = pred["tokens_per_s"]
        r["predicted_mb_per_token"] = pred["read_mb_per_token"]
    return loc


def _write(args, prof: Profile, size: int, text: str, results: dict) -> None:
    """The JSON (the setup, then results: the rows and what they were measured on), the text report
    and the PNG, into args.out."""
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
        **results,
    )
    write_text_atomic(args.out / (stem + ".json"), json.dumps(data, indent=1))
    (args.out / (stem + ".txt")).write_text(text + "\n")
    rows = results["rows"]
    measured = {r["quality"]: r for r in rows if r["engine"] == "edgemoe" and "lossless" in r}  # one per quality
    plot(
        rows,
        args.out / (stem + ".png"),
        f"{args.model.name} on {prof.name}; edgemoe at {', '.join(map(run_label, measured.values()))}",
    )


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
