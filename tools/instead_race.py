#!/usr/bin/env python3
"""The speed half of "what a user could run instead" (issue 18, part 3): llama.cpp on smaller
quantizations of the benchmark model against edgemoe's quality presets on its Q4_K_M file, at the
same memory, on the same emulated device; plotted as tok/s against the KL each setting costs.

    python tools/instead_race.py --profile emmc-sbc-4gb [--model BENCH-Q4_K_M.gguf]
        [--source BENCH-Q4_0.gguf] [--budget 0.4] [--types Q3_K_L,Q3_K_M,Q3_K_S,Q2_K]
        [--quality max,balanced,fast] [--edgemoe-on Q3_K_M,Q3_K_S,Q2_K] [--threads 2]
        [--kl docs/instead_table.json] [--out docs/instead_race.json]

The benchmark model (tools/make_bench_model.py --shape olmoe-1b-7b --type Q4_K_M; random weights,
routing calibrated to the bundled model's) gives the speed; its smaller files are made from its
Q4_0 source by llama.cpp's quantizer (allow_requantize; cached beside it). The memory is the
budget as a fraction of the Q4_K_M file: every run, llama.cpp on each file memory-mapped and
edgemoe on the Q4_K_M file's store at each quality, runs in its own process in a memory cgroup
capped there (+64 MiB for the interpreter, as `edgemoe bench` does), under the profile's read
throttle and readahead, from a cold page cache, with the same threads (edgemoe.devices.bench's
runner). The KL of each setting comes from the bundled model, where the weights are trained
(tools/instead_table.py's JSON: llama.cpp's file of the same type against the Q4_K_M file, and
edgemoe's preset with an expert cache of 40% of the experts), and the speed from the benchmark
model at the same type or preset. A smaller file is also a choice for edgemoe: --edgemoe-on runs
its store at `max` (that file's model, exactly) under the same memory, at that file's KL.

The verdict per llama.cpp file: the fastest edgemoe setting whose KL is at most that file's
(`max` on the Q4_K_M file is lossless and qualifies everywhere; `max` on a smaller file qualifies at
that file's KL and above), and its speed against the file's; the goal is 1.5x.
Writes the JSON and a PNG beside it (tok/s against median KL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgemoe.devices import cgroup  # noqa: E402
from edgemoe.devices.bench import CAP_SLACK, ensure_store, run_engine  # noqa: E402
from edgemoe.devices.bench_report import machine  # noqa: E402
from edgemoe.devices.profiles import load_profile  # noqa: E402
from edgemoe.testing.synth import quantize_model  # noqa: E402

BENCH = Path.home() / ".cache" / "edgemoe" / "bench-models"
TYPES = "Q3_K_L,Q3_K_M,Q3_K_S,Q2_K"
GOAL = 1.5
KL_FLOOR = 1e-6  # where a lossless setting sits on the plot's log axis


def smaller_file(source: Path, model: Path, qtype: str) -> Path:
    """The benchmark model in `qtype`, made from its Q4_0 source once and kept beside the model."""
    path = model.with_name(model.name.replace("Q4_K_M", qtype))
    if path == model:
        raise SystemExit(f"{model}: the model's name must contain Q4_K_M")
    if not path.exists():
        print(f"quantizing {source.name} to {qtype} ...", file=sys.stderr, flush=True)
        quantize_model(source, path, qtype, requantize=True)
    return path


def kl_of(table: dict) -> dict[str, dict]:
    """{setting: row} from tools/instead_table.py's JSON: llama.cpp files by type ('Q4_K_M' for the
    reference file), edgemoe presets by quality."""
    out = {}
    for r in table["rows"]:
        if "refused" in r:
            continue
        if r["engine"] == "llama.cpp":
            out[r["file"].split(" ")[0]] = r
        else:
            out["edgemoe " + r["quality"]] = r
    return out


def verdicts(rows: list[dict]) -> list[dict]:
    """For each llama.cpp file: the fastest edgemoe setting at most as lossy, and the ratio."""
    ours = [r for r in rows if r["engine"] == "edgemoe" and "decode_tps" in r]
    out = []
    for f in (r for r in rows if r["engine"] == "llama.cpp" and "decode_tps" in r):
        fit = [r for r in ours if r["lossless"] or r["kl_median"] <= f["kl_median"]]
        best = max(fit, key=lambda r: r["decode_tps"], default=None)
        v = dict(file=f["setting"], file_tps=f["decode_tps"], file_kl=f["kl_median"])
        if best is not None:
            ratio = best["decode_tps"] / f["decode_tps"]
            v.update(edgemoe=best["setting"], edgemoe_tps=best["decode_tps"], ratio=ratio, met=ratio >= GOAL)
        out.append(v)
    return out


def report(rows: list[dict], vs: list[dict], memory: int) -> None:
    """The two tables: every run, and the verdict per llama.cpp file."""
    print(
        "| engine | file / setting | file MB | decode tok/s | prefill tok/s | MB read/token | peak RSS / memory "
        "| median KL (bundled) | top-1 (bundled) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "decode_tps" not in r:
            print(f"| {r['engine']} | {r['setting']} | {r['file_bytes'] / 1e6:.0f} | {r.get('failed')} | | | | | |")
            continue
        n_dec = max(len(r["tokens"]) - 1, 1)
        print(
            f"| {r['engine']} | {r['setting'].replace('edgemoe ', '')} | {r['file_bytes'] / 1e6:.0f} "
            f"| {r['decode_tps']:.2f} | {r['prompt_tps']:.2f} | {r['decode_read'] / n_dec / 1e6:.1f} "
            f"| {(r['peak_rss'] - r['base_rss']) / memory:.2f} | {r['kl_median']:.1e} | {r['top1']:.1%} |"
        )
    print(
        f"\n| llama.cpp file | its tok/s | its KL | fastest edgemoe at most as lossy | tok/s | ratio (goal {GOAL}x) |"
    )
    print("|---|---|---|---|---|---|")
    for v in vs:
        print(
            f"| {v['file']} | {v['file_tps']:.2f} | {v['file_kl']:.1e} "
            f"| {v.get('edgemoe', '-').replace('edgemoe ', '')} "
            f"| {v.get('edgemoe_tps', 0):.2f} | {v.get('ratio', 0):.2f}x {'met' if v.get('met') else 'missed'} |"
        )


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, marker in (("llama.cpp", "s"), ("edgemoe", "o")):
        pts = [r for r in rows if r["engine"] == engine and "decode_tps" in r]
        xs = [KL_FLOOR if r["lossless"] else max(r["kl_median"], KL_FLOOR) for r in pts]
        ax.plot(xs, [r["decode_tps"] for r in pts], marker, label=engine, markersize=7)
        for x, r in zip(xs, pts):
            ax.annotate(
                r["setting"].replace("edgemoe ", ""),
                (x, r["decode_tps"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"median KL against Q4_K_M, bundled model (lossless at {KL_FLOOR:g})")
    ax.set_ylabel("decode tok/s, benchmark model")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="device profile to emulate (profiles/)")
    ap.add_argument("--model", type=Path, default=BENCH / "olmoe-1b-7b-Q4_K_M.gguf")
    ap.add_argument("--source", type=Path, default=None, help="the Q4_0 file the smaller ones are made from")
    ap.add_argument("--budget", type=float, default=0.4, help="memory as a fraction of the Q4_K_M file (0.4)")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--quality", default="max,balanced,fast")
    ap.add_argument("--edgemoe-on", default="Q3_K_M,Q3_K_S,Q2_K", help="smaller files edgemoe also runs, at max")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("-n", "--decode-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--kl", type=Path, default=ROOT / "docs" / "instead_table.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "instead_race.json")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cgroups and readahead are restored
    source = args.source or args.model.with_name(args.model.name.replace("Q4_K_M", "Q4_0"))
    for p in (args.model, source, args.kl):
        if not p.is_file():
            raise SystemExit(f"{p}: no such file")
    kl = kl_of(json.loads(args.kl.read_text()))
    prof = load_profile(args.profile)
    size = args.model.stat().st_size
    memory = int(args.budget * size)
    bps = int(prof.storage.seq_read_mbps * 1e6)

    # (setting, engine, path run, the GGUF it comes from, extra arguments, whose KL)
    files = {"Q4_K_M": args.model}
    files.update({t: smaller_file(source, args.model, t) for t in args.types.split(",") if t})
    runs = [(t, "llama.cpp", f, f, [], t) for t, f in files.items()]
    mem = ["--budget", str(memory)]
    runs += [
        (f"edgemoe {q}", "edgemoe", ensure_store(args.model), args.model, [*mem, "--quality", q], f"edgemoe {q}")
        for q in args.quality.split(",")
    ]
    for t in [t for t in args.edgemoe_on.split(",") if t]:
        if t not in files:
            raise SystemExit(f"--edgemoe-on {t}: not one of --types")
        runs.append((f"edgemoe max on {t}", "edgemoe", ensure_store(files[t]), files[t], [*mem, "--quality", "max"], t))
    for *_, k in runs:
        if k not in kl:
            raise SystemExit(f"{args.kl}: no KL for {k!r} (run tools/instead_table.py with that type)")

    device, disk = cgroup.block_device_of(args.model)
    rows = []
    with cgroup.readahead(disk, prof.storage.readahead_kb):
        for setting, engine, path, gguf_file, extra, k in runs:
            cgroup.drop_caches()
            with cgroup.limits(mem_bytes=memory + CAP_SLACK, read_bps=bps, device=device) as cgs:
                r = run_engine(engine, str(path), args, extra, cgs)
            r.update(
                setting=setting,
                file_bytes=gguf_file.stat().st_size,
                kl_median=kl[k]["kl_median"],
                kl_p99=kl[k]["kl_p99"],
                top1=kl[k]["top1"],
                lossless=setting in ("Q4_K_M", "edgemoe max"),
            )
            rows.append(r)
            tps = f"{r['decode_tps']:.2f} tok/s" if "decode_tps" in r else r.get("failed")
            print(f"{setting}: {tps}", file=sys.stderr, flush=True)

    title = (
        f"{args.model.name}, memory {args.budget:.0%} of it ({memory / 2**20:.0f} MiB), {prof.name}, "
        f"{args.threads} threads"
    )
    vs = verdicts(rows)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(
        json.dumps(
            dict(
                title=title,
                machine=machine(),
                profile=prof.name,
                budget=args.budget,
                memory=memory,
                threads=args.threads,
                rows=rows,
                verdicts=vs,
            ),
            indent=1,
            default=str,
        )
    )
    os.replace(tmp, args.out)
    print(f"\n{title}; {machine()}\n")
    report(rows, vs, memory)
    plot(rows, title, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
