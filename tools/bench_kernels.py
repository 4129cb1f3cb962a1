"""Microbenchmark of the matmul kernels on GGUF-quantized weights.

For each shape (OLMoE expert up/gate 2048x1024 and down 1024x2048), T (1 = decode, 32 = prefill
batch) and weight type, time every backend and print microseconds (median and min of many
samples), effective GB/s of weight bytes read, and the speed-up over plain numpy float32 (x @ W.T
on a matrix dequantized beforehand, i.e. what expanding the weights to float32 would give).
On a shared machine pin everything to one thread for clean numbers:
    OPENBLAS_NUM_THREADS=1 python tools/bench_kernels.py --threads 1 --cold

    python tools/bench_kernels.py [--types Q4_K,Q8_0] [--threads 1,2] [--cold] [--json OUT]

--native: the table of a native store's kernels instead (edgemoe.quant.native): for each source type
llama.cpp writes (blocks made by its own quantizer), shape (2048x1024; 768x2048, Qwen3-30B-A3B's
expert) and T (1, 32), every width as StoreExperts runs it: "held" the full width once merged (the
source's own blocks on ggml's kernel), "merge+mm" a lower width merged for one use, then ggml's
kernel; beside it ggml's time for the native type nearest that width's bytes (Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K, Q8_0) and the ratio; and a full-width miss (merged into a buffer of its own, repacked where
ggml repacks the type: the form the cache holds) and the merge alone, against the matrix's read time at 2 GB/s.
    python tools/bench_kernels.py --native [--types Q4_K,Q6_K,Q8_0,MXFP4] [--threads 1,2] [--json OUT]

--repacked: ggml's repacked Q4_K (block_q4_Kx8, kernels.pack: what llama.cpp runs for Q4_K on
AVX2) beside ggml's per-row Q4_K vec_dot on the same blocks (what a Q4_K matrix ran on before) and
beside repacked Q4_0 (block_q4_0x8) of the same matrix, per shape (2048x1024; 768x2048), T (1, 32)
and thread count; blocks from llama.cpp's quantizer; --cold cycles through 256 MB of copies.
    python tools/bench_kernels.py --repacked [--threads 1,2] [--cold] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from edgemoe.quant import kernels  # noqa: E402

SHAPES = [(2048, 1024), (1024, 2048)]  # [n_out, n_in]
TS = [1, 32]
TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"]


def make(qtype: QT, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16)
    try:
        return gguf.quants.quantize(w, qtype)
    except NotImplementedError:  # K-quants: random blocks with sane fp16 scales
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_kernels import random_blocks

        return random_blocks(qtype, n_out, n_in, rng)


def timeit(fn, budget: float) -> tuple[float, float]:
    """(median, min) seconds per call. Each sample is a short batch of calls (>= ~50 us), so a
    preemption by another process spoils one sample, not the median, on a shared machine."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(50e-6 / one))
    samples = []
    end = time.perf_counter() + budget
    while len(samples) < 5 or (time.perf_counter() < end and len(samples) < 2000):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples), min(samples)


