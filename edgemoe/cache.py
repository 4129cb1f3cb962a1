"""The expert cache: experts held at some number of nested planes, within a byte budget.

One narrow interface: get(layer, expert, n_planes) -> plane buffers (reading what is missing),
with eviction by policy and downgrades (dropping an entry's highest planes) before evictions.
Buffers are anonymous mmaps, so an evicted plane's memory goes back to the OS at once (malloc
arenas would keep it and RSS would drift above the budget).
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import EdgeMoEError
from .store import StoreReader

POLICIES = ("lru", "lfu", "score")


def alloc(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]


@dataclass
class Entry:
    layer: int
    expert: int
    planes: list[np.ndarray]
    nbytes: int = 0
    last_use: int = 0
    uses: int = 0


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    partial_hits: int = 0  # resident, but at fewer planes than wanted: upgraded
    bytes_read: int = 0
    evictions: int = 0
    upgrades: int = 0
    downgrades: int = 0
    io_seconds: float = 0.0
    per_expert: dict[int, list[int]] = field(default_factory=dict)  # e -> [hits, misses, partial]


def policy_key(policy: str, e: Entry, clock: int, layer: int, n_layer: int) -> float:
    """Lower = evicted first."""
    if policy == "lru":
        return e.last_use
    if policy == "lfu":
        return e.uses + e.last_use / (clock + 1)  # ties broken by recency
    # score: recency and frequency, and experts of layers that come soon are worth more
    dist = (e.layer - layer) % n_layer  # 0 = the layer running now, then the next ones
    recency = 1.0 / (1 + clock - e.last_use)
    return recency + 0.05 * np.log1p(e.uses) + 0.5 * (1 - dist / n_layer)


class ExpertCache:
    def __init__(self, reader: StoreReader, capacity_bytes: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise EdgeMoEError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.reader = reader
        self.capacity = int(capacity_bytes)
        self.policy = policy
        self.entries: dict[tuple[int, int], Entry] = {}
        self.nbytes = 0
        self.clock = 0
        self.layers = [LayerStats() for _ in range(reader.n_layer)]
        self.plane_sizes = [reader.plane_size(p) for p in range(reader.n_planes)]

    def get(self, layer: int, expert: int, n_planes: int, pinned: frozenset = frozenset()) -> list[np.ndarray]:
        self.clock += 1
        st = self.layers[layer]
        pe = st.per_expert.setdefault(expert, [0, 0, 0])
        key = (layer, expert)
        ent = self.entries.get(key)
        have = len(ent.planes) if ent else 0
        if ent is not None and have >= n_planes:
            st.hits += 1
            pe[0] += 1
        else:
            need = sum(self.plane_sizes[have:n_planes])
            self._make_room(need, layer, pinned | {key})
            bufs = [alloc(self.plane_sizes[p]) for p in range(have, n_planes)]
            t0 = time.perf_counter()
            self.reader.read_planes(layer, expert, have, bufs)
            st.io_seconds += time.perf_counter() - t0
            st.bytes_read += need
            if ent is None:
                st.misses += 1
                pe[1] += 1
                ent = self.entries[key] = Entry(layer, expert, [])
            else:
                st.partial_hits += 1
                st.upgrades += 1
                pe[2] += 1
            ent.planes.extend(bufs)
            ent.nbytes += need
            self.nbytes += need
        ent.last_use = self.clock
        ent.uses += 1
        return ent.planes[:n_planes]

    def _make_room(self, need: int, layer: int, pinned) -> None:
        if need > self.capacity:
            raise EdgeMoEError(
                f"one expert needs {need} bytes but the expert cache holds {self.capacity}: raise the budget"
            )
        n_layer = len(self.layers)
        while self.nbytes + need > self.capacity:
            victims = [e for k, e in self.entries.items() if k not in pinned]
            if not victims:
                raise EdgeMoEError("the expert cache is too small for the experts one layer needs at once")
            v = min(victims, key=lambda e: policy_key(self.policy, e, self.clock, layer, n_layer))
            st = self.layers[v.layer]
            if len(v.planes) > 1:  # drop the highest plane first: the expert stays usable at fewer bits
                top = v.planes.pop()
                v.nbytes -= top.nbytes
                self.nbytes -= top.nbytes
                st.downgrades += 1
            else:
                del self.entries[(v.layer, v.expert)]
                self.nbytes -= v.nbytes
                st.evictions += 1

    def shrink_to_capacity(self) -> None:
        """After the capacity was lowered: downgrade and evict until the entries fit."""
        if self.entries:
            self._make_room(0, next(iter(self.entries))[0], frozenset())

    def resident_planes(self) -> dict[tuple[int, int], int]:
        return {k: len(e.planes) for k, e in self.entries.items()}

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
