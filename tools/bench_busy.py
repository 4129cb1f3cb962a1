"""Decode speed with one core kept busy: edgemoe and llama-cpp-python on the bundled model, quiet and
beside a CPU hog pinned to one core (issue 17: a busy core must cost at most its share).

    python tools/bench_busy.py [--tokens 200] [--seconds 3] [--repeats 2] [--threads default,1,2,old]

For each thread setting and each engine, one process loads the model (models/shakespeare-moe.gguf
unless -m), warms up, decodes greedily (ignore EOS) quiet, then again while a spinning process pinned
to the last core of this process's affinity set runs beside it (--repeats times, alternated; the
best of each is kept). A phase stops after --tokens tokens or --seconds seconds, whichever comes
first, and reports the tokens it decoded per second.
"default" leaves each engine its own default thread count (edgemoe: kernels.THREADS;
llama-cpp-python: Llama's n_threads); a number sets both (edgemoe through EDGEMOE_THREADS, so the
script runs the same on versions without load(threads=)). "old" (edgemoe only) reproduces the
behaviour before issue 17: every core, every product forked, libgomp's default spinning waits
(EDGEMOE_THREADS=cpu_count, EDGEMOE_PARALLEL_MIN_BYTES=0, GOMP_SPINCOUNT=300000). Prints the machine
line and a table: tok/s quiet, busy, and busy / quiet. Takes 1.5-2.5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-moe.gguf"
PROMPT = [0, 464, 1160, 286, 262, 3290, 318, 257]  # a few ids; the decode, not the prompt, is timed
HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def start_hog() -> subprocess.Popen:
    core = max(os.sched_getaffinity(0))
    p = subprocess.Popen([sys.executable, "-c", HOG, str(core)])
    time.sleep(0.3)  # let it start spinning
    return p


def timed(step, first, tokens: int, seconds: float) -> float:
    """tok/s of `step` (one decode step from the last token) for up to tokens / seconds."""
    tok, n, t0 = first, 0, time.perf_counter()
    while n < tokens and time.perf_counter() - t0 < seconds:
        tok = step(tok)
        n += 1
    return n / (time.perf_counter() - t0)


def edgemoe_stepper(model: str, n_ctx: int):
    import edgemoe
    from edgemoe.quant import kernels

    m = edgemoe.load(model, n_ctx=n_ctx, progress=False)

    def phase(tokens: int, seconds: float) -> float:
        it = m.stream(PROMPT, max_tokens=tokens + 1, temperature=0, ignore_eos=True)
        first = next(it)  # the prompt, not timed
        rate = timed(lambda _tok: next(it).token, first.token, tokens, seconds)
        it.close()
        return rate

    return phase, kernels.THREADS


def llama_stepper(model: str, n_ctx: int, threads: int | None):
    import llama_cpp
    import numpy as np

    from edgemoe.runtime import llama_ref

    kw = {} if threads is None else dict(n_threads=threads, n_threads_batch=threads)
    llm = llama_ref.llama(model, n_ctx=n_ctx, **kw)
    n_vocab = llm.n_vocab()

    def step(tok: int) -> int:
        llm.eval([tok])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def phase(tokens: int, seconds: float) -> float:
        llm.reset()
        llm.eval(PROMPT)
        return timed(step, int(PROMPT[-1]), tokens, seconds)

    return phase, llm.n_threads


def worker(a: argparse.Namespace) -> None:
    threads = None if a.worker_threads == "default" else int(a.worker_threads)
    n_ctx = len(PROMPT) + a.tokens + 16
    if a.worker == "edgemoe":
        phase, used = edgemoe_stepper(a.model, n_ctx)
    else:
        phase, used = llama_stepper(a.model, n_ctx, threads)
    phase(8, 10.0)  # warm-up: kernels compiled / loaded, caches filled
    quiet, busy = [], []
    for _ in range(a.repeats):  # alternated, best of each: other processes' noise only slows a phase
        quiet.append(phase(a.tokens, a.seconds))
        hog = start_hog()
        try:
            busy.append(phase(a.tokens, a.seconds))
        finally:
            hog.kill()
            hog.wait()
    print("RESULT " + json.dumps(dict(threads=used, quiet=max(quiet), busy=max(busy))), flush=True)


def run_worker(engine: str, threads: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("EDGEMOE_THREADS", None)
    if threads == "old":
        env.update(EDGEMOE_THREADS=str(os.cpu_count()), EDGEMOE_PARALLEL_MIN_BYTES="0", GOMP_SPINCOUNT="300000")
        threads = "default"
    elif engine == "edgemoe" and threads != "default":
        env["EDGEMOE_THREADS"] = threads
    cmd = [sys.executable, __file__, "--worker", engine, "--worker-threads", threads, "-m", a.model]
    cmd += ["--tokens", str(a.tokens), "--seconds", str(a.seconds), "--repeats", str(a.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{engine} threads={threads} failed:\n{out.stderr[-2000:]}")


def machine_line() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {cpu}, {psutil.cpu_count(logical=False)} physical / {os.cpu_count()} logical cores, "
        f"affinity {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, load average {load}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(MODEL))
    ap.add_argument("--tokens", type=int, default=200, help="tokens per phase at most (default 200)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per phase at most (default 3)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="quiet and busy phases, alternated; best of each (default 2)"
    )
    ap.add_argument(
        "--threads", default="default,1,2,old", help="thread settings, comma-separated (default default,1,2,old)"
    )
    ap.add_argument("--worker", choices=["edgemoe", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-threads", default="default", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    print(machine_line(), flush=True)
    print(f"{'engine':<10} {'threads':>8} {'quiet tok/s':>12} {'busy tok/s':>11} {'busy/quiet':>11}", flush=True)
    for threads in (t.strip() for t in a.threads.split(",")):
        for engine in ("edgemoe",) if threads == "old" else ("edgemoe", "llama.cpp"):
            r = run_worker(engine, threads, a)
            label = threads + (f" ({r['threads']})" if threads in ("default", "old") else "")
            ratio = r["busy"] / r["quiet"] if r["quiet"] else float("nan")
            print(f"{engine:<10} {label:>8} {r['quiet']:12.1f} {r['busy']:11.1f} {ratio:11.2f}", flush=True)
    print(f"after: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
