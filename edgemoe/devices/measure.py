"""Measure this device for `edgemoe profile` and write the profile YAML (edgemoe.devices.profiles' format).

Device figures (docs/profiles.md says how each is measured):
- storage: a temporary test file on the storage holding --storage, read with O_DIRECT where the
  filesystem allows it (else the file's page cache is dropped with posix_fadvise(DONTNEED) before each
  test): sequential reads of 4 MiB, random reads of 1 MiB, random reads of 4 KiB (median latency), one
  request at a time; the disk's read_ahead_kb from sysfs.
- memory bandwidth: a multi-threaded numpy copy of a large array, STREAM "copy" convention (bytes
  read + bytes written per second).
- kernels: edgemoe.devices.kernel_speed.measure_kernels (weight bytes per second of the matmul kernels).
"""

from __future__ import annotations

import concurrent.futures
import math
import mmap
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from ..fileio import write_text_atomic
from ..runtime.memory import format_size
from .kernel_speed import measure_kernels
from .profiles import Profile, parse_profile

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
        kind=kind,
        disk=disk,
        readahead_kb=ra,
        method=method,
        file_bytes=size,
        seq_read_mbps=seq,
        rand_read_mbps=rand,
        read_latency_us=statistics.median(lat_us),
        read_latency_p90_us=lat_us[int(0.9 * (len(lat_us) - 1))],
        latency_samples=len(lat_us),
    )


# ---- memory ----------------------------------------------------------------------------------------


def measure_memory_bandwidth(nbytes: int = 256 * MiB, repeats: int = 5, threads: int | None = None) -> float:
    """GB/s of a threaded numpy copy of nbytes (STREAM copy convention: read + written bytes), best run."""
    threads = threads or os.cpu_count() or 1
    n = nbytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def part(i):
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(part, range(threads)))  # the first run faults the pages in
        for _ in range(repeats):
            t = time.perf_counter()
            list(ex.map(part, range(threads)))
            best = min(best, time.perf_counter() - t)
    return 2 * n * 8 / best / 1e9


# ---- device profile --------------------------------------------------------------------------------


def measure_device(
    storage_dir: Path | None = None,
    size: int = 256 * MiB,
    mem_bytes: int = 256 * MiB,
    kernels: bool = True,
    time_limit: float = 4.0,
    kernel_budget_s: float = 0.5,
    nested_bits=(2, 3, 4, 8),
) -> dict:
    import psutil

    storage_dir = Path(storage_dir) if storage_dir else default_storage_dir()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    st = measure_storage(storage_dir, size, time_limit)
    mem = measure_memory_bandwidth(mem_bytes)
    kern = measure_kernels(budget_s=kernel_budget_s, nested_bits=nested_bits) if kernels else None
    return dict(
        storage=st,
        storage_dir=str(storage_dir),
        memory_bandwidth_gbps=mem,
        cores=os.cpu_count() or 1,
        ram=psutil.virtual_memory().total,
        kernels=kern,
        seconds=time.perf_counter() - t0,
        load_average=load_before,
    )


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
    ra_src = (
        f"/sys/block/{disk}/queue/read_ahead_kb"
        if st["readahead_kb"]
        else "estimate: not readable here; the Linux default (128 KiB)"
    )
    budget = int(m["ram"] * BUDGET_SHARE)
    lines = [
        f"# Measured by `edgemoe profile` on {when}; storage figures are from {m['storage_dir']}",
        f"# ({disk}), a {mb} MiB test file read with {st['method']}, one request at a time.",
        f"name: {name}",
        f"description: {yaml.safe_dump(desc, default_style=None, width=1000).strip().splitlines()[0]}",
        f"ram: {_gib(m['ram'])}  # psutil.virtual_memory().total",
        f"default_budget: {_gib(budget)}  # {BUDGET_SHARE:.0%} of ram: the rest is left to the OS and other programs",
        f"cores: {m['cores']}  # os.cpu_count()",
        f"memory_bandwidth_gbps: {m['memory_bandwidth_gbps']:.1f}  # threaded numpy copy of "
        f"{format_size(m.get('mem_bytes', 256 * MiB))}, "
        "best of 5, read + written bytes per second (STREAM copy convention)",
        "storage:",
        f"  kind: {st['kind']}  # "
        + (
            f"from the sysfs name of {disk}"
            if st["disk"]
            else "estimate: the disk is not in /sys/block (tmpfs, overlay?); sata assumed"
        ),
        f"  seq_read_mbps: {st['seq_read_mbps']:.1f}  # 4 MiB sequential reads, {st['method']}",
        f"  rand_read_mbps: {st['rand_read_mbps']:.1f}  # 1 MiB reads at random aligned offsets, {st['method']}",
        f"  read_latency_us: {st['read_latency_us']:.1f}  # median of {st['latency_samples']} random 4 KiB reads "
        f"(p90 {st['read_latency_p90_us']:.0f} us)",
        f"  readahead_kb: {ra}  # {ra_src}",
    ]
    measured = dict(
        storage_method=st["method"],
        storage_dir=m["storage_dir"],
        disk=st["disk"],
        test_file_bytes=st["file_bytes"],
        read_latency_p90_us=round(st["read_latency_p90_us"], 1),
        seconds=round(m["seconds"], 1),
        load_average_1min=None if m.get("load_average") is None else round(m["load_average"], 2),
    )
    if m.get("kernels"):
        measured["kernels"] = m["kernels"]
    lines.append("# Figures the profile schema has no field for (edgemoe.devices.profiles ignores this mapping):")
    lines.append("# kernel weight throughput (weight bytes / time of one matmul at T=1 on expert-shaped matrices;")
    lines.append("# gbps from the best run, gbps_median from the median, within 0.5 s per kernel).")
    lines.append(yaml.safe_dump(dict(measured=measured), sort_keys=False, default_flow_style=False).rstrip())
    return "\n".join(lines) + "\n"


def write_profile(text: str, out: Path) -> Profile:
    """Validate with edgemoe.devices.profiles.parse_profile, then write atomically (temp file, rename)."""
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

        rows.append(
            ("kernels", f"weight GB/s of one {k['shape']} matmul at T=1, {k['backend']}, {k['threads']} threads")
        )
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
        rows.append(
            (
                "note",
                f"load average {la:.1f} on {m['cores']} cores: other processes competed, the figures are lower bounds",
            )
        )
    rows.append(("took", f"{m['seconds']:.1f} s"))
    if out is not None:
        rows.append(("written", str(out)))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
