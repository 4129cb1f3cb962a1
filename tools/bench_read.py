#!/usr/bin/env python3
"""Reading experts from a store: buffered reads (what StoreReader does: posix_fadvise RANDOM,
preadv into the planes' buffers, then FADV_DONTNEED) against O_DIRECT reads (the page cache
bypassed: 4 KiB-aligned offsets, lengths and buffers), from a cold page cache.

    python tools/bench_read.py STORE [--experts 400] [--threads 1,2] [--seed 0] [--planes]

Each run reads the same random (layer, expert) sequence whole (every plane, one read per
expert, as a full-width miss does; --planes: one read per plane, as the pipeline reads, O_DIRECT
reading the whole pages around each) with 1 or more reader threads, and prints MB/s and
microseconds per expert; the page cache is dropped before each run (root: /proc/sys/vm/drop_caches).
The checksum (xxh3, as the reader verifies every plane) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe.store.format import checksum, shard_name  # noqa: E402
from edgemoe.store.reader import StoreReader  # noqa: E402

PAGE = 4096


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def buffer(n: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, n), np.uint8)


def run(reader: StoreReader, picks, direct: bool, threads: int, per_plane: bool) -> dict:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {}
    for layer, _ in picks:
        if layer not in fds:
            fds[layer] = os.open(reader.root / shard_name(layer), flags)
            if not direct:
                os.posix_fadvise(fds[layer], 0, 0, os.POSIX_FADV_RANDOM)
    size = max(reader.expert_bytes(reader.n_planes, layer) for layer, _ in picks)
    bufs = [buffer(-(-size // PAGE) * PAGE + PAGE) for _ in range(threads)]

    def read(i: int, layer: int, e: int) -> int:
        loc = reader.locations[layer][e]
        buf, got = bufs[i % threads], 0
        spans = [(0, loc.plane_offsets[-1])] if not per_plane else list(zip(loc.plane_offsets, loc.plane_offsets[1:]))
        for a, b in spans:
            start, n = loc.offset + a, b - a
            if direct:  # whole pages around the span
                a0 = start - start % PAGE
                length = -(-(start + n - a0) // PAGE) * PAGE
                got += min(os.preadv(fds[layer], [memoryview(buf)[:length]], a0), n)
            else:
                got += os.preadv(fds[layer], [memoryview(buf)[:n]], start)
                os.posix_fadvise(fds[layer], start, n, os.POSIX_FADV_DONTNEED)
        return got

    drop_caches()
    t0 = time.perf_counter()
    if threads == 1:
        total = sum(read(0, layer, e) for layer, e in picks)
    else:
        with ThreadPoolExecutor(threads) as ex:
            total = sum(ex.map(lambda a: read(a[0], *a[1]), enumerate(picks)))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return dict(
        direct=direct, threads=threads, per_plane=per_plane, mb_s=total / dt / 1e6, us_per_expert=dt / len(picks) * 1e6
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--experts", type=int, default=400)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--planes", action="store_true", help="one read per plane, as the pipeline reads")
    args = ap.parse_args(argv)
    reader = StoreReader(args.store)
    rng = np.random.default_rng(args.seed)
    layers = [i for i, loc in enumerate(reader.locations) if loc]
    chosen = rng.choice(layers, args.experts)
    picks = [(int(layer), int(rng.integers(len(reader.locations[layer])))) for layer in chosen]
    rows = []
    for th in [int(t) for t in args.threads.split(",")]:
        for direct in (False, True):
            r = run(reader, picks, direct, th, args.planes)
            rows.append(r)
            print(
                f"{'O_DIRECT' if direct else 'buffered':9} threads {th}: {r['mb_s']:7.1f} MB/s, "
                f"{r['us_per_expert']:8.1f} us per expert",
                flush=True,
            )
    layer, e = picks[0]
    buf = buffer(reader.expert_bytes(reader.n_planes, layer))
    t0 = time.perf_counter()
    for _ in range(20):
        checksum(buf)
    dt = (time.perf_counter() - t0) / 20
    mb = buf.nbytes / 1e6
    print(f"checksum (xxh3) of one expert ({mb:.2f} MB): {dt * 1e6:.0f} us, {mb / dt / 1e3:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, checksum_us=dt * 1e6), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
