#!/usr/bin/env python3
"""Soak: a long generation from an expert store under a tight budget, memory and open files sampled
throughout; and a server under repeated requests from several client threads.

    python tools/soak.py model [--store DIR] [--tokens 2000] [--slack 0.25] [--json]
    python tools/soak.py server [--store DIR] [--rounds 20] [--clients 4] [--requests 5] [--json]

`model` runs in this process (start it fresh: the budget counts from edgemoe.BASELINE_RSS): it loads
the store, sets its budget to memory_plan.minimum_budget + slack x all experts' bytes (the cache
holds about that fraction of the experts), generates --tokens tokens in runs of up to 200 (fresh
prompts, n_ctx 256) while a thread samples RSS and open fds every 10 ms, and checks: sampled RSS and
peak RSS (VmHWM) - BASELINE_RSS within budget + 5%, and no growth of RSS (its peak, by more than 2
MiB) or open fds (their floor: other threads open files for a moment) between the first and the last
quarter of the tokens. The budget check must be able to fail: the 5% must be under half of one
layer's experts (an expert cache that overran its capacity by a layer would then show), else that is
reported as a failure too. Without --store the model made for it (BIG: 113 MB of Q4_0 experts in 2
layers; 5% of its budget, ~11 MB, is a fifth of one layer's experts) is written and converted in a
temporary directory. `server` does the same around rounds of parallel requests on 127.0.0.1 (no
budget check; without --store a tiny model). Prints a JSON summary (with --json only that); exit 1
if a check failed."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgemoe  # noqa: E402  (first: BASELINE_RSS is taken at this import)
from edgemoe.runtime.memory import peak_rss  # noqa: E402

BASELINE = edgemoe.BASELINE_RSS
SPEC = dict(n_embd=128, n_ff_exp=128, n_expert=16, n_layer=4, dtype="F32")  # `server`: a tiny model
# `model`: experts large against the minimum budget (~185 MB, most of it the runtime), so that 5% of the
# budget (~11 MB at slack 0.25) is far under one layer's experts (57 MB): 2 layers of 256 experts
# of 256 x 512 in Q4_0 (221 KB each, 4 chosen per token)
BIG = dict(n_layer=2, n_embd=256, n_head=8, n_expert=256, n_expert_used=4, n_ff_exp=512, vocab=1024, n_ctx_train=512)
TOLERANCE = 0.05  # the budget's promise: peak RSS within budget + 5%
GROWTH_BYTES = 2 << 20
PROMPTS = [
    "Once upon a time",
    "The expert said",
    "In the beginning",
    "Hello world",
    "A quiet river",
    "Numbers: 1 2 3",
    "Dear reader,",
    "The machine",
]


def make_store(work: Path, big: bool) -> Path:
    from edgemoe.store.convert import convert

    if not big:
        from edgemoe.testing import synth

        src = synth.write_model(synth.SynthSpec.tiny("qwen3moe", **SPEC), work / "soak.gguf")
        return convert(src, work / "soak.edgemoe", progress=False)
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bench_model", ROOT / "tools" / "make_bench_model.py")
    mb = importlib.util.module_from_spec(spec)
    sys.modules["make_bench_model"] = mb  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mb)
    src = mb.write_bench_model(mb.BenchShape(**BIG), work / "soak-big.gguf", log=lambda *a, **k: None, calibrate=False)
    # 4 distinct experts per layer encoded, copied for the rest: the same bytes to hold and read
    st = convert(src, work / "soak-big.edgemoe", progress=False, distinct_experts=4)
    src.unlink()
    return st


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.progress = 0  # tokens (or requests) so far, set by the caller
        self.samples: list[tuple[int, int, int]] = []  # (progress, rss, fds)
        self._halt = threading.Event()

    def sample(self) -> None:
        self.samples.append((self.progress, self.proc.memory_info().rss, self.proc.num_fds()))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def quarters(self, total: int) -> tuple[list, list]:
        first = [s for s in self.samples if s[0] <= total // 4]
        last = [s for s in self.samples if s[0] >= total - total // 4]
        return first, last


def experts_bytes(store: Path, per_layer: bool = False) -> int:
    """All experts' bytes at every plane, or one MoE layer's (per_layer)."""
    from edgemoe.store.reader import StoreReader

    r = StoreReader(store)
    try:
        return r.n_expert * r.expert_bytes(r.n_planes) if per_layer else r.all_experts_bytes()
    finally:
        r.close()


def load_tight(store: Path, slack: float, n_ctx: int):
    """Load with a loose budget and no preload, then set the budget to the plan's minimum plus slack x
    all experts' bytes (the runtime part of the minimum is measured in this very process). The peak
    RSS (VmHWM) is then reset (Linux clear_refs 5): the loose load's own peak is not the tight
    budget's to answer for."""
    m = edgemoe.load(store, memory_budget="4GiB", n_ctx=n_ctx, preload=False)
    plan = m.set_budget(int(m.memory_plan.minimum_budget + slack * experts_bytes(store)))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return m, plan


