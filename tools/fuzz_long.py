#!/usr/bin/env python3
"""Long fuzzing runs, each input in a forked child (an abort inside llama.cpp or a hang is caught
and its input kept, where the in-process hypothesis tests would die with it).

    python tools/fuzz_long.py [--target gguf|manifest|shard|server|all] [--examples 5000] [--seed 1]
                              [--timeout 20] [--out fuzz-findings]
    python tools/fuzz_long.py --hypothesis 2000   # the tests/fuzz suite with 2000 examples per test

Prints per target: inputs tried, loaded/answered, rejected, and every distinct failure (exception
type and place, abort signal, hang) with the file that reproduces it under --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def _child(fn, arg, result_path: str) -> None:
    try:
        res = fn(arg)
        code, info = (0 if res == "ok" else 1), res
    except BaseException as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        code, info = 3, f"{type(exc).__name__} at {Path(tb.filename).name}:{tb.lineno}: {str(exc)[:300]}"
    Path(result_path).write_text(info)
    os._exit(code)


def run_isolated(fn, arg, timeout: float) -> tuple[str, str]:
    """(outcome, detail): outcome ok | rejected | bug | abort | hang."""
    fd, rpath = tempfile.mkstemp(prefix="fuzz-result-")
    os.close(fd)
    pid = os.fork()
    if pid == 0:
        _child(fn, arg, rpath)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.unlink(rpath)
            return "hang", f"no answer in {timeout:g} s"
        time.sleep(0.002)
    info = Path(rpath).read_text() if os.path.getsize(rpath) else ""
    os.unlink(rpath)
    if os.WIFSIGNALED(status):
        return "abort", f"killed by signal {os.WTERMSIG(status)}"
    return {0: "ok", 1: "rejected"}.get(os.WEXITSTATUS(status), "bug"), info


class Tally:
    def __init__(self, name: str, out: Path):
        self.name, self.out = name, out
        self.counts: collections.Counter = collections.Counter()
        self.findings: dict[str, str] = {}

    def add(self, outcome: str, detail: str, reproduce) -> None:
        self.counts[outcome] += 1
        if outcome in ("bug", "abort", "hang"):
            key = f"{outcome}: {detail.split(': ', 1)[0] if outcome == 'bug' else detail}"
            if key not in self.findings:
                self.out.mkdir(parents=True, exist_ok=True)
                dest = self.out / f"{self.name}-{len(self.findings) + 1}"
                reproduce(dest)
                self.findings[key] = f"{detail} -> {dest}"

    def report(self) -> dict:
        return {"target": self.name, "inputs": sum(self.counts.values()), **self.counts, "findings": self.findings}


# ---- targets ---------------------------------------------------------------------------------------


def fuzz_gguf(n: int, rng: random.Random, work: Path, tally: Tally, timeout: float) -> None:
    from fuzz.targets import INTERESTING, KINDS, Seed, check_gguf, mutate

    import edgemoe
    from edgemoe.testing import synth

    seed_path = synth.write_model(synth.SynthSpec.tiny("qwen3moe"), work / "seed.gguf")
    with edgemoe.load(seed_path, n_ctx=16) as m:  # compile the kernels once, before forking
        m.logits([1, 2])
    seed = Seed(seed_path.read_bytes())
    path = work / "input.gguf"
    for _ in range(n):
        muts = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(KINDS)
            value = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(2**64)
            muts.append((kind, rng.randrange(10**9), value))
        data = mutate(seed, muts)
        path.write_bytes(data)
        outcome, detail = run_isolated(check_gguf, path, timeout)
        tally.add(outcome, detail, lambda dest, data=data: dest.with_suffix(".gguf").write_bytes(data))


def _store_seed(work: Path) -> Path:
    from edgemoe.store.convert import convert
    from edgemoe.testing import synth

    src = synth.write_model(synth.SynthSpec.tiny("qwen3moe"), work / "seed.gguf")
    return convert(src, work / "seed.edgemoe", progress=False)


def fuzz_manifest(n: int, rng: random.Random, work: Path, tally: Tally, timeout: float, validate: bool = True) -> None:
    import shutil

    from fuzz.targets import DELETE, check_store, manifest_paths, set_path

    seed = _store_seed(work)
    manifest = json.loads((seed / "manifest.json").read_text())
    paths = list(manifest_paths(manifest))
    junk = [
        None,
        True,
        False,
        0,
        -1,
        1,
        2,
        3,
        7,
        2**31,
        2**63,
        2**64,
        -(2**63),
        1.5,
        float("nan"),
        "",
        "x",
        "matquant",
        [],
        [0],
        [1, 2, 3],
        {},
        {"a": 1},
        DELETE,
        "1e999",
        4096,
        10**12,
    ]
    root = work / "m.edgemoe"
    for _ in range(n):
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(seed, root)
        m = json.loads(json.dumps(manifest))
        for _ in range(rng.randint(1, 3)):
            p = rng.choice(paths)
            try:
                m = set_path(m, p, rng.choice(junk))
            except (KeyError, IndexError, TypeError):
                pass
        text = json.dumps(m) if rng.random() < 0.9 else json.dumps(m)[: rng.randrange(2000)]
        (root / "manifest.json").write_text(text)
        outcome, detail = run_isolated(lambda r: check_store(r, load_model=True, validate=validate), root, timeout)
        tally.add(outcome, detail, lambda dest: shutil.copytree(root, dest.with_suffix(".edgemoe")))


def fuzz_shard(n: int, rng: random.Random, work: Path, tally: Tally, timeout: float) -> None:
    import shutil

    from fuzz.targets import check_store

    seed = _store_seed(work)
    files = sorted(p.name for p in seed.iterdir())
    root = work / "s.edgemoe"
    for _ in range(n):
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(seed, root)
        name = rng.choice(files)
        f = root / name
        data = bytearray(f.read_bytes())
        action = rng.choice(["flip", "flip", "truncate", "delete", "zero"])
        if action == "flip" and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            f.write_bytes(data)
        elif action == "truncate":
            f.write_bytes(data[: rng.randrange(len(data) + 1)])
        elif action == "zero" and data:
            a = rng.randrange(len(data))
            data[a : a + rng.randint(1, 4096)] = bytes(len(data[a : a + rng.randint(1, 4096)]))
            f.write_bytes(data)
        elif action == "delete":
            f.unlink()
        outcome, detail = run_isolated(check_store, root, timeout)
        tally.add(outcome, detail, lambda dest: shutil.copytree(root, dest.with_suffix(".edgemoe")))


def fuzz_server(n: int, rng: random.Random, work: Path, tally: Tally, timeout: float) -> None:
    from fuzz.targets_server import random_body, send

    import edgemoe
    from edgemoe.serve.server import Server
    from edgemoe.testing import synth

    path = synth.write_model(synth.SynthSpec.tiny("qwen3moe"), work / "seed.gguf")
    with edgemoe.load(path, n_ctx=64) as model, Server(model, "127.0.0.1", 0, max_queue=4) as srv:
        srv.start()
        for _ in range(n):
            endpoint, body = random_body(rng)
            try:
                status, obj = send(srv.port, endpoint, body, timeout=timeout)
                ok = status < 500 and (status == 200 or (isinstance(obj, dict) and "error" in obj))
                outcome = ("ok" if status == 200 else "rejected") if ok else "bug"
                detail = f"HTTP {status}: {str(obj)[:200]} for {body[:200]!r}"
            except TimeoutError:
                outcome, detail = "hang", f"no answer in {timeout:g} s for {body[:200]!r}"
            tally.add(outcome, detail, lambda dest, body=body: dest.with_suffix(".json").write_bytes(body))


def fuzz_manifest_raw(n: int, rng: random.Random, work: Path, tally: Tally, timeout: float) -> None:
    """StoreReader on the manifest as store.py reads it today, without edgemoe.store.format.check_manifest."""
    fuzz_manifest(n, rng, work, tally, timeout, validate=False)


TARGETS = {
    "gguf": fuzz_gguf,
    "manifest": fuzz_manifest,
    "manifest-raw": fuzz_manifest_raw,
    "shard": fuzz_shard,
    "server": fuzz_server,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="all", choices=[*TARGETS, "all"])
    ap.add_argument("--examples", type=int, default=5000, help="inputs per target (default 5000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per input before it counts as a hang")
    ap.add_argument("--out", default="fuzz-findings", help="where reproducers of failures go")
    ap.add_argument(
        "--hypothesis",
        type=int,
        default=0,
        metavar="N",
        help="instead: run tests/fuzz with N examples per hypothesis test",
    )
    args = ap.parse_args(argv)
    if args.hypothesis:
        env = dict(os.environ, EDGEMOE_FUZZ_EXAMPLES=str(args.hypothesis))
        return subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "--timeout=0", str(ROOT / "tests" / "fuzz")],
            env=env,
            cwd=ROOT,
        )
    import warnings

    warnings.simplefilter("ignore")  # overflow warnings of mutated weights
    failed = False
    for name in [t for t in TARGETS if t != "manifest-raw"] if args.target == "all" else [args.target]:
        rng = random.Random(f"{args.seed}-{name}")
        tally = Tally(name, Path(args.out))
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
            TARGETS[name](args.examples, rng, Path(work), tally, args.timeout)
        rep = tally.report()
        rep["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(rep), flush=True)
        failed |= bool(tally.findings)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
