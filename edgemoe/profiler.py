"""`edgemoe profile`: measure this device (a profiles/*.yaml in edgemoe.profiles' format), or profile a
model's routing on this device (report.md with plots, a recommended budget, width and cache size).

Device figures (docs/profiles.md says how each is measured):
- storage: a temporary test file on the storage holding --storage, read with O_DIRECT where the
  filesystem allows it (else the file's page cache is dropped with posix_fadvise(DONTNEED) before each
  test): sequential reads of 4 MiB, random reads of 1 MiB, random reads of 4 KiB (median latency), one
  request at a time; the disk's read_ahead_kb from sysfs.
- memory bandwidth: a multi-threaded numpy copy of a large array, STREAM "copy" convention (bytes
  read + bytes written per second).
- kernels: edgemoe.kernels.matmul on Q4_0 / Q8_0 / Q4_K expert-shaped weights (1024 x 2048, T=1), and
  edgemoe.nested widths where that module imports; weight bytes per second.

Model profile: see profile_model(); the prediction model is in predict().
"""

from __future__ import annotations

import concurrent.futures
import math
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .cache import SCORE_DECAY
from .errors import EdgeMoEError
from .fileio import write_text_atomic
from .memory import format_size, parse_size
from .profiles import Profile, load_profile, parse_profile

MiB = 1024 * 1024
SEQ_BLOCK = 4 * MiB
RAND_BLOCK = MiB
LAT_BLOCK = 4096
BUDGET_SHARE = 0.65  # default_budget of a measured profile: leave ~35% of RAM to the OS


# ---- storage -------------------------------------------------------------------------------------

def default_storage_dir() -> Path:
    d = Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe"))
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        return Path.cwd()


def _disk_info(path: Path) -> tuple[str | None, int | None, str]:
    """(sysfs disk name, read_ahead_kb, storage kind guess) of the disk holding path."""
    try:
        from .cgroup import block_device_of

        _, disk = block_device_of(path)
    except Exception:  # noqa: BLE001 - tmpfs, overlay, no sysfs: unknown disk
        return None, None, "sata"
    ra = None
    try:
        ra = int(Path(f"/sys/block/{disk}/queue/read_ahead_kb").read_text().strip())
    except (OSError, ValueError):
        pass
    return disk, ra, _kind_of(disk)


def _kind_of(disk: str) -> str:
    if disk.startswith("nvme"):
        return "nvme"
    if disk.startswith(("vd", "xvd")):
        return "virtio"
    if disk.startswith("mmcblk"):
        try:
            t = Path(f"/sys/block/{disk}/device/type").read_text().strip().upper()
        except OSError:
            t = ""
        return "emmc" if t == "MMC" else "microsd"
    if disk.startswith("sd"):  # SATA, USB, or UFS (phones name UFS LUNs sdX too)
        try:
            host = str(Path(f"/sys/block/{disk}").resolve())
        except OSError:
            host = ""
        return "ufs" if "ufs" in host.lower() else "sata"
    return "sata"


