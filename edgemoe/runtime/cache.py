"""The expert cache: experts held at some number of nested planes, within a byte budget.

Its interface is narrow, and nothing outside this module touches its entries or its lock:
- get(layer, expert, n_planes): the expert's planes, reading what is missing (the synchronous path);
- count / resident / planes / add_planes / try_make_room / reserve / release: the same steps one
  at a time, for the I/O pipeline, which reads on its own thread;
- fast_form / fast: an expert's planes replaced by ggml-form weights;
- capacity (set_capacity shrinks at once), clear, reset_counters, state (the counters and what is
  held, copied under the lock).
Eviction is by policy, with downgrades (dropping an entry's highest planes) before evictions.
Buffers are the reader's (StoreReader.read_new: anonymous mmaps), so an evicted plane's memory
goes back to the OS at once. Every method takes the cache's own lock; the pipeline keeps its
queues under a condition of its own and calls these methods.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeMoEError
from ..store.reader import StoreReader

POLICIES = ("lru", "lfu", "score")


_EMPTY = np.zeros(0, dtype=np.uint8)  # a plane whose bytes moved into the ggml form


@dataclass
class _Entry:
    layer: int
    expert: int
    planes: list[np.ndarray]
    nbytes: int = 0
    last_use: int = 0
    uses: int = 0
    fast: dict | None = None  # ggml-format weights that replaced the planes (fast_form)
    prefetched: bool = False  # brought in by a prefetch
    used: bool = False  # computed with at least once


@dataclass
class LayerStats:
    """One layer's counters. stall_s: time the compute waited for this layer's expert planes (on
    the synchronous path that is the reads themselves; with the pipeline, the waits on its reader)."""

    hits: int = 0
    misses: int = 0
    partial_hits: int = 0  # resident, but at fewer planes than wanted: upgraded
    bytes_read: int = 0
    evictions: int = 0
    upgrades: int = 0
    downgrades: int = 0
    stall_s: float = 0.0
    per_expert: dict[int, list[int]] = field(default_factory=dict)  # e -> [hits, misses, partial]


@dataclass(frozen=True)
class Held:
    """One resident expert as the cache charges it."""

    n_planes: int
    nbytes: int  # charged against the capacity
    buffer_bytes: int  # what its buffers really take (its planes, or the ggml form that replaced them)
    fast: bool  # held in ggml form (fast_form)


@dataclass(frozen=True)
class CacheState:
    """A consistent copy of the cache's counters and contents."""

    layers: tuple[LayerStats, ...]
    held: dict[tuple[int, int], Held]
    nbytes: int  # resident bytes plus reservations of reads in flight
    capacity: int
    prefetch_wasted_bytes: int

    @property
    def misses(self) -> int:
        return sum(s.misses for s in self.layers)


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


def policy_key(policy: str, e: _Entry, clock: int, heat: float) -> float:
    """Lower = evicted first."""
    if policy == "lru":
        return e.last_use
    if policy == "lfu":
        return e.uses + e.last_use / (clock + 1)  # ties broken by recency
    return heat + 1e-9 * e.last_use / (clock + 1)


