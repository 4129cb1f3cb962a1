"""Kernel throughput for `edgemoe profile`: edgemoe.quant.kernels.matmul on Q4_0 / Q8_0 / Q4_K
expert-shaped weights (1024 x 2048, T=1), and edgemoe.quant.nested widths where that module imports;
weight bytes per second."""

from __future__ import annotations

import statistics
import time

import numpy as np


def _random_quant(qtype_name: str, n_out: int, n_in: int, rng) -> np.ndarray:
    """Valid-looking blocks of a GGUF quant type: random codes, small finite fp16 scales."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype_name]
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    nb = n_in // block
    data = rng.integers(0, 256, size=(n_out, nb, tsize), dtype=np.uint8)
    n_f16 = 2 if qtype_name.endswith("_K") else 1  # d (and dmin) lead each block
    data[:, :, : 2 * n_f16] = np.frombuffer(np.full(n_f16, 0.01, np.float16).tobytes(), np.uint8)
    return data.reshape(n_out, nb * tsize)


def _times(fn, budget_s: float, min_reps: int = 3) -> list[float]:
    """Seconds of fn() per repetition within budget_s."""
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 500:
            break
    return times


def _rate(nbytes: int, times: list[float]) -> dict:
    best, median = min(times), statistics.median(times)
    return dict(
        gbps=float(f"{nbytes / best / 1e9:.4g}"),
        gbps_median=float(f"{nbytes / median / 1e9:.4g}"),
        us=round(best * 1e6, 1),
        runs=len(times),
    )


def measure_kernels(
    n_out: int = 1024,
    n_in: int = 2048,
    budget_s: float = 0.5,
    nested_bits=(2, 3, 4, 8),
    rounds: int = 3,
    single_thread: bool = True,
) -> dict:
    """Weight GB/s of matmul at T=1 per GGUF type and per nested width; errors recorded, not raised.

    Each kernel runs for budget_s in all, split over `rounds` rounds that visit every kernel in turn,
    so a burst of load from other processes spoils a round, not a kernel. The best run is the
    headline (a preempted thread costs whole scheduler slices), the median is kept beside it."""
    from ..quant import kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal(n_in).astype(np.float32)
    out: dict = dict(shape=f"{n_out}x{n_in}", T=1, backend=kernels.BACKEND, threads=kernels.THREADS, gguf={})
    jobs = []  # (where, key, weight bytes, fn)
    for name in ("Q4_0", "Q8_0", "Q4_K"):
        try:
            w = kernels.QWeight(_random_quant(name, n_out, n_in, rng), name_to_qt(name), n_in, name)
            fn = lambda w=w: kernels.matmul(w, x)
            fn()  # warm-up (and the error, if the backend lacks the type)
            jobs.append((out["gguf"], name, w.nbytes, fn))
        except Exception as exc:  # noqa: BLE001 - a type the backend lacks: say so, go on
            out["gguf"][name] = dict(error=f"{type(exc).__name__}: {exc}")
    if nested_bits:
        try:
            from ..quant import nested

            names = list(nested.SCHEMES)
        except Exception as exc:  # noqa: BLE001 - edgemoe.quant.nested is optional here
            out["nested"] = dict(error=f"{type(exc).__name__}: {exc}")
            names = []
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.02
        for scheme in names:
            try:
                sch = nested.SCHEMES[scheme](tuple(nested_bits), 128)
                planes = sch.encode(w)
                res: dict = {}
                for b in nested_bits:
                    k = sch.planes_for(b)
                    fn = lambda sch=sch, planes=planes, k=k: sch.matmul(planes[:k], n_out, n_in, x)
                    fn()
                    jobs.append((res, int(b), sum(p.nbytes for p in planes[:k]), fn))
                out.setdefault("nested", {})[scheme] = dict(widths=res)
            except Exception as exc:  # noqa: BLE001 - one scheme failing does not stop the others
                out.setdefault("nested", {})[scheme] = dict(error=f"{type(exc).__name__}: {exc}")
    times: dict = {id(j): [] for j in jobs}
    for _ in range(rounds):
        for j in jobs:
            times[id(j)] += _times(j[3], budget_s / rounds)
    for j in jobs:
        j[0][j[1]] = _rate(j[2], times[id(j)])
    if single_thread and kernels.THREADS > 1:  # per core: robust when other processes load the cores
        saved = kernels.THREADS
        kernels.THREADS = 1
        try:
            one = measure_kernels(n_out, n_in, budget_s, nested_bits, rounds, single_thread=False)
        finally:
            kernels.THREADS = saved
            try:
                import numba

                numba.set_num_threads(min(saved, numba.config.NUMBA_NUM_THREADS))
            except Exception:  # noqa: BLE001
                pass
        out["single_thread"] = {k: one[k] for k in ("gguf", "nested") if k in one}
    return out


def name_to_qt(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]
