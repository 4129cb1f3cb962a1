#!/usr/bin/env python3
"""edgemoe against llama.cpp (llama-cpp-python) on the same GGUF, side by side in one run.

Each engine runs in its own subprocess (so each peak RSS is its own) with the same threads,
prompt and greedy decode. Prints prompt and decode tokens/s, load time, peak RSS and the
post-import RSS baseline, and the edgemoe / llama.cpp ratios; --json saves them.

    python tools/bench_vs_llamacpp.py MODEL.gguf [--prompt-tokens 32] [--decode-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, os, sys, time
import numpy as np
engine, path, n_prompt, n_decode, threads, repack = sys.argv[1:7]
n_prompt, n_decode, threads = int(n_prompt), int(n_decode), int(threads)

def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

if engine == "edgemoe":
    os.environ["EDGEMOE_THREADS"] = str(threads)
    import edgemoe
    base = rss()
    t0 = time.perf_counter()
    m = edgemoe.load(path, n_ctx=n_prompt + n_decode + 8)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, m.config.n_vocab - 8, size=n_prompt).tolist()
    m.logits(ids[:4])  # warm-up: first-call compilation is not what we time
    t0 = time.perf_counter()
    rs = list(m.stream(ids, max_tokens=n_decode + 1, temperature=0, ignore_eos=True))
    s = m.stats()
    out = dict(load_s=load_s, prompt_tps=s.prompt_tokens_per_s, decode_tps=s.decode_tokens_per_s,
               tokens=[r.token for r in rs])
else:
    import llama_cpp
    base = rss()
    t0 = time.perf_counter()
    params = dict(model_path=path, n_ctx=n_prompt + n_decode + 8, n_threads=threads, n_threads_batch=threads,
                  n_batch=n_prompt, verbose=False)
    llm = llama_cpp.Llama(**params)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, llm.n_vocab() - 8, size=n_prompt).tolist()
    llm.eval(ids[:4]); llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    toks = []
    tok = int(np.argmax(last_logits()))
    toks.append(tok)
    t2 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        toks.append(tok)
    t3 = time.perf_counter()
    out = dict(load_s=load_s, prompt_tps=n_prompt / (t1 - t0), decode_tps=n_decode / (t3 - t2), tokens=toks)
out.update(engine=engine, base_rss=base, peak_rss=vmhwm())
print("RESULT " + json.dumps(out))
"""


def run_engine(engine: str, path: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, engine, path, str(args.prompt_tokens), str(args.decode_tokens),
         str(args.threads), "1"],
        capture_output=True, text=True, timeout=args.timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    size = os.path.getsize(args.model)
    res = {e: run_engine(e, args.model, args) for e in ("llama.cpp", "edgemoe")}
    mib = 1024 * 1024
    print(f"model {args.model}: {size / mib:.0f} MiB; {args.threads} threads; prompt {args.prompt_tokens} tokens, "
          f"greedy decode {args.decode_tokens} tokens; machine: {os.uname().machine}, {os.cpu_count()} cores")
    print(f"{'engine':<10} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13} {'peak RSS - base':>16} {'/ file':>7}")
    for e, r in res.items():
        used = r["peak_rss"] - r["base_rss"]
        print(f"{e:<10} {r['load_s']:>7.2f} {r['prompt_tps']:>13.2f} {r['decode_tps']:>13.2f} "
              f"{used / mib:>12.0f} MiB {used / size:>7.2f}")
    a, b = res["edgemoe"], res["llama.cpp"]
    print(f"ratio edgemoe/llama.cpp: prompt {a['prompt_tps'] / b['prompt_tps']:.2f}x, "
          f"decode {a['decode_tps'] / b['decode_tps']:.2f}x, peak RSS "
          f"{(a['peak_rss'] - a['base_rss']) / (b['peak_rss'] - b['base_rss']):.2f}x")
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    print(f"greedy tokens identical: {same}/{len(a['tokens'])}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(model=args.model, file_bytes=size, results=res, when=time.time()), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