class ExpertCache:
    def __init__(self, reader: StoreReader, capacity_bytes: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise EdgeMoEError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.reader = reader
        self.policy = policy
        self._sizes = [list(reader.plane_sizes(i)) for i in range(reader.n_layer)]  # per layer, per plane
        self._capacity = int(capacity_bytes)
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._nbytes = 0  # resident plane bytes, plus bytes reserved for reads in flight
        self._clock = 0
        self._layers = [LayerStats() for _ in range(reader.n_layer)]
        self._lock = threading.RLock()
        self._prefetch_wasted_bytes = 0  # prefetched planes dropped before any use
        self._visits = [0] * reader.n_layer  # visits of each layer (visit())
        self._heat: dict[tuple[int, int], tuple[float, int]] = {}  # (layer, e) -> (score, at visit)

    # ---- figures ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def set_capacity(self, capacity: int) -> None:
        """A new capacity; downgrades and evictions at once until the entries fit."""
        with self._lock:
            self._capacity = int(capacity)
            if self._entries:
                self.make_room(0, next(iter(self._entries))[0], frozenset())

    def state(self) -> CacheState:
        with self._lock:
            return CacheState(
                layers=tuple(
                    dataclasses.replace(s, per_expert={e: list(v) for e, v in s.per_expert.items()})
                    for s in self._layers
                ),
                held={k: _held(e) for k, e in self._entries.items()},
                nbytes=self._nbytes,
                capacity=self._capacity,
                prefetch_wasted_bytes=self._prefetch_wasted_bytes,
            )

    def reset_counters(self) -> None:
        """Counters start again (after the preload): hits, misses, reads and use counts."""
        with self._lock:
            self._layers = [LayerStats() for _ in self._layers]
            for ent in self._entries.values():
                ent.uses = 0

    def add_stall(self, layer: int, seconds: float) -> None:
        with self._lock:
            self._layers[layer].stall_s += seconds

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
            self._heat.clear()

    # ---- lookups ------------------------------------------------------------------------------

    def resident(self, layer: int, expert: int) -> int:
        """The planes held of the expert (0: not held)."""
        with self._lock:
            ent = self._entries.get((layer, expert))
            return len(ent.planes) if ent else 0

    def prefetched_unused(self, layer: int, expert: int) -> bool:
        with self._lock:
            ent = self._entries.get((layer, expert))
            return ent is not None and ent.prefetched and not ent.used

    def visit(self, layer: int) -> None:
        """A new pass through `layer` (one decoded token, or one prefill batch) begins."""
        with self._lock:
            self._visits[layer] += 1

    def _heat_of(self, layer: int, expert: int) -> float:
        v, at = self._heat.get((layer, expert), (0.0, 0))
        return v * SCORE_DECAY ** (self._visits[layer] - at)

    def count(self, layer: int, expert: int, n_planes: int) -> str:
        """Record a request for an expert at n_planes: "hit", "partial" (resident at fewer planes:
        an upgrade follows) or "miss"."""
        with self._lock:
            self._clock += 1
            st = self._layers[layer]
            pe = st.per_expert.setdefault(expert, [0, 0, 0])
            ent = self._entries.get((layer, expert))
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
                ent.last_use = self._clock
                ent.uses += 1
            key = (layer, expert)
            if self._heat.get(key, (0.0, -1))[1] != self._visits[layer]:  # once per visit
                self._heat[key] = (self._heat_of(layer, expert) + (1 - SCORE_DECAY), self._visits[layer])
            return kind

    def plane_sizes(self, layer: int) -> list[int]:
        """The bytes of each plane of an expert of this layer."""
        return self._sizes[layer]

    def get(self, layer: int, expert: int, n_planes: int, pinned: frozenset = frozenset()) -> list[np.ndarray]:
        """The expert's first n_planes, reading what is missing in one contiguous read."""
        key = (layer, expert)
        with self._lock:
            self.count(layer, expert, n_planes)
            have = self.resident(layer, expert)
            need = sum(self._sizes[layer][have:n_planes])
            if have < n_planes:
                self.make_room(need, layer, pinned | {key})
        if have < n_planes:
            t0 = time.perf_counter()
            try:
                bufs = self.reader.read_new(layer, expert, have, n_planes - have)
            finally:
                self.release(need)  # the reservation becomes the planes' own bytes below
            self.add_stall(layer, time.perf_counter() - t0)
            self.add_planes(layer, expert, bufs)
        return self.planes(layer, expert, n_planes)

    def planes(self, layer: int, expert: int, n_planes: int) -> list[np.ndarray]:
        """The first n_planes of a resident expert, which is now used."""
        with self._lock:
            ent = self._entries[(layer, expert)]
            ent.used = True
            return ent.planes[:n_planes]

    # ---- filling and making room --------------------------------------------------------------

    def add_planes(self, layer: int, expert: int, bufs: list[np.ndarray], prefetched: bool = False) -> None:
        key = (layer, expert)
        with self._lock:
            ent = self._entries.get(key)
            if ent is None:
                ent = self._entries[key] = _Entry(layer, expert, [], last_use=self._clock, prefetched=prefetched)
            have = len(ent.planes)
            n = sum(self._sizes[layer][have : have + len(bufs)])  # nominal sizes: the replay tool reads nothing
            ent.planes.extend(bufs)
            ent.nbytes += n
            self._nbytes += n
            self._layers[layer].bytes_read += n

    def reserve(self, nbytes: int) -> None:
        """Charge bytes of a read in flight (room was made for them)."""
        with self._lock:
            self._nbytes += nbytes

    def release(self, nbytes: int) -> None:
        """The reservation of a read that finished (add_planes charges its planes) or failed."""
        with self._lock:
            self._nbytes -= nbytes

    def make_room(self, need: int, layer: int, pinned) -> None:
        """Room for `need` bytes, reserved for the read."""
        with self._lock:
            if not self.try_make_room(need, layer, pinned):
                raise EdgeMoEError("the expert cache is too small for the experts one layer needs at once")
            self._nbytes += need

    def try_make_room(self, need: int, layer: int, pinned) -> bool:
        """Free room for `need` bytes by D2MoE's budget rule combined with the policy: first the
        previous layer's highest planes, then its lowest; then by policy, highest planes first.
        False when only pinned entries are left to drop (the caller waits for them)."""
        with self._lock:
            if need > self._capacity:
                raise EdgeMoEError(
                    f"one expert needs {need} bytes but the expert cache holds {self._capacity}: raise the budget"
                )
            prev = (layer - 1) % len(self._layers)

            def rank(e: _Entry):
                key = policy_key(self.policy, e, self._clock, self._heat_of(e.layer, e.expert))
                return (0 if e.layer == prev and len(e.planes) > 1 and e.fast is None else 1, key)

            while self._nbytes + need > self._capacity:
                victims = [e for k, e in self._entries.items() if k not in pinned]
                if not victims:
                    return False
                self._drop_top(min(victims, key=rank))
            return True

    def _drop_top(self, v: _Entry) -> None:
        """Drop v's highest plane (the expert stays usable at fewer bits), or v itself."""
        st = self._layers[v.layer]
        top = self._sizes[v.layer][len(v.planes) - 1]
        if v.prefetched and not v.used:
            self._prefetch_wasted_bytes += top
        if len(v.planes) > 1 and v.fast is None:  # the expert stays usable at fewer bits
            v.planes.pop()
            v.nbytes -= top
            self._nbytes -= top
            st.downgrades += 1
        else:
            del self._entries[(v.layer, v.expert)]
            self._nbytes -= v.nbytes
            st.evictions += 1

    # ---- the ggml form ------------------------------------------------------------------------

    def fast(self, layer: int, expert: int) -> dict | None:
        """The expert's ggml-form weights, if it is held in that form."""
        with self._lock:
            ent = self._entries.get((layer, expert))
            return ent.fast if ent is not None else None

    def fast_form(self, layer: int, expert: int, build: Callable[[list[np.ndarray]], tuple[dict, int]]) -> dict | None:
        """The expert's ggml-form weights; built once, by build(planes) -> (weights, their bytes),
        from an expert held at full width, whose planes are then freed and which is charged its
        new size. None while it is not held at full width. Such an entry is evicted whole rather
        than downgraded. build runs outside the lock (reads may land meanwhile)."""
        key = (layer, expert)
        with self._lock:
            ent = self._entries.get(key)
            if ent is None:
                return None
            if ent.fast is not None:
                return ent.fast
            if len(ent.planes) < len(self._sizes[layer]):
                return None
            planes = list(ent.planes)
        fast, size = build(planes)
        with self._lock:
            if self._entries.get(key) is ent and ent.fast is None:
                ent.fast = fast
                ent.planes = [_EMPTY] * len(ent.planes)  # the bytes now live in `fast`
                self._nbytes -= ent.nbytes - size
                ent.nbytes = size
        return fast


def _held(e: _Entry) -> Held:
    real = sum(w.nbytes for w in e.fast.values()) if e.fast is not None else sum(p.nbytes for p in e.planes)
    return Held(len(e.planes), e.nbytes, real, e.fast is not None)
