"""The expert cache: experts held at some number of nested planes, within a byte budget.

One narrow interface: get(layer, expert, n_planes) -> plane buffers (reading what is missing),
with eviction by policy and downgrades (dropping an entry's highest planes) before evictions.
Buffers are anonymous mmaps, so an evicted plane's memory goes back to the OS at once (malloc
arenas would keep it and RSS would drift above the budget).
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeMoEError
from ..store.reader import StoreReader

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
    fast: dict | None = None  # ggml-format weights that replaced the planes (streaming.StoreExperts)
    prefetched: bool = False  # brought in by a prefetch
    used: bool = False  # computed with at least once


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


# score: an expert's use frequency, decayed by SCORE_DECAY at every visit of its layer (one per
# decoded token), so it mixes frequency and recency. `tools/replay_trace.py --decays` on a routing
# trace of the OLMoE-shaped bench model (256 tokens of validation text), misses per token at
# 25/33/40% of the experts: decay 0.5 79.6/64.7/52.7, 0.9 65.9/53.1/43.6, 0.95 62.2/49.2/39.8,
# 0.98 60.4/47.6/38.2 (docs/benchmarks.md). 0.95 was chosen on the previous bench model's traces,
# where 0.98 was within 1.5%; here 0.98 is 3-4% better.
SCORE_DECAY = 0.95
# D2MoE's budget rule: the previous layer's high-bit planes go first (its experts stay usable at
# fewer bits); whole entries and low-bit planes then by the policy. The previous code also evicted
# the previous layer's experts whole before any other (the rule's second half) with a recency +
# frequency + layer-distance score: 1.70 tok/s against 3.27 with this one on the previous bench
# model's eMMC bench at 40% (docs/benchmarks.md); those are the experts the next token most often
# reuses.


def policy_key(policy: str, e: Entry, clock: int, heat: float) -> float:
    """Lower = evicted first."""
    if policy == "lru":
        return e.last_use
    if policy == "lfu":
        return e.uses + e.last_use / (clock + 1)  # ties broken by recency
    return heat + 1e-9 * e.last_use / (clock + 1)


class ExpertCache:
    """Not thread-safe by itself: the I/O pipeline serialises access with `cond`."""

    def __init__(self, reader: StoreReader, capacity_bytes: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise EdgeMoEError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.reader = reader
        self.capacity = int(capacity_bytes)
        self.policy = policy
        self.entries: dict[tuple[int, int], Entry] = {}
        self.nbytes = 0  # resident plane bytes, plus bytes reserved for reads in flight
        self.clock = 0
        self.layers = [LayerStats() for _ in range(reader.n_layer)]
        self.plane_sizes = [reader.plane_size(p) for p in range(reader.n_planes)]
        self.cond = threading.Condition()
        self.prefetch_wasted_bytes = 0  # prefetched planes dropped before any use
        self.visits = [0] * reader.n_layer  # visits of each layer (visit())
        self.heat: dict[tuple[int, int], tuple[float, int]] = {}  # (layer, e) -> (score, at visit)

    def visit(self, layer: int) -> None:
        """A new pass through `layer` (one decoded token, or one prefill batch) begins."""
        self.visits[layer] += 1

    def _heat(self, layer: int, expert: int) -> float:
        v, at = self.heat.get((layer, expert), (0.0, 0))
        return v * SCORE_DECAY ** (self.visits[layer] - at)

    def count(self, layer: int, expert: int, n_planes: int) -> str:
        """Record a request for an expert at n_planes: "hit", "partial" (resident at fewer planes:
        an upgrade follows) or "miss"."""
        self.clock += 1
        st = self.layers[layer]
        pe = st.per_expert.setdefault(expert, [0, 0, 0])
        ent = self.entries.get((layer, expert))
        have = len(ent.planes) if ent else 0
        if have >= n_planes:
            st.hits += 1
            pe[0] += 1
            kind = "hit"
        elif have:
            st.partial_hits += 1
            st.upgrades += 1
            pe[2] += 1
            kind = "partial"
        else:
            st.misses += 1
            pe[1] += 1
            kind = "miss"
        if ent is not None:
            ent.last_use = self.clock
            ent.uses += 1
        key = (layer, expert)
        if self.heat.get(key, (0.0, -1))[1] != self.visits[layer]:  # once per visit
            self.heat[key] = (self._heat(layer, expert) + (1 - SCORE_DECAY), self.visits[layer])
        return kind

    def get(self, layer: int, expert: int, n_planes: int, pinned: frozenset = frozenset()) -> list[np.ndarray]:
        """The expert's first n_planes, reading what is missing in one contiguous read."""
        self.count(layer, expert, n_planes)
        key = (layer, expert)
        ent = self.entries.get(key)
        have = len(ent.planes) if ent else 0
        if have < n_planes:
            need = sum(self.plane_sizes[have:n_planes])
            self.make_room(need, layer, pinned | {key})
            bufs = [alloc(self.plane_sizes[p]) for p in range(have, n_planes)]
            t0 = time.perf_counter()
            try:
                self.reader.read_planes(layer, expert, have, bufs)
            finally:
                self.nbytes -= need  # the reservation becomes the planes' own bytes below
            self.layers[layer].io_seconds += time.perf_counter() - t0
            ent = self.add_planes(layer, expert, bufs)
        ent = self.entries[key]
        ent.used = True
        return ent.planes[:n_planes]

    def add_planes(self, layer: int, expert: int, bufs: list[np.ndarray], prefetched: bool = False) -> Entry:
        key = (layer, expert)
        ent = self.entries.get(key)
        if ent is None:
            ent = self.entries[key] = Entry(layer, expert, [], last_use=self.clock, prefetched=prefetched)
        have = len(ent.planes)
        n = sum(self.plane_sizes[have : have + len(bufs)])  # nominal sizes: the replay tool reads nothing
        ent.planes.extend(bufs)
        ent.nbytes += n
        self.nbytes += n
        self.layers[layer].bytes_read += n
        return ent

    def make_room(self, need: int, layer: int, pinned) -> None:
        if not self.try_make_room(need, layer, pinned):
            raise EdgeMoEError("the expert cache is too small for the experts one layer needs at once")
        self.nbytes += need  # reserved for the read

    def try_make_room(self, need: int, layer: int, pinned) -> bool:
        """Free room for `need` bytes by D2MoE's budget rule combined with the policy: first the
        previous layer's highest planes, then its lowest; then by policy, highest planes first.
        False when only pinned entries are left to drop (the caller waits for them)."""
        if need > self.capacity:
            raise EdgeMoEError(
                f"one expert needs {need} bytes but the expert cache holds {self.capacity}: raise the budget"
            )
        prev = (layer - 1) % len(self.layers)
        while self.nbytes + need > self.capacity:
            victims = [e for k, e in self.entries.items() if k not in pinned]
            if not victims:
                return False

            def rank(e: Entry):
                key = policy_key(self.policy, e, self.clock, self._heat(e.layer, e.expert))
                return (0 if e.layer == prev and len(e.planes) > 1 and e.fast is None else 1, key)

            self._drop_top(min(victims, key=rank))
        return True

    def _drop_top(self, v: Entry) -> None:
        """Drop v's highest plane (the expert stays usable at fewer bits), or v itself."""
        st = self.layers[v.layer]
        top = self.plane_sizes[len(v.planes) - 1]
        if v.prefetched and not v.used:
            self.prefetch_wasted_bytes += top
        if len(v.planes) > 1 and v.fast is None:  # the expert stays usable at fewer bits
            v.planes.pop()
            v.nbytes -= top
            self.nbytes -= top
            st.downgrades += 1
        else:
            del self.entries[(v.layer, v.expert)]
            self.nbytes -= v.nbytes
            st.evictions += 1

    def shrink_to_capacity(self) -> None:
        """After the capacity was lowered: downgrade and evict until the entries fit."""
        if self.entries:
            self.make_room(0, next(iter(self.entries))[0], frozenset())

    def resident_planes(self) -> dict[tuple[int, int], int]:
        return {k: len(e.planes) for k, e in self.entries.items()}

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
        self.heat.clear()
