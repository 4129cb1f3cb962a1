#!/usr/bin/env python3
"""onnxruntime expert sessions against edgemoe's own kernels, for one expert shape.

    python tools/bench_onnx_experts.py [--n-embd 2048] [--n-ff 1024] [--threads 1] [--churn]
    python tools/bench_onnx_experts.py --e2e STORE [--prompt-tokens 256] [--budget 3GB]

For the matquant families 2,3,4 and 2,4,8 (group 32), random weights:
- `onnx_experts.measure`: graph build and session creation time, one call of the SwiGLU expert for
  1, 16 and 64 rows on onnxruntime (MatMulNBits) and on edgemoe's nested-plane kernels (numba);
- for the 4-bit family also ggml's kernels on the forms a full-width expert is transcoded to
  (transcode.fast_weight): Q4_1 rows (per-row vec_dot) and Q4_0 repacked for ggml's gemv/gemm
  (timed with the same codes and scales; a Q4_0 source's experts take this form);
- with --churn: resident bytes per live session (10 kept, 200 created and dropped, as an LRU pool
  does) over the session's initializer bytes, the figure onnx_experts.SESSION_OVERHEAD charges.
Best of --reps calls each; prints a table and the break-even rows of a session.
With --e2e STORE: the model end to end, quality max, with and without onnxruntime experts: prefill
of a random prompt (twice: the first pass creates the sessions), greedy decode, rows per backend.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

try:
    from edgemoe.quant import kernels, nested, transcode
    from edgemoe.runtime import memory
    from edgemoe.store import onnx_experts
except ImportError:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgemoe.quant import kernels, nested, transcode
    from edgemoe.runtime import memory
    from edgemoe.store import onnx_experts
from gguf import GGMLQuantizationType as QT

from edgemoe.store.reader import MATRICES


def best(fn, reps: int) -> float:
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def ggml_forms(sch, per, shapes) -> dict[str, dict[str, kernels.QWeight]]:
    """Q4_1 rows and repacked Q4_0 (same codes, d = s) of a 4-bit group-32 expert."""
    q41 = {m: transcode.q41_blocks(sch, per[m], *shapes[m]) for m in MATRICES}
    out = {"ggml Q4_1": {m: kernels.QWeight(q41[m], QT.Q4_1, shapes[m][1]) for m in MATRICES}}
    if kernels.can_pack_shape(QT.Q4_0, min(s[0] for s in shapes.values())):
        q40 = {}
        for m in MATRICES:
            n, k = shapes[m]
            b = q41[m].reshape(n, k // 32, 20)
            rows = np.concatenate([b[..., 0:2], b[..., 4:]], axis=-1).reshape(n, k // 32 * 18)
            q40[m] = kernels.pack(kernels.QWeight(np.ascontiguousarray(rows), QT.Q4_0, k))
        out["ggml Q4_0 repacked"] = q40
    return out


def expert(ws, x):
    g = kernels.matmul(ws["gate"], x)
    u = kernels.matmul(ws["up"], x)
    return kernels.matmul(ws["down"], np.ascontiguousarray(g / (1 + np.exp(-g)) * u, dtype=np.float32))


def churn(sch, shapes, live: int = 10, created: int = 200) -> float:
    """In a fresh process (RSS deltas in this one would reuse memory freed by the timings)."""
    import json
    import subprocess

    code = (
        f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import bench_onnx_experts as b; from edgemoe.quant import nested; "
        f"print(json.dumps(b._churn(nested.SCHEMES['matquant']({tuple(sch.widths)!r}, 32), {shapes!r}, "
        f"{live}, {created})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _churn(sch, shapes, live: int, created: int) -> float:
    rng = np.random.default_rng(0)
    per = {m: sch.encode(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])) for m, s in shapes.items()}
    codes = {m: onnx_experts.full_codes(sch, per[m], *shapes[m]) for m in MATRICES}
    be = onnx_experts.OnnxExperts(sch, shapes, min_rows=0)
    model = onnx_experts.expert_model(sch, codes, shapes)
    init = be.session_bytes(model) / onnx_experts.SESSION_OVERHEAD[be.bits]
    gc.collect()
    r0 = memory.rss()
    pool = []
    x = rng.standard_normal((1, shapes["gate"][1])).astype(np.float32)
    for _ in range(created):
        pool.append(be._session(onnx_experts.expert_model(sch, codes, shapes)))
        pool[-1].run(None, {"x": x})
        if len(pool) > live:
            pool.pop(0)
    gc.collect()
    return (memory.rss() - r0) / live / init


def e2e(store: str, prompt_tokens: int, decode_tokens: int, budget: str | None) -> None:
    import edgemoe

    for on in (False, True):
        with edgemoe.load(store, quality="max", memory_budget=budget, onnx_experts=on, progress=False) as m:
            ids = [int(i) for i in np.random.default_rng(0).integers(10, m.config.n_vocab - 10, prompt_tokens)]
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                m.logits(ids)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = len(list(m.stream(ids[:16], max_tokens=decode_tokens, temperature=0, ignore_eos=True)))
            dec = time.perf_counter() - t0
            c = m.stats().cache
            print(
                f"onnx_experts={on!s:<5}  prefill {prompt_tokens} tokens: {prompt_tokens / times[0]:7.1f} tok/s "
                f"(first pass), {prompt_tokens / times[1]:7.1f} tok/s (second);  16-token prompt + {n} decoded: "
                f"{n / dec:6.2f} tok/s;  rows {c.backend_rows}, sessions {c.onnx_sessions}, "
                f"charged {c.onnx_bytes / 2**20:.1f} MiB of a {m.memory_plan.onnx_pool / 2**20:.0f} MiB pool"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-ff", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--churn", action="store_true", help="also measure resident bytes per session")
    ap.add_argument("--e2e", metavar="STORE", help="end to end on this store instead (see above)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--budget", default=None)
    args = ap.parse_args(argv)
    if args.e2e:
        e2e(args.e2e, args.prompt_tokens, args.decode_tokens, args.budget)
        return 0
    shapes = {"gate": (args.n_ff, args.n_embd), "up": (args.n_ff, args.n_embd), "down": (args.n_embd, args.n_ff)}
    print(
        f"expert {args.n_embd}x{args.n_ff} (gate, up, down), group 32; onnxruntime "
        f"{onnx_experts._ort().__version__}, {args.threads} thread(s); edgemoe kernels: {kernels.BACKEND}, "
        f"{kernels.THREADS} thread(s); best of {args.reps}, ms per call of the whole expert"
    )
    for widths in ((2, 3, 4), (2, 4, 8)):
        sch = nested.SCHEMES["matquant"](widths, 32)
        r = onnx_experts.measure(sch, args.n_embd, args.n_ff, rows=(1, 16, 64), reps=args.reps, threads=args.threads)
        print(
            f"\nmatquant {','.join(map(str, widths))} at {widths[-1]} bits: graph build {r['build_s'] * 1e3:.1f} ms, "
            f"session {r['session_s'] * 1e3:.1f} ms; break-even {r['break_even_rows']:.1f} rows "
            f"(onnxruntime vs numba planes)"
        )
        cols = {
            "onnxruntime": {T: v["ort_s"] for T, v in r["per_rows"].items()},
            "edgemoe numba planes": {T: v["edgemoe_s"] for T, v in r["per_rows"].items()},
        }
        if widths[-1] == 4:
            rng = np.random.default_rng(0)
            per = {m: sch.encode(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])) for m, s in shapes.items()}
            for name, ws in ggml_forms(sch, per, shapes).items():
                cols[name] = {}
                for T in r["per_rows"]:
                    x = rng.standard_normal((T, args.n_embd)).astype(np.float32)
                    cols[name][T] = best(lambda ws=ws, x=x: expert(ws, x), args.reps)
        print(f"  {'rows':>4}  " + "  ".join(f"{c:>20}" for c in cols))
        for T in r["per_rows"]:
            print(f"  {T:>4}  " + "  ".join(f"{cols[c][T] * 1e3:>20.3f}" for c in cols))
        if args.churn:
            print(
                f"  resident bytes per live session / initializer bytes: {churn(sch, shapes):.2f} "
                f"(charged {onnx_experts.SESSION_OVERHEAD[widths[-1]]})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