def _numba_q8_0():
    """An own numba kernel for Q8_0 (float activations, int8 codes), to compare with ggml."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True)
    def q8_0_matmul(codes, scales, x, out):  # codes int8 [n_out, n_in], scales f32 [n_out, nb]
        n_out, n_in = codes.shape
        T = x.shape[0]
        for r in prange(n_out):
            for t in range(T):
                acc = 0.0
                for b in range(n_in // 32):
                    s = 0.0
                    for j in range(32):
                        s += codes[r, b * 32 + j] * x[t, b * 32 + j]
                    acc += s * scales[r, b]
                out[t, r] = acc

    return q8_0_matmul


def backends_for(qtype: QT, data: np.ndarray, n_in: int, own: bool = True):
    """(name, callable(x) -> y) for every backend that can run this weight."""
    w = kernels.QWeight(data, qtype, n_in, name="bench")
    out = [("numpy-tile", lambda x: kernels._matmul_numpy(w, x))]
    lib = kernels._lib
    if lib is not None:
        funcs = lib.dot_funcs(int(qtype))
        if funcs is not None:
            wg = kernels.QWeight(data, qtype, n_in, name="bench")
            vec_dot, from_float, vdt, to_float = funcs
            wg._dot = (vec_dot, from_float, lib.row_size(vdt, n_in), to_float)
            out.append(("ggml-vec_dot", lambda x: kernels._matmul_ggml(wg, x)))
    if kernels.can_pack_shape(qtype, data.shape[0]):  # llama.cpp's default CPU path for Q4_0
        wp = kernels.pack(kernels.QWeight(np.array(data), qtype, n_in, name="bench"))
        out.append(("ggml-repacked", lambda x: kernels.matmul(wp, x)))
    if own and qtype == QT.Q8_0 and kernels.BACKEND == "ggml":
        kern = _numba_q8_0()
        blocks = data.reshape(data.shape[0], -1, 34)
        scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[..., 0].astype(np.float32)
        codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(data.shape[0], n_in)

        def own_kernel(x):
            y = np.empty((x.shape[0], data.shape[0]), np.float32)
            kern(codes, scales, x, y)
            return y

        out.append(("numba-own", own_kernel))
    if qtype == QT.Q4_0:
        out += nested_backends(data, n_in)
    return w, out


def nested_backends(data: np.ndarray, n_in: int):
    """The expert store's kernels on the same Q4_0 weights: the matquant 2,3,4 planes a Q4_0
    source converts to exactly, read at each width by the plane kernel, and the full width after
    its transcoding to ggml blocks (Q4_1, and the repacked Q4_0 a Q4_0 source's cached full-width
    experts run on), and the time of that transcoding ("transcode", a fresh buffer each time as in
    the cache)."""
    from types import SimpleNamespace

    from edgemoe.quant import nested, transcode
    from edgemoe.store.convert import _source_codes

    n_out = data.shape[0]
    sch = nested.SCHEMES["matquant"]((2, 3, 4), 32)
    planes = sch.from_codes(*_source_codes(SimpleNamespace(data=data[None], qtype=QT.Q4_0), 0))
    ks = {b: sch.planes_for(b) for b in sch.widths}
    out = [(f"planes-{b}bit", lambda x, k=ks[b]: sch.matmul(planes[:k], n_out, n_in, x)) for b in sch.widths]
    q41 = kernels.QWeight(transcode.q41_blocks(sch, planes, n_out, n_in), QT.Q4_1, n_in, name="bench")
    out.append(("planes->Q4_1", lambda x: kernels.matmul(q41, x)))
    fast = transcode.fast_weight(sch, planes, n_out, n_in, "bench")  # a Q4_0 source: repacked Q4_0
    if fast.packed:
        out.append(("planes->repacked", lambda x: kernels.matmul(fast, x)))
        # what a cache miss at full width costs before that: the transcoding itself (T-independent)
        out.append(("transcode", lambda x: transcode.fast_weight(sch, planes, n_out, n_in, "bench")))
    return out


NATIVE_SHAPES = [(2048, 1024), (768, 2048)]
NATIVE_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4", "Q4_0"]
NEAREST = {2: QT.Q2_K, 3: QT.Q3_K, 4: QT.Q4_K, 5: QT.Q5_K, 6: QT.Q6_K, 8: QT.Q8_0}


def native_table(types: list[str], threads: list[int], budget: float) -> list[dict]:
    """The --native table (see the module docstring); returns its rows."""
    from edgemoe.quant._ggml import GGMLLib

    lib = GGMLLib()
    rng = np.random.default_rng(0)
    rows = []
    hdr = (
        f"{'type':6} {'shape':>9} {'T':>2} {'thr':>3} {'width':>5} {'edgemoe':>16} {'us':>8} "
        f"{'ggml nearest':>13} {'us':>8} {'ratio':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name in types:
        for n_out, n_in in NATIVE_SHAPES:
            rows += _native_rows(lib, QT[name], n_out, n_in, threads, budget, rng)
    return rows


def _native_rows(lib, qtype: QT, n_out: int, n_in: int, threads: list[int], budget: float, rng) -> list[dict]:
    from edgemoe.quant import native
    from edgemoe.quant.buffers import alloc
    from edgemoe.runtime.streaming import PACK_ROWS

    name, rows = qtype.name, []
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    nt = native.TYPES[qtype]
    planes = native.split(qtype, lib.quantize(int(qtype), w), n_out, n_in)
    held = kernels.pack(kernels.QWeight(native.merge(qtype, planes, n_out, n_in), qtype, n_in, "bench"))
    nearest = {}
    for b in nt.widths:
        nearest[b] = kernels.pack(kernels.QWeight(lib.quantize(int(NEAREST[b]), w), NEAREST[b], n_in, "nearest"))

    scratch = alloc(held.nbytes).reshape(n_out, -1)  # StoreExperts merges a lower width into a kept buffer

    def merged(x, k):  # as StoreExperts._native_ffn runs a lower width
        w = kernels.QWeight(native.merge(qtype, planes[:k], n_out, n_in, scratch), qtype, n_in, "w")
        return kernels.matmul(kernels.pack(w) if x.shape[0] >= PACK_ROWS else w, x)

    for T in TS:
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        for th in threads:
            set_threads(th)
            for k, b in enumerate(nt.widths, 1):
                label = "held" if k == nt.n_planes else "merge+mm"
                if k == nt.n_planes:
                    med, _ = timeit(lambda x=x: kernels.matmul(held, x), budget)
                else:
                    med, _ = timeit(lambda x=x, k=k: merged(x, k), budget)
                ref, _ = timeit(lambda x=x, b=b: kernels.matmul(nearest[b], x), budget)
                rows.append(
                    dict(
                        type=name, n_out=n_out, n_in=n_in, T=T, threads=th, width=b, edgemoe=label,
                        us=med * 1e6, nearest=NEAREST[b].name, nearest_us=ref * 1e6, ratio=med / ref,
                    )
                )  # fmt: skip
                print(
                    f"{name:6} {f'{n_out}x{n_in}':>9} {T:2d} {th:3d} {b:5d} {label:>16} {med * 1e6:8.1f} "
                    f"{NEAREST[b].name:>13} {ref * 1e6:8.1f} {med / ref:5.2f}x",
                    flush=True,
                )
    full = sum(p.nbytes for p in planes)
    # a full-width miss as the cache builds the form it holds: merged into a buffer of its own
    # (pages mapped by alloc), then repacked where ggml repacks the type; and the merge alone,
    # into a buffer already mapped

    def miss():  # as StoreExperts._native_ffn builds it
        buf = alloc(full).reshape(n_out, -1)
        if nt is native.TYPES[QT.Q4_K] and kernels.can_pack_shape(qtype, n_out):  # one pass into block_q4_Kx8
            return kernels.QWeight.prepacked(native.merge_q4_kx8_type(nt, planes, n_out, n_in, buf), qtype, n_in)
        return kernels.pack(kernels.QWeight(native.merge(qtype, planes, n_out, n_in, buf), qtype, n_in))

    m, _ = timeit(miss, budget)
    m0, _ = timeit(lambda: native.merge(qtype, planes, n_out, n_in, scratch), budget)
    read = full / 2e9
    rows.append(
        dict(type=name, n_out=n_out, n_in=n_in, merge_us=m * 1e6, merge_only_us=m0 * 1e6, read_us_2gbs=read * 1e6)
    )
    print(
        f"{name:6} {f'{n_out}x{n_in}':>9} full-width miss {m * 1e6:8.1f} us = {m / read:5.2f}x the read of its "
        f"{full / 1e6:.2f} MB at 2 GB/s (the merge alone: {m0 * 1e6:.1f} us = {m0 / read:.2f}x)",
        flush=True,
    )
    return rows


def repacked_table(threads: list[int], budget: float, cold: bool) -> list[dict]:
    """The --repacked table (see the module docstring); returns its rows."""
    lib, rng, rows = kernels._lib, np.random.default_rng(0), []
    print(f"{'shape':>9} {'T':>2} {'thr':>3} {'Q4_K vec_dot':>13} {'Q4_K repacked':>14} {'Q4_0 repacked':>14} "
          f"{'K rep/vec_dot':>14} {'K rep/Q4_0 rep':>15}  (us, median; {'cold' if cold else 'warm'})")  # fmt: skip
    for n_out, n_in in NATIVE_SHAPES:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
        k, z = lib.quantize(int(QT.Q4_K), w), lib.quantize(int(QT.Q4_0), w)
        copies = max(2, -(-(256 << 20) // k.nbytes)) if cold else 1
        plain = [kernels.QWeight(k.copy(), QT.Q4_K, n_in, "plain") for _ in range(copies)]
        rep_k = [kernels.pack(kernels.QWeight(k.copy(), QT.Q4_K, n_in, "q4_k")) for _ in range(copies)]
        rep_0 = [kernels.pack(kernels.QWeight(z.copy(), QT.Q4_0, n_in, "q4_0")) for _ in range(copies)]
        assert rep_k[0].packed and rep_0[0].packed, "ggml's repacked kernels are not in this build"
        fns = [_cycle([lambda x, m=m: kernels.matmul(m, x) for m in ws]) for ws in (plain, rep_k, rep_0)]
        for T in TS:
            x = rng.standard_normal((T, n_in)).astype(np.float32)
            for th in threads:
                set_threads(th)
                us = [timeit(lambda f=f, x=x: f(x), budget)[0] * 1e6 for f in fns]
                rows.append(dict(n_out=n_out, n_in=n_in, T=T, threads=th, cold=cold, q4_k_vec_dot_us=us[0],
                                 q4_k_repacked_us=us[1], q4_0_repacked_us=us[2]))  # fmt: skip
                print(f"{f'{n_out}x{n_in}':>9} {T:2d} {th:3d} {us[0]:13.1f} {us[1]:14.1f} {us[2]:14.1f} "
                      f"{us[1] / us[0]:13.2f}x {us[1] / us[2]:14.2f}x", flush=True)  # fmt: skip
    return rows


def _cycle(fns):
    """One callable that runs the next copy each time (cold-cache mode)."""
    state = [0]

    def run(x):
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]](x)

    return run


def set_threads(n: int) -> None:
    kernels.THREADS = n
    kernels._tls.threads = None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    ap.add_argument(
        "--threads",
        default=str(kernels.THREADS),
        help="comma-separated thread counts for the kernels (default: %(default)s)",
    )
    ap.add_argument(
        "--cold", action="store_true", help="cycle through enough weight copies (>= 256 MB) to defeat the caches"
    )
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--native", action="store_true", help="the native store's kernels per width (see above)")
    ap.add_argument("--repacked", action="store_true", help="repacked Q4_K against Q4_K vec_dot and Q4_0 repacked")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    threads = [int(t) for t in args.threads.split(",")]
    if args.repacked:
        rows = repacked_table(threads, args.budget, args.cold)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(backend=kernels.BACKEND, threads=threads, repacked=True, rows=rows), f, indent=1)
        return 0
    if args.native:
        types = NATIVE_TYPES if args.types == ",".join(TYPES) else args.types.split(",")
        rows = native_table(types, threads, args.budget)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(backend=kernels.BACKEND, threads=threads, native=True, rows=rows), f, indent=1)
        return 0
    rows = []
    print(
        f"active backend: {kernels.BACKEND}; threads tried: {threads}; "
        f"{'cold' if args.cold else 'warm'} cache; times are median and min per call;\n"
        "'vs f32' = time of numpy float32 x @ W.T on a pre-dequantized matrix / this time, "
        "by median and by min"
    )
    hdr = (
        f"{'type':5} {'shape':>9} {'T':>2} {'thr':>3} {'backend':13} {'median us':>10} "
        f"{'min us':>9} {'GB/s':>7} {'vs f32':>8} {'(min)':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name in args.types.split(","):
        qtype = QT[name]
        for n_out, n_in in SHAPES:
            data = make(qtype, n_out, n_in, rng)
            w, impls = backends_for(qtype, data, n_in, own=not args.cold)
            wf = (
                gguf.quants.dequantize(data, qtype).reshape(n_out, n_in).astype(np.float32)
                if qtype not in (QT.F32, QT.F16)
                else data.astype(np.float32)
            )
            if args.cold:
                nq = max(2, -(-(256 << 20) // data.nbytes))
                nf = max(2, -(-(256 << 20) // wf.nbytes))
                wfs = [wf.copy() for _ in range(nf)]
                per_copy = [backends_for(qtype, data.copy(), n_in, own=False)[1] for _ in range(nq)]
                impls = [(b, _cycle([pc[i][1] for pc in per_copy])) for i, (b, _) in enumerate(impls)]
                ref_fn = _cycle([lambda x, m=m: x @ m.T for m in wfs])
            else:
                ref_fn = lambda x, wf=wf: x @ wf.T
            for T in TS:
                x = rng.standard_normal((T, n_in)).astype(np.float32)
                ref_med, ref_min = timeit(lambda ref_fn=ref_fn, x=x: ref_fn(x), args.budget)
                res = [("numpy-f32-ref", 0, ref_med, ref_min)]
                for bname, fn in impls:
                    for nt in threads if bname != "numpy-tile" else [threads[-1]]:
                        set_threads(nt)
                        res.append((bname, nt, *timeit(lambda fn=fn, x=x: fn(x), args.budget)))
                for bname, nt, med, mn in res:
                    nbytes = wf.nbytes if bname == "numpy-f32-ref" else w.nbytes
                    row = dict(
                        type=name,
                        n_out=n_out,
                        n_in=n_in,
                        T=T,
                        backend=bname,
                        threads=nt,
                        us=med * 1e6,
                        us_min=mn * 1e6,
                        gbps=nbytes / med / 1e9,
                        speedup=ref_med / med,
                        speedup_min=ref_min / mn,
                        weight_bytes=nbytes,
                        cold=args.cold,
                    )
                    rows.append(row)
                    print(
                        f"{name:5} {f'{n_out}x{n_in}':>9} {T:2d} {nt or '-':>3} {bname:13} "
                        f"{med * 1e6:10.1f} {mn * 1e6:9.1f} {row['gbps']:7.2f} "
                        f"{row['speedup']:7.2f}x {row['speedup_min']:7.2f}x",
                        flush=True,
                    )
            set_threads(threads[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=kernels.BACKEND, threads=threads, cold=args.cold, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
