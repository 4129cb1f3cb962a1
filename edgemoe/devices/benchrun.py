"""One engine's benchmark run, in its own process: `python -m edgemoe.devices.benchrun ENGINE MODEL ...`.

Prints one line `RESULT {json}`: load time, prompt and decode tokens/s, greedy tokens, peak RSS
(VmHWM) and the RSS after imports, bytes read from storage (/proc/self/io read_bytes) during the
prompt and the decode, and for edgemoe the quality in force (and whether it is lossless) and the
expert cache figures. The benchmarks in tools/ run it
for llama.cpp and edgemoe side by side, under the same cgroup limits.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..quant.threads import env_threads
from ..runtime import llama_ref, memory
from ..runtime.stats import stats_to_dict

# what a bench row keeps of the expert cache's figures (edgemoe.runtime.stats.CacheStats)
BENCH_CACHE_FIELDS = (
    "hit_rate",
    "bytes_read",
    "misses",
    "hits",
    "evictions",
    "partial_hits",
    "io_stall_s",
    "cache_capacity",
    "skipped",
    "chosen",
    "uses_by_bits",
    "prefetch_issued",
    "prefetch_hits",
)


def prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """The bench's prompt: the same n random token ids for every engine and every run (seed 0;
    other seeds: more sequences of the same kind, for the routing statistics)."""
    return np.random.default_rng(seed).integers(0, n_vocab - 8, size=n).tolist()


def run_edgemoe(a: argparse.Namespace) -> dict:
    import edgemoe

    base = edgemoe.BASELINE_RSS
    t0 = time.perf_counter()
    m = edgemoe.load(
        a.model,
        memory_budget=a.budget,
        quality=a.quality,
        n_ctx=a.ctx or a.prompt_tokens + a.decode_tokens + 8,
        progress=False,
        prefetch=a.prefetch,
        threads=a.threads,
    )
    load_s = time.perf_counter() - t0
    ids = prompt_ids(m.config.n_vocab, a.prompt_tokens)
    r0 = memory.read_bytes()
    t0 = time.perf_counter()
    it = m.stream(ids, max_tokens=a.decode_tokens + 1, temperature=0, ignore_eos=True)
    first = next(it)
    ttft = time.perf_counter() - t0
    r1 = memory.read_bytes()
    rest = list(it)
    r2 = memory.read_bytes()
    s = m.stats()
    out = dict(
        load_s=load_s,
        prompt_tps=s.prompt_tokens_per_s,
        decode_tps=s.decode_tokens_per_s,
        tokens=[first.token] + [r.token for r in rest],
        base_rss=base,
        prompt_read=r1 - r0,
        decode_read=r2 - r1,
        ttft_s=ttft,
        quality=m.quality,
        lossless=s.lossless,
    )
    if s.cache is not None:  # the expert cache's figures, as stats_to_dict names them
        c = stats_to_dict(s)["cache"]
        out.update({k: c[k] for k in BENCH_CACHE_FIELDS})
        out["runtime_bytes"] = m.memory_plan.runtime if m.memory_plan else None
    return out


def run_llama_cpp(a: argparse.Namespace) -> dict:
    import llama_cpp

    base = memory.rss()
    t0 = time.perf_counter()
    llm = llama_ref.llama(  # without --repack: llama.cpp's repacked copies are OOM-killed under a cap
        a.model,
        repack=a.repack,
        n_ctx=a.ctx or a.prompt_tokens + a.decode_tokens + 8,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=max(a.prompt_tokens, 8),
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    ids = prompt_ids(n_vocab, a.prompt_tokens)

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    r0 = memory.read_bytes()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    r1 = memory.read_bytes()
    toks = [int(np.argmax(last_logits()))]
    t2 = time.perf_counter()
    ttft = t2 - t0
    for _ in range(a.decode_tokens):
        llm.eval([toks[-1]])
        toks.append(int(np.argmax(last_logits())))
    t3 = time.perf_counter()
    r2 = memory.read_bytes()
    return dict(
        load_s=load_s,
        prompt_tps=a.prompt_tokens / (t1 - t0),
        decode_tps=a.decode_tokens / (t3 - t2),
        tokens=toks,
        base_rss=base,
        prompt_read=r1 - r0,
        decode_read=r2 - r1,
        ttft_s=ttft,
        quality="gguf",
        lossless=True,
    )  # the GGUF as written: the reference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("engine", choices=["edgemoe", "llama.cpp"])
    ap.add_argument("model")
    ap.add_argument("--budget", type=int, default=None, help="edgemoe memory budget (bytes)")
    ap.add_argument("--quality", default=None, help="edgemoe quality preset (default max, lossless)")
    ap.add_argument("--prefetch", action="store_true", help="edgemoe: prefetch the next layer's experts")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=None, help="context size (default: prompt + decode + 8)")
    ap.add_argument("--threads", type=int, default=None, help="default: EDGEMOE_THREADS, else the physical cores")
    ap.add_argument("--repack", action="store_true", help="llama.cpp: keep its default weight repacking")
    a = ap.parse_args(argv)
    a.threads = a.threads or env_threads()
    res = run_edgemoe(a) if a.engine == "edgemoe" else run_llama_cpp(a)
    res.update(engine=a.engine, peak_rss=memory.peak_rss(), threads=a.threads)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