def soak_model(store: Path, tokens: int, slack: float) -> dict:
    all_experts = experts_bytes(store)
    one_layer = experts_bytes(store, per_layer=True)
    sampler = Sampler()
    t0 = time.monotonic()
    m, plan = load_tight(store, slack, 256)
    budget, minimum = plan.budget, plan.minimum_budget
    with m:
        sampler.start()
        done, run = 0, 0
        while done < tokens:
            n = min(200, tokens - done)
            for _ in m.stream(PROMPTS[run % len(PROMPTS)], max_tokens=n, temperature=0.8, seed=run, ignore_eos=True):
                done += 1
                sampler.progress = done
            run += 1
        sampler.stop()
        stats = m.stats()
    elapsed = time.monotonic() - t0
    first, last = sampler.quarters(tokens)
    peak = max(s[1] for s in sampler.samples) - BASELINE
    hwm = peak_rss() - BASELINE  # VmHWM since load_tight reset it
    limit = budget * (1 + TOLERANCE)
    res = dict(
        mode="model",
        tokens=done,
        runs=run,
        seconds=round(elapsed, 1),
        samples=len(sampler.samples),
        budget=budget,
        minimum_budget=minimum,
        cache_capacity=plan.cache_capacity,
        expert_bytes_all=all_experts,
        expert_bytes_one_layer=one_layer,
        tolerance=int(budget * TOLERANCE),
        baseline_rss=BASELINE,
        peak_rss_over_baseline=peak,
        vm_hwm_over_baseline=hwm,
        limit=int(limit),
        peak_fraction_of_budget=round(max(peak, hwm) / budget, 4),
        rss_first_quarter_max=max(s[1] for s in first),
        rss_last_quarter_max=max(s[1] for s in last),
        fds_first_quarter_max=max(s[2] for s in first),
        fds_last_quarter_max=max(s[2] for s in last),
        fds_first_quarter_min=min(s[2] for s in first),
        fds_last_quarter_min=min(s[2] for s in last),
        tokens_per_s=round(done / elapsed, 1),
    )
    res["cache_hit_rate"] = getattr(getattr(stats, "cache", None), "hit_rate", None)
    failures = []
    if res["tolerance"] * 2 > one_layer:
        failures.append(
            f"the budget check cannot catch a cache overrun: 5% of the budget ({res['tolerance']}) is "
            f"over half of one layer's experts ({one_layer}); use a model with larger experts"
        )
    if peak > limit or hwm > limit:
        failures.append(f"RSS over budget + 5%: sampled peak {peak}, VmHWM {hwm}, limit {int(limit)}")
    if res["rss_last_quarter_max"] > res["rss_first_quarter_max"] + GROWTH_BYTES:
        failures.append("RSS grew between the first and the last quarter")
    # other threads open files for a moment (e.g. /proc reads for the stats): a leak raises the
    # floor, not just a peak
    if res["fds_last_quarter_min"] > res["fds_first_quarter_min"]:
        failures.append("open files grew between the first and the last quarter")
    res["failures"] = failures
    return res


def soak_server(store: Path, rounds: int, clients: int, requests: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from edgemoe.serve.server import Server

    sys.path.insert(0, str(ROOT / "tests"))
    from fuzz.targets_server import send

    sampler = Sampler(period=0.02)
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    m, _ = load_tight(store, 0.25, 128)
    with m, Server(m, "127.0.0.1", 0, max_queue=clients) as srv:
        srv.start()
        sampler.start()
        per_round = []

        def one(i: int) -> int:
            if i % 2:
                body = {
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 6,
                    "temperature": 0,
                }
                status, _ = send(srv.port, "/v1/chat/completions", json.dumps(body).encode(), timeout=60)
            else:
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6, "temperature": 0, "stream": i % 4 == 0}
                status, _ = send(srv.port, "/v1/completions", json.dumps(body).encode(), timeout=60)
            return status

        with ThreadPoolExecutor(max_workers=clients) as pool:
            for r in range(rounds):
                for s in pool.map(one, range(clients * requests)):
                    statuses[s] = statuses.get(s, 0) + 1
                gc.collect()
                time.sleep(0.05)  # let handler threads finish and close their sockets
                sampler.progress = r + 1
                sampler.sample()
                per_round.append(sampler.samples[-1])
        sampler.stop()
    first, last = per_round[: max(1, rounds // 4)], per_round[-max(1, rounds // 4) :]
    res = dict(
        mode="server",
        rounds=rounds,
        clients=clients,
        requests=rounds * clients * requests,
        statuses=statuses,
        seconds=round(time.monotonic() - t0, 1),
        rss_first_quarter_max=max(s[1] for s in first),
        rss_last_quarter_max=max(s[1] for s in last),
        fds_first_quarter_max=max(s[2] for s in first),
        fds_last_quarter_max=max(s[2] for s in last),
        fds_first_quarter_min=min(s[2] for s in first),
        fds_last_quarter_min=min(s[2] for s in last),
        fds_per_round=[s[2] for s in per_round],
    )
    failures = []
    if set(statuses) != {200}:
        failures.append(f"statuses other than 200: {statuses}")
    if res["rss_last_quarter_max"] > res["rss_first_quarter_max"] + GROWTH_BYTES:
        failures.append("server RSS grew between the first and the last quarter of the rounds")
    if res["fds_last_quarter_min"] > res["fds_first_quarter_min"]:
        failures.append("server open files grew between the first and the last quarter of the rounds")
    res["failures"] = failures
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["model", "server"])
    ap.add_argument("--store", help="expert store (default: a tiny model converted in a temporary directory)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument(
        "--slack",
        type=float,
        default=0.25,
        help="budget = minimum_budget + slack * (all experts' bytes): the cache holds about this "
        "fraction of the experts (default 0.25)",
    )
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5, help="requests per client per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        store = Path(args.store) if args.store else make_store(Path(tmp), big=args.mode == "model")
        if args.mode == "model":
            res = soak_model(store, args.tokens, args.slack)
        else:
            res = soak_server(store, args.rounds, args.clients, args.requests)
    print(json.dumps(res, indent=None if args.json else 1))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