class _File:
    """A test file read with O_DIRECT where allowed, else through the page cache dropped per test."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self.method = "O_DIRECT"
        rng = np.random.default_rng(1234)
        with open(path, "wb") as f:  # random bytes: nothing to compress or deduplicate
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.bytes(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        self.fd = None
        if hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                buf = mmap.mmap(-1, LAT_BLOCK)
                os.preadv(fd, [buf], 0)  # some filesystems accept the flag and fail the read
                buf.close()
                self.fd = fd
            except OSError:
                self.fd = None
        if self.fd is None:
            self.method = "posix_fadvise(DONTNEED) before each test"
            self.fd = os.open(path, os.O_RDONLY)
        self.drop()

    def drop(self) -> None:
        if self.method != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def advise_random(self, on: bool) -> None:
        if self.method != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM if on else os.POSIX_FADV_NORMAL)

    def close(self) -> None:
        os.close(self.fd)


def measure_storage(directory: Path, size: int = 256 * MiB, time_limit: float = 4.0) -> dict:
    """Cold read figures of the storage holding directory (MB/s = 1e6 bytes/s, latency in us)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = max(size // SEQ_BLOCK, 2) * SEQ_BLOCK
    disk, ra, kind = _disk_info(directory)
    fd, tmp = tempfile.mkstemp(prefix=".edgemoe-profile-", suffix=".bin", dir=directory)
    os.close(fd)
    tmp = Path(tmp)
    try:
        f = _File(tmp, size)
        try:
            buf = mmap.mmap(-1, SEQ_BLOCK)  # page-aligned, as O_DIRECT needs
            rng = np.random.default_rng(7)
            # sequential: the whole file, 4 MiB at a time (stopping at the time limit)
            f.drop()
            f.advise_random(False)
            done, t0 = 0, time.perf_counter()
            while done < size and time.perf_counter() - t0 < time_limit:
                done += os.preadv(f.fd, [buf], done)
            seq = done / (time.perf_counter() - t0) / 1e6
            # random 1 MiB reads at 1 MiB-aligned offsets, each block at most once
            f.drop()
            f.advise_random(True)
            view = mmap.mmap(-1, RAND_BLOCK)
            offs = rng.permutation(size // RAND_BLOCK) * RAND_BLOCK
            n, t0 = 0, time.perf_counter()
            for off in offs:
                os.preadv(f.fd, [view], int(off))
                n += 1
                if time.perf_counter() - t0 > time_limit:
                    break
            rand = n * RAND_BLOCK / (time.perf_counter() - t0) / 1e6
            # random 4 KiB reads: latency of each (untouched 4 KiB blocks only)
            f.drop()
            lat_view = mmap.mmap(-1, LAT_BLOCK)
            offs = rng.choice(size // LAT_BLOCK, size=min(size // LAT_BLOCK, 4000), replace=False) * LAT_BLOCK
            lats = []
            t_end = time.perf_counter() + time_limit / 2
            for off in offs:
                t = time.perf_counter()
                os.preadv(f.fd, [lat_view], int(off))
                lats.append(time.perf_counter() - t)
                if t > t_end:
                    break
            f.advise_random(False)
            for b in (buf, view, lat_view):
                b.close()
        finally:
            method = f.method
            f.close()
    finally:
        tmp.unlink(missing_ok=True)
    lat_us = sorted(x * 1e6 for x in lats)
    return dict(
        kind=kind, disk=disk, readahead_kb=ra, method=method, file_bytes=size,
        seq_read_mbps=seq, rand_read_mbps=rand, read_latency_us=statistics.median(lat_us),
        read_latency_p90_us=lat_us[int(0.9 * (len(lat_us) - 1))], latency_samples=len(lat_us),
    )


# ---- memory and kernels ----------------------------------------------------------------------------

def measure_memory_bandwidth(nbytes: int = 256 * MiB, repeats: int = 5, threads: int | None = None) -> float:
    """GB/s of a threaded numpy copy of nbytes (STREAM copy convention: read + written bytes), best run."""
    threads = threads or os.cpu_count() or 1
    n = nbytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def part(i):
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(part, range(threads)))  # the first run faults the pages in
        for _ in range(repeats):
            t = time.perf_counter()
            list(ex.map(part, range(threads)))
            best = min(best, time.perf_counter() - t)
    return 2 * n * 8 / best / 1e9


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
    return dict(gbps=float(f"{nbytes / best / 1e9:.4g}"), gbps_median=float(f"{nbytes / median / 1e9:.4g}"),
                us=round(best * 1e6, 1), runs=len(times))


def measure_kernels(n_out: int = 1024, n_in: int = 2048, budget_s: float = 0.5,
                    nested_bits=(2, 3, 4, 8), rounds: int = 3, single_thread: bool = True) -> dict:
    """Weight GB/s of matmul at T=1 per GGUF type and per nested width; errors recorded, not raised.

    Each kernel runs for budget_s in all, split over `rounds` rounds that visit every kernel in turn,
    so a burst of load from other processes spoils a round, not a kernel. The best run is the
    headline (a preempted thread costs whole scheduler slices), the median is kept beside it."""
    from . import kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal(n_in).astype(np.float32)
    out: dict = dict(shape=f"{n_out}x{n_in}", T=1, backend=kernels.BACKEND, threads=kernels.THREADS, gguf={})
    jobs = []  # (where, key, weight bytes, fn)
    for name in ("Q4_0", "Q8_0", "Q4_K"):
        try:
            w = kernels.QWeight(_random_quant(name, n_out, n_in, rng), name_to_qt(name), n_in, name)
            fn = (lambda w=w: kernels.matmul(w, x))
            fn()  # warm-up (and the error, if the backend lacks the type)
            jobs.append((out["gguf"], name, w.nbytes, fn))
        except Exception as exc:  # noqa: BLE001 - a type the backend lacks: say so, go on
            out["gguf"][name] = dict(error=f"{type(exc).__name__}: {exc}")
    if nested_bits:
        try:
            from . import nested

            names = list(nested.SCHEMES)
        except Exception as exc:  # noqa: BLE001 - edgemoe.nested is optional here
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
                    fn = (lambda sch=sch, planes=planes, k=k: sch.matmul(planes[:k], n_out, n_in, x))
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


# ---- device profile --------------------------------------------------------------------------------

def measure_device(storage_dir: Path | None = None, size: int = 256 * MiB, mem_bytes: int = 256 * MiB,
                   kernels: bool = True, time_limit: float = 4.0, kernel_budget_s: float = 0.5,
                   nested_bits=(2, 3, 4, 8)) -> dict:
    import psutil

    storage_dir = Path(storage_dir) if storage_dir else default_storage_dir()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    st = measure_storage(storage_dir, size, time_limit)
    mem = measure_memory_bandwidth(mem_bytes)
    kern = measure_kernels(budget_s=kernel_budget_s, nested_bits=nested_bits) if kernels else None
    return dict(storage=st, storage_dir=str(storage_dir), memory_bandwidth_gbps=mem,
                cores=os.cpu_count() or 1, ram=psutil.virtual_memory().total, kernels=kern,
                seconds=time.perf_counter() - t0, load_average=load_before)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f}GiB"


def profile_yaml(m: dict, name: str, description: str | None = None) -> str:
    """The YAML text of a measured profile, every figure with a comment saying how it was measured."""
    st = m["storage"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    disk = st["disk"] or "unknown disk"
    mb = st["file_bytes"] // MiB
    desc = description or f"{platform.node() or 'this machine'} ({platform.machine()}), measured by edgemoe profile"
    ra = st["readahead_kb"] if st["readahead_kb"] else 128
    ra_src = (f"/sys/block/{disk}/queue/read_ahead_kb" if st["readahead_kb"]
              else "estimate: not readable here; the Linux default (128 KiB)")
    budget = int(m["ram"] * BUDGET_SHARE)
    lines = [
        f"# Measured by `edgemoe profile` on {when}; storage figures are from {m['storage_dir']}",
        f"# ({disk}), a {mb} MiB test file read with {st['method']}, one request at a time.",
        f"name: {name}",
        f"description: {yaml.safe_dump(desc, default_style=None, width=1000).strip().splitlines()[0]}",
        f"ram: {_gib(m['ram'])}  # psutil.virtual_memory().total",
        f"default_budget: {_gib(budget)}  # {BUDGET_SHARE:.0%} of ram: the rest is left to the OS and other programs",
        f"cores: {m['cores']}  # os.cpu_count()",
        f"memory_bandwidth_gbps: {m['memory_bandwidth_gbps']:.1f}  # threaded numpy copy of {format_size(m.get('mem_bytes', 256 * MiB))}, "
        "best of 5, read + written bytes per second (STREAM copy convention)",
        "storage:",
        f"  kind: {st['kind']}  # " + (f"from the sysfs name of {disk}" if st["disk"] else
                                       "estimate: the disk is not in /sys/block (tmpfs, overlay?); sata assumed"),
        f"  seq_read_mbps: {st['seq_read_mbps']:.1f}  # 4 MiB sequential reads, {st['method']}",
        f"  rand_read_mbps: {st['rand_read_mbps']:.1f}  # 1 MiB reads at random aligned offsets, {st['method']}",
        f"  read_latency_us: {st['read_latency_us']:.1f}  # median of {st['latency_samples']} random 4 KiB reads "
        f"(p90 {st['read_latency_p90_us']:.0f} us)",
        f"  readahead_kb: {ra}  # {ra_src}",
    ]
    measured = dict(
        storage_method=st["method"], storage_dir=m["storage_dir"], disk=st["disk"], test_file_bytes=st["file_bytes"],
        read_latency_p90_us=round(st["read_latency_p90_us"], 1), seconds=round(m["seconds"], 1),
        load_average_1min=None if m.get("load_average") is None else round(m["load_average"], 2),
    )
    if m.get("kernels"):
        measured["kernels"] = m["kernels"]
    lines.append("# Figures the profile schema has no field for (edgemoe.profiles ignores this mapping):")
    lines.append("# kernel weight throughput (weight bytes / time of one matmul at T=1 on expert-shaped matrices;")
    lines.append("# gbps from the best run, gbps_median from the median, within 0.5 s per kernel).")
    lines.append(yaml.safe_dump(dict(measured=measured), sort_keys=False, default_flow_style=False).rstrip())
    return "\n".join(lines) + "\n"


def write_profile(text: str, out: Path) -> Profile:
    """Validate with edgemoe.profiles.parse_profile, then write atomically (temp file, rename)."""
    prof = parse_profile(yaml.safe_load(text), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return prof


def summary_table(m: dict, out: Path | None = None) -> str:
    st = m["storage"]
    rows = [
        ("storage", f"{st['disk'] or '?'} ({st['kind']}), read with {st['method']}"),
        ("sequential read", f"{st['seq_read_mbps']:.0f} MB/s (4 MiB reads)"),
        ("random read", f"{st['rand_read_mbps']:.0f} MB/s (1 MiB reads)"),
        ("4 KiB read latency", f"{st['read_latency_us']:.0f} us median, {st['read_latency_p90_us']:.0f} us p90"),
        ("readahead", f"{st['readahead_kb']} KiB" if st["readahead_kb"] is not None else "unknown"),
        ("memory bandwidth", f"{m['memory_bandwidth_gbps']:.1f} GB/s (copy, read + write)"),
        ("cores / RAM", f"{m['cores']} / {format_size(m['ram'])}"),
    ]
    k = m.get("kernels")
    if k:
        one = k.get("single_thread", {})

        def fmt(r, r1):
            if "gbps" not in r:
                return r["error"]
            t = f"{r['gbps']:.2f} GB/s best ({r['us']:.0f} us), {r['gbps_median']:.2f} median"
            return t + (f"; 1 thread {r1['gbps']:.2f} best" if r1 and "gbps" in r1 else "")

        rows.append(("kernels", f"weight GB/s of one {k['shape']} matmul at T=1, {k['backend']}, {k['threads']} threads"))
        for name, r in k["gguf"].items():
            rows.append((f"kernel {name}", fmt(r, one.get("gguf", {}).get(name))))
        nst = k.get("nested", {})
        if "error" in nst:
            rows.append(("kernel nested", f"skipped: {nst['error']}"))
        for scheme, r_s in nst.items():
            if scheme == "error":
                continue
            if "error" in r_s:
                rows.append((f"kernel {scheme}", f"skipped: {r_s['error']}"))
                continue
            one_s = one.get("nested", {}).get(scheme, {}).get("widths", {})
            for b, r in r_s["widths"].items():
                rows.append((f"kernel {scheme} {b}-bit", fmt(r, one_s.get(b))))
    la = m.get("load_average")
    if la is not None and la > m["cores"]:
        rows.append(("note", f"load average {la:.1f} on {m['cores']} cores: other processes competed, "
                             "the figures are lower bounds"))
    rows.append(("took", f"{m['seconds']:.1f} s"))
    if out is not None:
        rows.append(("written", str(out)))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


# ---- model profile ---------------------------------------------------------------------------------

def popularity(trace: np.ndarray, n_expert: int) -> dict:
    """Per MoE layer: pick counts, share of picks of the most popular 1/8 of experts, entropy."""
    T, L, K = trace.shape
    layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    counts = np.zeros((L, n_expert), dtype=np.int64)
    top, ent = {}, {}
    n_top = max(1, n_expert // 8)
    for l in layers:
        c = np.bincount(trace[:, l][trace[:, l] >= 0].ravel(), minlength=n_expert)
        counts[l] = c
        p = c / c.sum()
        top[l] = float(np.sort(c)[::-1][:n_top].sum() / c.sum())
        nz = p[p > 0]
        ent[l] = float(-(nz * np.log2(nz)).sum())
    return dict(layers=layers, counts=counts, top_eighth_share=top, entropy_bits=ent,
                max_entropy_bits=math.log2(n_expert), uniform_top_share=n_top / n_expert)


def reuse(trace: np.ndarray, n_expert: int, windows=(1, 2, 4, 8)) -> dict:
    """Segment-cache hit rate: the fraction of a token's chosen experts (per layer) that some of the
    previous w tokens already chose in that layer, averaged over tokens t >= w and MoE layers."""
    T, L, K = trace.shape
    layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    out = {}
    for w in windows:
        vals = []
        for l in layers:
            sets = [{int(e) for e in trace[t, l] if e >= 0} for t in range(T)]
            for t in range(w, T):
                if not sets[t]:
                    continue
                prev = set().union(*sets[t - w:t])
                vals.append(len(sets[t] & prev) / len(sets[t]))
        out[w] = dict(measured=float(np.mean(vals)) if vals else 0.0,
                      uniform=1 - (1 - K / n_expert) ** w)
    return out


def trace_requests(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, layer, expert) arrays in edgemoe.replay.requests' order: token by token, layer by layer,
    each layer's distinct experts ascending; -1 (dense layers) left out."""
    T, L, K = trace.shape
    tok, lay, exp = [], [], []
    for t in range(T):
        for l in range(L):
            for e in sorted({int(x) for x in trace[t, l]}):
                if e >= 0:
                    tok.append(t)
                    lay.append(l)
                    exp.append(e)
    return np.asarray(tok, np.int64), np.asarray(lay, np.int64), np.asarray(exp, np.int64)


_POLICY_ID = {"lru": 0, "lfu": 1, "score": 2}


def _simulate_py(tok, lay, exp, n_layer, n_expert, slots, policy, T, decay=SCORE_DECAY):
    """Misses per token of edgemoe.cache.ExpertCache (one plane per expert, as in edgemoe.replay):
    the same eviction order (the policy key, ties to the entry inserted first) and the same score
    (use frequency decayed at every visit of the expert's layer; a visit begins at each new
    (token, layer)). Compiled with numba where available (the cache itself scans every entry per
    eviction in Python, which takes minutes on a 256-token trace of a real model)."""
    key_of = np.full(n_layer * n_expert, -1, np.int64)
    heat = np.zeros(n_layer * n_expert, np.float64)
    heat_at = np.full(n_layer * n_expert, -1, np.int64)
    visits = np.zeros(n_layer, np.int64)
    keys = np.zeros(slots, np.int64)
    last = np.zeros(slots, np.int64)
    uses = np.zeros(slots, np.int64)
    seq = np.zeros(slots, np.int64)
    misses = np.zeros(T, np.int64)
    used = 0
    clock = 0
    seqc = 0
    for i in range(tok.shape[0]):
        l = lay[i]
        if i == 0 or tok[i] != tok[i - 1] or l != lay[i - 1]:
            visits[l] += 1
        k = l * n_expert + exp[i]
        clock += 1
        if heat_at[k] != visits[l]:
            at = max(heat_at[k], 0)
            heat[k] = heat[k] * decay ** (visits[l] - at) + (1 - decay)
            heat_at[k] = visits[l]
        j = key_of[k]
        if j >= 0:
            last[j] = clock
            uses[j] += 1
            continue
        misses[tok[i]] += 1
        while used + 1 > slots:
            best = -1
            bkey = 0.0
            bseq = 0
            for j in range(used):
                if policy == 0:
                    key = float(last[j])
                elif policy == 1:
                    key = uses[j] + last[j] / (clock + 1)
                else:
                    kj = keys[j]
                    lj = kj // n_expert
                    key = heat[kj] * decay ** (visits[lj] - max(heat_at[kj], 0)) + 1e-9 * last[j] / (clock + 1)
                if best < 0 or key < bkey or (key == bkey and seq[j] < bseq):
                    best, bkey, bseq = j, key, seq[j]
            key_of[keys[best]] = -1
            used -= 1
            if best != used:
                keys[best] = keys[used]
                last[best] = last[used]
                uses[best] = uses[used]
                seq[best] = seq[used]
                key_of[keys[best]] = best
        j = used
        used += 1
        keys[j] = k
        last[j] = clock
        uses[j] = 0
        seq[j] = seqc
        seqc += 1
        key_of[k] = j
    return misses


def _belady_py(tok, lay, exp, n_expert, slots, T):
    """Misses per token of edgemoe.replay.replay_belady (evict the farthest next use; ties to the
    entry inserted first)."""
    n = tok.shape[0]
    keyv = lay * n_expert + exp
    next_use = np.full(n, n, np.int64)
    last_seen = np.full(int(keyv.max()) + 1 if n else 1, n, np.int64)
    for i in range(n - 1, -1, -1):
        next_use[i] = last_seen[keyv[i]]
        last_seen[keyv[i]] = i
    key_of = np.full(last_seen.shape[0], -1, np.int64)
    keys = np.zeros(slots, np.int64)
    nxt = np.zeros(slots, np.int64)
    seq = np.zeros(slots, np.int64)
    misses = np.zeros(T, np.int64)
    used = 0
    seqc = 0
    for i in range(n):
        k = keyv[i]
        j = key_of[k]
        if j >= 0:
            nxt[j] = next_use[i]
            continue
        misses[tok[i]] += 1
        if used >= slots:
            best = 0
            for j in range(1, used):
                if nxt[j] > nxt[best] or (nxt[j] == nxt[best] and seq[j] < seq[best]):
                    best = j
            key_of[keys[best]] = -1
            used -= 1
            if best != used:
                keys[best] = keys[used]
                nxt[best] = nxt[used]
                seq[best] = seq[used]
                key_of[keys[best]] = best
        j = used
        used += 1
        keys[j] = k
        nxt[j] = next_use[i]
        seq[j] = seqc
        seqc += 1
        key_of[k] = j
    return misses


try:
    import numba as _numba

    _simulate = _numba.njit(cache=True)(_simulate_py)
    _belady = _numba.njit(cache=True)(_belady_py)
except ImportError:  # pragma: no cover - numba is a dependency; the Python path is slow but right
    _simulate, _belady = _simulate_py, _belady_py


def simulate(reqs, n_layer: int, n_expert: int, slots: int, policy: str, T: int,
             decay: float = SCORE_DECAY) -> np.ndarray:
    """Misses per token for a policy ("lru", "lfu", "score" with this decay) or "belady" at a cache
    of `slots` experts."""
    tok, lay, exp = reqs
    if policy == "belady":
        return _belady(tok, lay, exp, n_expert, int(slots), T)
    return _simulate(tok, lay, exp, n_layer, n_expert, int(slots), _POLICY_ID[policy], T, float(decay))


def hit_rates(trace: np.ndarray, n_expert: int, slot_counts) -> list[dict]:
    """Per cache size (expert slots): misses of each policy and Belady over the whole trace (cold
    start included) and over its second half after the first half warmed the cache ("warm")."""
    from .cache import POLICIES

    T, L, K = trace.shape
    reqs = trace_requests(trace)
    half = T // 2
    tok = reqs[0]
    rows = []
    for s in slot_counts:
        row = dict(slots=int(s), requests=int(tok.shape[0]), warm_tokens=T - half,
                   warm_requests=int((tok >= half).sum()))
        for p in (*POLICIES, "belady"):
            m = simulate(reqs, L, n_expert, int(s), p, T)
            row[p] = int(m.sum())
            row[p + "_warm"] = int(m[half:].sum())
        rows.append(row)
    return rows


@dataclass
class ModelFacts:
    name: str
    n_layer: int
    n_moe_layers: int
    n_expert: int
    top_k: int
    widths: tuple[int, ...]
    expert_bytes: dict  # width (int) -> bytes of one expert at that nested width; "source" -> as in the GGUF
    dense_bytes: int  # resident non-expert weights
    dense_touched: int  # non-expert weight bytes read per token (token_embd: one row)
    kv_bytes: int
    notes: list = field(default_factory=list)


def model_facts(path: Path, model) -> ModelFacts:
    """Sizes of a loaded model: expert bytes per nested width, dense bytes, KV cache."""
    from . import nested
    from .convert import EXPERT_SUFFIXES, _group_for, source_bits, source_expert_bytes
    from .gguf_file import GGUFFile
    from .store import DENSE, StoreReader, is_store

    c = model.config
    notes = []
    if is_store(path):
        r = StoreReader(path)
        pf = r.manifest["scheme"]["planes_for"]
        eb = {int(b): r.expert_bytes(int(pf[str(b)])) for b in r.bits}
        widths = tuple(r.bits)
        gf = GGUFFile(Path(path) / DENSE)
        r.close()
    else:
        gf = GGUFFile(path)
        moe = [l for l in range(c.n_layer) if gf.maybe(f"blk.{l}.{EXPERT_SUFFIXES['gate']}") is not None]
        first = moe[0]
        src_expert = source_expert_bytes(gf, c)
        sbits = source_bits(gf, c)
        widths = nested.default_bits(sbits)
        scheme = "d2moe"
        try:
            from . import convert as conv

            scheme = getattr(conv, "DEFAULT_SCHEME", "d2moe")  # what `edgemoe convert` would write
            qt = gf.tensor(f"blk.{first}.{EXPERT_SUFFIXES['gate']}").qtype
            try:
                group = _group_for(c, scheme, qt, widths)
            except TypeError:  # an older signature
                group = _group_for(c)
            sch = nested.SCHEMES[scheme](widths, group)
            shapes = [(c.n_ff_exp, c.n_embd), (c.n_ff_exp, c.n_embd), (c.n_embd, c.n_ff_exp)]
            eb = {b: sum(sum(sch.plane_nbytes(o, i)[: sch.planes_for(b)]) for o, i in shapes) for b in widths}
        except Exception as exc:  # noqa: BLE001 - shapes the scheme cannot take: scale by bits
            notes.append(f"nested sizes estimated as source bytes x width / {sbits:g} bits ({scheme}: {exc})")
            eb = {b: int(src_expert * b / sbits) for b in widths}
        eb["source"] = src_expert
    tensors = gf.tensors
    dense = sum(t.nbytes for n, t in tensors.items() if not n.endswith("_exps.weight"))
    emb = tensors.get("token_embd.weight")
    touched = dense - (emb.nbytes - emb.nbytes // max(c.n_vocab, 1) if emb is not None else 0)
    if "output.weight" not in tensors and emb is not None:  # tied output: the whole matrix is read
        touched += emb.nbytes - emb.nbytes // max(c.n_vocab, 1)
    kv = model._cache.nbytes
    n_moe = c.n_layer - c.n_leading_dense
    gf.close()
    return ModelFacts(name=path.name, n_layer=c.n_layer, n_moe_layers=n_moe, n_expert=c.n_expert,
                      top_k=c.n_expert_used, widths=tuple(int(w) for w in widths), expert_bytes=eb,
                      dense_bytes=dense, dense_touched=touched, kv_bytes=kv, notes=notes)


def runtime_bytes() -> int:
    from .api import RUNTIME_ESTIMATE
    from .streaming import SAFETY_BYTES

    return RUNTIME_ESTIMATE + SAFETY_BYTES


def predict(misses_per_token: float, experts_per_token: float, expert_bytes: int, dense_touched: int,
            prof: Profile) -> dict:
    """Tokens/s of decode from the device profile alone (no figure fitted to a run):

        t_compute = (dense_touched + experts_per_token * expert_bytes) / memory_bandwidth
        t_io      = misses_per_token * expert_bytes / rand_read_bw + misses_per_token * read_latency
        tokens/s  = 1 / max(t_compute, t_io)
    """
    bw = prof.memory_bandwidth_gbps * 1e9
    t_compute = (dense_touched + experts_per_token * expert_bytes) / bw
    t_io = misses_per_token * (expert_bytes / (prof.storage.rand_read_mbps * 1e6)
                               + prof.storage.read_latency_us * 1e-6)
    t = max(t_compute, t_io)
    return dict(t_compute=t_compute, t_io=t_io, tokens_per_s=1 / t if t > 0 else math.inf,
                bound="storage" if t_io > t_compute else "memory",
                read_mb_per_token=misses_per_token * expert_bytes / 1e6)


def _slot_grid(n_total: int, top_k: int, n_moe: int) -> list[int]:
    lo = max(top_k, 1)
    grid = {lo, n_total}
    for f in (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9):
        grid.add(max(lo, int(round(f * n_total))))
    for m in (1, 2, 4):  # multiples of one token's experts (the locality paper's ~2x sweet spot)
        grid.add(min(n_total, max(lo, m * top_k * n_moe)))
    return sorted(grid)


def profile_model(model_path: str | os.PathLike, text_path: str | os.PathLike, out_dir: str | os.PathLike,
                  tokens: int = 256, device: str | os.PathLike | None = None, device_measured: dict | None = None,
                  plots: bool = True, trace_path: str | os.PathLike | None = None) -> dict:
    """Routing trace -> popularity, reuse, hit rates, recommendation; writes out_dir/report.md (+ PNGs)."""
    import edgemoe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = ""
    if trace_path is None:
        try:
            text = Path(text_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeMoEError(f"{text_path}: cannot read text file ({exc})") from None
    prof, prof_src = _device_profile(device, device_measured)
    t0 = time.perf_counter()
    with edgemoe.load(model_path, n_ctx=tokens + 8) as m:
        if trace_path is not None:  # a saved trace (trace.npy of an earlier report): no decoding
            trace = np.load(trace_path)
            if trace.ndim != 3 or trace.shape[1] != m.config.n_layer or trace.shape[0] < 2:
                raise EdgeMoEError(f"{trace_path}: not a [tokens, {m.config.n_layer}, top_k] trace of this model")
        else:
            ids = m.tokenize(text)[:tokens]
            if len(ids) < 2:
                raise EdgeMoEError(f"{text_path}: needs at least 2 tokens, has {len(ids)}")
            trace = np.asarray(m.routing_trace(ids))
        facts = model_facts(Path(m.path), m)
        kv_full = facts.kv_bytes  # at n_ctx = tokens + 8
        ctx_for_budget = min(4096, m.config.n_ctx_train)
        kv_full = int(kv_full / m.n_ctx * ctx_for_budget)
    trace_s = time.perf_counter() - t0
    T, L, K = trace.shape
    moe_layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    n_moe = len(moe_layers)
    n_total = n_moe * facts.n_expert
    pop = popularity(trace, facts.n_expert)
    reu = reuse(trace, facts.n_expert)
    slots = _slot_grid(n_total, K, n_moe)
    rows = hit_rates(trace, facts.n_expert, slots)
    from .cache import POLICIES

    experts_per_token = rows[0]["requests"] / T
    # predictions: every width x cache size that fits the device's default budget
    fixed = facts.dense_bytes + kv_full + runtime_bytes()
    budget = prof.default_budget
    preds = []
    for b in facts.widths:
        eb = facts.expert_bytes[b]
        for r in rows:
            best = min(POLICIES, key=lambda p: (r[p + "_warm"], r[p]))
            need = fixed + r["slots"] * eb
            p = predict(r[best + "_warm"] / r["warm_tokens"], experts_per_token, eb, facts.dense_touched, prof)
            preds.append(dict(bits=b, slots=r["slots"], policy=best, budget=need, fits=need <= budget, **p))
    rec = recommend(preds, facts.widths)
    lossy = lossy_option(preds, facts.widths, rec)
    result = dict(trace_shape=[T, L, K], trace_seconds=trace_s, trace_path=trace_path, facts=facts, popularity=pop, reuse=reu,
                  hit_rows=rows, predictions=preds, recommendation=rec, lossy_option=lossy, profile=prof,
                  profile_source=prof_src,
                  experts_per_token=experts_per_token, fixed_bytes=fixed, kv_bytes_at_ctx=kv_full,
                  ctx_for_budget=ctx_for_budget, plots=[])
    if plots:
        result["plots"] = _plots(result, out_dir)
    (out_dir / "report.md").write_text(_report(result, model_path, text_path), encoding="utf-8")
    np.save(out_dir / "trace.npy", trace)
    return result


def _best_per_width(preds: list[dict], widths) -> dict:
    """Per width, among predictions that fit the budget: the smallest cache within 95% of that
    width's fastest fitting cache."""
    per_width = {}
    for b in widths:
        ps = sorted((p for p in preds if p["fits"] and p["bits"] == b), key=lambda p: p["slots"])
        if ps:
            top = max(p["tokens_per_s"] for p in ps)
            per_width[b] = next(p for p in ps if p["tokens_per_s"] >= 0.95 * top)
    return per_width


def recommend(preds: list[dict], widths) -> dict | None:
    """Lossless: the top width (every plane, what quality max reads) at the smallest cache
    predicted within 95% of its fastest cache that fits the budget; None when none fits."""
    return _best_per_width(preds, widths).get(max(widths))


def lossy_option(preds: list[dict], widths, rec: dict | None) -> dict | None:
    """An opt-in, lossy alternative to `rec`: when the top width's best configuration is
    storage-bound (or none fits), the widest narrower width predicted within 90% of the fastest
    width and faster than `rec` (fewer bits per miss); None when fewer bits would not help."""
    per_width = _best_per_width(preds, widths)
    if rec is not None and rec["bound"] == "memory":
        return None  # the nested kernels do not run at memory bandwidth today: no gain counted
    narrower = {b: p for b, p in per_width.items() if b < max(widths)}
    if not narrower:
        return None
    fastest = max(p["tokens_per_s"] for p in per_width.values())
    for b in sorted(narrower, reverse=True):
        p = narrower[b]
        if p["tokens_per_s"] >= 0.9 * fastest and (rec is None or p["tokens_per_s"] > rec["tokens_per_s"]):
            return p
    return None


def default_profiles_dir() -> Path:
    """profiles/ of a source checkout when running from one, else ./profiles."""
    here = Path(__file__).resolve().parent.parent / "profiles"
    return here if here.is_dir() and (here.parent / "pyproject.toml").is_file() else Path("profiles")


def _device_profile(device, measured) -> tuple[Profile, str]:
    if device is not None:
        return load_profile(device), str(device)
    for d in (Path("profiles"), default_profiles_dir()):
        here = d / "this-machine.yaml"
        if here.is_file():
            return load_profile(here), str(here)
    m = measured or measure_device(size=64 * MiB, mem_bytes=128 * MiB, kernels=False, time_limit=1.5)
    prof = parse_profile(yaml.safe_load(profile_yaml(m, "this-machine")), "measured")
    return prof, "measured now (no --device, no profiles/this-machine.yaml): 64 MiB test file"


def _plots(res: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .cache import POLICIES

    rows = res["hit_rows"]
    n_total = res["facts"].n_expert * len(res["popularity"]["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    xs = [r["slots"] / n_total for r in rows]
    for ax, suffix, den, title in ((axes[0], "", "requests", "whole trace (cold start)"),
                                   (axes[1], "_warm", "warm_requests", "second half (warm)")):
        for p in (*POLICIES, "belady"):
            ax.plot(xs, [1 - r[p + suffix] / max(r[den], 1) for r in rows], marker="o", ms=3, label=p,
                    ls="--" if p == "belady" else "-")
        ax.set_xlabel("cache size (fraction of all experts)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title)
    axes[0].set_ylabel("hit rate")
    axes[0].legend()
    fig.suptitle("Expert cache hit rate vs cache size")
    fig.tight_layout()
    fig.savefig(out_dir / "hit_rate.png", dpi=110)
    plt.close(fig)
    pop = res["popularity"]
    counts = pop["counts"][pop["layers"]]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(pop["layers"]) + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, len(pop["layers"]) // 24)
    ax.set_yticks(range(0, len(pop["layers"]), step))
    ax.set_yticklabels(pop["layers"][::step])
    fig.colorbar(im, ax=ax, label="share of the layer's picks")
    ax.set_title("Expert popularity")
    fig.tight_layout()
    fig.savefig(out_dir / "popularity.png", dpi=110)
    plt.close(fig)
    return ["hit_rate.png", "popularity.png"]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _report(res: dict, model_path, text_path) -> str:
    from .cache import POLICIES

    f: ModelFacts = res["facts"]
    prof: Profile = res["profile"]
    T, L, K = res["trace_shape"]
    pop, reu, rows = res["popularity"], res["reuse"], res["hit_rows"]
    n_total = f.n_expert * len(pop["layers"])
    out = [f"# Model profile: {Path(model_path).name}", ""]
    src = (f"the saved trace `{res['trace_path']}`" if res.get("trace_path") else
           f"the first {T} tokens of `{text_path}`, decoded one at a time ({res['trace_seconds']:.1f} s)")
    out += [f"Trace: {src}: {T} tokens, "
            f"{L} layers ({len(pop['layers'])} MoE), {f.n_expert} experts per layer, top-{K}, "
            f"{res['experts_per_token']:.1f} expert reads per token if nothing were cached.", ""]
    out += ["## Sizes", "", "| what | bytes |", "|---|---|"]
    for b in f.widths:
        out.append(f"| one expert at {b} bits (nested) | {format_size(f.expert_bytes[b])} |")
    if "source" in f.expert_bytes:
        out.append(f"| one expert as in the GGUF | {format_size(f.expert_bytes['source'])} |")
    out += [f"| dense weights (resident) | {format_size(f.dense_bytes)} |",
            f"| dense weights read per token | {format_size(f.dense_touched)} |",
            f"| KV cache at n_ctx={res['ctx_for_budget']} | {format_size(res['kv_bytes_at_ctx'])} |", ""]
    out += [*(f"Note: {n}" for n in f.notes), ""] if f.notes else []
    out += ["## Expert popularity", "",
            f"Share of a layer's picks that go to its most popular 1/8 of experts (uniform routing: "
            f"{pop['uniform_top_share']:.1%}), and the entropy of its pick distribution (uniform: "
            f"{pop['max_entropy_bits']:.2f} bits).", "",
            "| layer | top-1/8 share | entropy (bits) |", "|---|---|---|"]
    for l in pop["layers"]:
        out.append(f"| {l} | {pop['top_eighth_share'][l]:.1%} | {pop['entropy_bits'][l]:.2f} |")
    ts = list(pop["top_eighth_share"].values())
    es = list(pop["entropy_bits"].values())
    out += [f"| mean | {np.mean(ts):.1%} | {np.mean(es):.2f} |", ""]
    if "popularity.png" in res["plots"]:
        out += ["![expert popularity](popularity.png)", ""]
    out += ["## Token-to-token reuse", "",
            "Segment-cache hit rate (as in arXiv 2505.16056): the fraction of a token's chosen experts in a "
            "layer that at least one of the previous w tokens chose in that layer, averaged over tokens and "
            "MoE layers; uniform = 1 - (1 - k/E)^w, what independent uniform routing would give.", "",
            "| window w | measured | uniform |", "|---|---|---|"]
    for w, r in reu.items():
        out.append(f"| {w} | {r['measured']:.1%} | {r['uniform']:.1%} |")
    out += ["", "## Hit rate against cache size", "",
            f"Cache size in expert slots (all {n_total} experts = 100%), every expert read whole, each "
            "policy as edgemoe's expert cache runs it; Belady (offline optimum) is the yardstick. "
            "cold: the whole trace from an empty cache (the first use of each expert always misses); "
            f"warm: its last {rows[0]['warm_tokens']} tokens, after the first ones filled the cache.", "",
            "| slots | of all | " + " | ".join(f"{p} cold" for p in (*POLICIES, "belady")) + " | "
            + " | ".join(f"{p} warm" for p in (*POLICIES, "belady")) + " |",
            "|---|---|" + "---|" * (2 * len(POLICIES) + 2)]
    for r in rows:
        out.append(f"| {r['slots']} | {r['slots'] / n_total:.0%} | "
                   + " | ".join(f"{1 - r[p] / r['requests']:.1%}" for p in (*POLICIES, "belady")) + " | "
                   + " | ".join(f"{1 - r[p + '_warm'] / max(r['warm_requests'], 1):.1%}" for p in (*POLICIES, "belady"))
                   + " |")
    out.append("")
    if "hit_rate.png" in res["plots"]:
        out += ["![hit rate vs cache size](hit_rate.png)", ""]
    elif not res["plots"]:
        out += ["(plots skipped: matplotlib is not installed; `pip install edgemoe[plots]`)", ""]
    out += ["## Prediction for this device", "",
            f"Device: {prof.name} ({res['profile_source']}): memory {prof.memory_bandwidth_gbps:g} GB/s, storage "
            f"{prof.storage.kind} {prof.storage.rand_read_mbps:g} MB/s random 1 MiB reads, "
            f"{prof.storage.read_latency_us:g} us per read; default budget {format_size(prof.default_budget)}.", "",
            "Per token: misses = expert reads per token of the best policy at that cache size, warm (the "
            "trace's second half); "
            "t_compute = (dense bytes read + experts per token x expert bytes) / memory bandwidth; "
            "t_io = misses x (expert bytes / random-read bandwidth + read latency); "
            "tokens/s = 1 / max(t_compute, t_io). Budget = dense weights + KV cache at "
            f"n_ctx={res['ctx_for_budget']} + runtime estimate + cache slots x expert bytes. Nothing here is "
            "fitted to a measured run (docs/profiles.md).", "",
            "| bits | slots | policy | budget | fits | MB read/token | bound | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
    for p in res["predictions"]:
        out.append(f"| {p['bits']} | {p['slots']} | {p['policy']} | {format_size(p['budget'])} | "
                   f"{'yes' if p['fits'] else 'no'} | {p['read_mb_per_token']:.2f} | {p['bound']} | "
                   f"{p['tokens_per_s']:.2f} |")
    out.append("")
    rec = res["recommendation"]
    out += ["## Recommendation", ""]
    if rec is None:
        out += [f"Nothing fits the device's default budget {format_size(prof.default_budget)} at the top width "
                f"(every plane, lossless): the dense weights, KV cache and runtime alone need "
                f"{format_size(res['fixed_bytes'])}, and the smallest cache at that width the rest.", ""]
    else:
        out += [f"- budget: **{format_size(rec['budget'])}** (of the device's default {format_size(prof.default_budget)})",
                f"- bit width: **{rec['bits']}**, the top width: every plane, lossless (quality max, the default; "
                "a lossy narrower width, where it would help, is below)",
                "- cache size: the smallest predicted within 95% of the fastest cache that fits at that width",
                f"- cache: **{rec['slots']} expert slots** ({rec['slots'] / n_total:.0%} of all experts, "
                f"{format_size(rec['slots'] * f.expert_bytes[rec['bits']])}), policy **{rec['policy']}**",
                f"- predicted decode: **{rec['tokens_per_s']:.2f} tokens/s** ({rec['bound']}-bound, "
                f"{rec['read_mb_per_token']:.2f} MB read per token)", ""]
        out += [f"`edgemoe run -m {model_path} --budget {_budget_str(rec['budget'])} --policy {rec['policy']} ...` "
                "(quality max, the default: lossless)", ""]
    lossy = res.get("lossy_option")
    if lossy is not None:
        gain = f", {lossy['tokens_per_s'] / rec['tokens_per_s']:.2f}x the lossless one" if rec else ""
        out += ["Opt-in and lossy: fewer bits per expert relieve the storage bound. "
                f"**{lossy['bits']}-bit experts**, {lossy['slots']} slots ({lossy['policy']}), budget "
                f"{format_size(lossy['budget'])}: predicted {lossy['tokens_per_s']:.2f} tokens/s ({lossy['bound']}-bound"
                f"{gain}). Price it before use: `edgemoe bench` gives a lossy quality's KL divergence against max.", "",
                f"`edgemoe run -m {model_path} --budget {_budget_str(lossy['budget'])} --bits {lossy['bits']} "
                f"--policy {lossy['policy']} ...` (lossy)", ""]
    return "\n".join(out)


def _budget_str(n: int) -> str:
    return f"{math.ceil(n / MiB)}MiB"


# ---- CLI ---------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("-m", "--model", help="profile this model's routing on this device instead (needs --text)")
    p.add_argument("--text", help="text file whose first --tokens tokens make the routing trace")
    p.add_argument("--tokens", type=int, default=256, help="tokens to trace (default 256)")
    p.add_argument("--out-dir", help="where the model report goes (default: profile-MODEL/)")
    p.add_argument("--device", help="device profile (name or YAML path) for the model report's prediction "
                   "(default: profiles/this-machine.yaml if present, else measured now)")
    p.add_argument("--storage", help="measure the storage holding this directory (default: ~/.cache/edgemoe)")
    p.add_argument("--out", help="profile to write (default: profiles/NAME.yaml)")
    p.add_argument("--name", default="this-machine", help="profile name (default this-machine)")
    p.add_argument("--description", help="profile description")
    p.add_argument("--size", default="256MiB", help="storage test file size (default 256MiB)")
    p.add_argument("--mem-size", default="256MiB", help="memory bandwidth array size (default 256MiB)")
    p.add_argument("--time-limit", type=float, default=4.0, help="seconds per storage test at most (default 4)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel throughput measurements")
    p.add_argument("--no-plots", action="store_true", help="model report without PNG plots")
    p.add_argument("--trace", help="use this saved routing trace (trace.npy of an earlier report) instead of decoding")


def run_cli(args) -> int:
    if args.model:
        if not args.text and not args.trace:
            raise EdgeMoEError("profiling a model needs --text FILE (or a saved --trace)")
        if args.tokens < 2:
            raise EdgeMoEError(f"--tokens must be at least 2, got {args.tokens}")
        out_dir = Path(args.out_dir or f"profile-{Path(args.model).stem}")
        res = profile_model(args.model, args.text, out_dir, tokens=args.tokens, device=args.device,
                            plots=not args.no_plots, trace_path=args.trace)
        rec = res["recommendation"]
        print(f"report: {out_dir / 'report.md'}")
        if rec:
            print(f"recommended: budget {format_size(rec['budget'])}, {rec['bits']}-bit experts (quality max, "
                  f"lossless), {rec['slots']} cache slots ({rec['policy']}), predicted {rec['tokens_per_s']:.2f} tokens/s")
        else:
            print("nothing fits the device's default budget at every plane (see the report)")
        lossy = res["lossy_option"]
        if lossy:
            print(f"opt-in, lossy: {lossy['bits']}-bit experts (--bits {lossy['bits']}), budget "
                  f"{format_size(lossy['budget'])}, predicted {lossy['tokens_per_s']:.2f} tokens/s")
        return 0
    size = parse_size(args.size, "--size")
    mem = parse_size(args.mem_size, "--mem-size")
    if size < 2 * SEQ_BLOCK:
        raise EdgeMoEError(f"--size must be at least {2 * SEQ_BLOCK // MiB}MiB, got {args.size!r}")
    name = args.name
    if not name or "/" in name:
        raise EdgeMoEError(f"--name {name!r}: a profile name is a file stem")
    out = Path(args.out) if args.out else default_profiles_dir() / f"{name}.yaml"
    storage = Path(args.storage) if args.storage else None
    if storage is not None and not storage.is_dir():
        raise EdgeMoEError(f"--storage {storage}: not a directory")
    m = measure_device(storage, size=size, mem_bytes=mem, kernels=not args.no_kernels, time_limit=args.time_limit)
    m["mem_bytes"] = mem
    text = profile_yaml(m, name, args.description)
    write_profile(text, out)
    print(summary_table(m, out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["profile", *sys.argv[1:]]))
