#!/usr/bin/env python3
"""Crash safety of `edgemoe convert`: SIGKILL it at random points and check what is left.

    python tools/crash_convert.py [--kills 200] [--seed 1] [--work DIR]

Each trial runs `python -m edgemoe convert SRC -o DST --force` in a subprocess and kills it with
SIGKILL after a random delay within one conversion's run time (measured first). After each kill DST
must be absent or a complete store that edgemoe.store.verify accepts (the previous store, or the new one);
the temp directories of killed conversions must not break later ones (edgemoe.store.convert removes the
`.DST.tmp-PID` directories whose pid is dead). At the end one conversion runs to completion, and
`edgemoe verify DST` must accept it. Prints a JSON summary; exit 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ~2 s to convert on 2 shared cores: kills land in every phase (start-up, dense, shards, rename)
SPEC = dict(n_embd=128, n_ff_exp=128, n_expert=16, n_layer=4, dtype="F32")


def make_source(work: Path) -> Path:
    from edgemoe.testing import synth

    return synth.write_model(synth.SynthSpec.tiny("qwen3moe", **SPEC), work / "src.gguf")


def convert_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "edgemoe", "convert", str(src), "-o", str(dst), "--force"]


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def run(kills: int, seed: int, work: Path, log=None) -> dict:
    from edgemoe.store.verify import verify

    rng = random.Random(seed)
    src = make_source(work)
    dst = work / "store.edgemoe"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    subprocess.run(convert_cmd(src, work / "timing.edgemoe"), check=True, capture_output=True, env=env)
    duration = time.monotonic() - t0
    shutil.rmtree(work / "timing.edgemoe")
    res = dict(
        kills=0,
        finished_before_kill=0,
        dst_absent=0,
        dst_verified=0,
        failures=[],
        convert_seconds=round(duration, 2),
        kill_delays=[],
        max_stale_temps=0,
    )
    for i in range(kills):
        delay = rng.uniform(0.0, duration * 1.1)
        p = subprocess.Popen(convert_cmd(src, dst), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            p.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            finished = False
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        p.stderr.close()
        res["kills"] += not finished
        res["finished_before_kill"] += finished
        res["kill_delays"].append(round(delay, 3))
        if finished and p.returncode != 0:
            res["failures"].append(f"trial {i}: conversion failed on its own (exit {p.returncode}): {err[-300:]}")
        if not dst.exists():
            res["dst_absent"] += 1
        else:
            rep = verify(dst)
            if rep.ok:
                res["dst_verified"] += 1
            else:
                res["failures"].append(f"trial {i}: killed after {delay:.3f} s, DST is damaged: {rep.damages[:3]}")
        stale = [n for n in leftovers(dst) if ".tmp-" in n]
        res["max_stale_temps"] = max(res["max_stale_temps"], len(stale))
        if log:
            print(
                f"trial {i}: {'finished' if finished else f'killed at {delay:.3f} s'}, DST "
                f"{'absent' if not dst.exists() else 'ok'}, leftovers {leftovers(dst)}",
                file=log,
                flush=True,
            )
    # a last conversion to completion: the killed ones' temp directories must not get in its way
    before = leftovers(dst)
    r = subprocess.run(convert_cmd(src, dst), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        res["failures"].append(f"final conversion failed: {r.stderr[-300:]}")
    v = subprocess.run([sys.executable, "-m", "edgemoe", "verify", str(dst)], capture_output=True, text=True, env=env)
    res["final_verify_exit"] = v.returncode
    res["final_verify"] = v.stdout.strip().splitlines()[-1] if v.stdout.strip() else v.stderr.strip()
    if v.returncode != 0:
        res["failures"].append(f"edgemoe verify of the final store: exit {v.returncode}: {v.stdout[-300:]}")
    after = leftovers(dst)
    res["leftovers_before_final"] = before
    res["leftovers_after_final"] = after
    stale_tmp = [n for n in after if ".tmp-" in n]
    if stale_tmp:
        res["failures"].append(f"temp directories of killed conversions left after a later one: {stale_tmp}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per trial on stderr")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crash-convert-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(args.kills, args.seed, work, sys.stderr if args.verbose else None)
    delays = res.pop("kill_delays")
    res["kill_delay_range_s"] = [min(delays), max(delays)] if delays else []
    print(json.dumps(res, indent=1))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
