"""Hottest-expert-bit-first (HEBF) I/O, overlapped with expert compute, with prefetch.

A background reader thread reads expert planes into the cache while the caller computes. Per
layer, each chosen expert has a queue of the planes it still needs, most significant first; the
reader repeatedly issues the head of the queue of the hottest expert (hotness: tokens that chose
it in prefill, gate weight in decode), so the hottest expert becomes computable first and the
compute starts on it while later reads continue. Prefetches (the next layer's predicted experts)
queue behind every demand read and are cancelled when the real routing does not want them.

Reads release the GIL (os.preadv), so they overlap with the kernels. The queues live under the
pipeline's own condition, which both threads hold while they change the cache through its methods;
experts of the layer in flight are pinned so making room never drops them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .cache import ExpertCache


@dataclass
class Request:
    layer: int
    expert: int
    n_planes: int
    hotness: float
    prefetch: bool = False
    queue: list[int] = field(default_factory=list)  # planes still to read, ascending


def hebf_order(reqs: list[Request]) -> list[tuple[int, int]]:
    """The (expert, plane) read order for one layer's requests: repeatedly the head of the
    hottest expert's queue (ties: lower expert id). Used by the reader; exposed for tests."""
    queues = {r.expert: list(r.queue) for r in reqs}
    hot = {r.expert: r.hotness for r in reqs}
    order = []
    while any(queues.values()):
        e = min((e for e, q in queues.items() if q), key=lambda e: (-hot[e], e))
        order.append((e, queues[e].pop(0)))
    return order


class Pipeline:
    def __init__(self, cache: ExpertCache, read_delay_s: float = 0.0):
        self.cache = cache
        self.cond = threading.Condition()
        self.demand: list[Request] = []
        self.prefetches: list[Request] = []
        self.pinned: set[tuple[int, int]] = set()  # experts of the layer in flight
        self.pin_need: dict[tuple[int, int], int] = {}
        self.reading: set[tuple[int, int]] = set()  # experts with a read in flight
        self.read_delay_s = read_delay_s  # tests slow the reader down to see the overlap
        self.error: BaseException | None = None
        self.prefetch_issued = 0  # experts queued for prefetch
        self.prefetch_hits = 0  # of those, wanted by the real routing
        self.prefetch_cancelled = 0  # dropped from the queue when the routing did not want them
        self.read_log: list[tuple[int, int, int, float, float]] = []  # (layer, expert, plane, start, end)
        self.log_reads = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgemoe-reader", daemon=True)
        self._thread.start()

    # ---- caller side ------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: dict[int, tuple[int, float]]) -> None:
        """Queue low-priority reads of layer's predicted experts {expert: (n_planes, hotness)}."""
        with self.cond:
            for e, (n, hot) in experts.items():
                have = self.cache.resident(layer, e)
                if have >= n or any(r.layer == layer and r.expert == e for r in self.prefetches):
                    continue
                self.prefetches.append(Request(layer, e, n, hot, True, list(range(have, n))))
                self.prefetch_issued += 1
            self.cond.notify_all()

    def run_layer(self, layer: int, wants: dict[int, tuple[int, float]], compute, after_submit=None) -> None:
        """Read `wants` {expert: (n_planes, hotness)} in HEBF order and call compute(expert,
        planes) for each as soon as its planes have landed (hottest first when several have).
        after_submit() runs once the demand reads are queued (the next layer's prefetch goes there)."""
        with self.cond:
            self.cache.visit(layer)
            queued = {r.expert for r in self.prefetches if r.layer == layer}
            self.prefetches = [r for r in self.prefetches if r.layer != layer]
            self.prefetch_cancelled += len(queued - wants.keys())
            for e, (n, hot) in wants.items():
                if e in queued or self.cache.prefetched_unused(layer, e):
                    self.prefetch_hits += 1
                self.cache.count(layer, e, n)
                self.pinned.add((layer, e))
                self.pin_need[(layer, e)] = n
                have = self.cache.resident(layer, e)
                if have < n:
                    self.demand.append(Request(layer, e, n, hot, False, list(range(have, n))))
            self.cond.notify_all()
        if after_submit is not None:
            after_submit()
        todo = dict(wants)
        try:
            while todo:
                with self.cond:
                    t0 = time.perf_counter()
                    while True:
                        if self.error is not None:
                            raise self.error
                        ready = [e for e, (n, _) in todo.items() if self.cache.resident(layer, e) >= n]
                        if ready:
                            break
                        self.cond.wait()
                    self.cache.add_stall(layer, time.perf_counter() - t0)
                    e = max(ready, key=lambda e: (todo[e][1], -e))
                    planes = self.cache.planes(layer, e, todo.pop(e)[0])
                compute(e, planes)
                with self.cond:
                    self.pinned.discard((layer, e))
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.demand = [r for r in self.demand if r.layer != layer]
                self.pinned = {k for k in self.pinned if k[0] != layer}
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self._thread.join(timeout=5)

    # ---- reader thread ----------------------------------------------------------------------

    def _next(self) -> Request | None:
        """The hottest demand request with planes left; else the hottest prefetch."""
        for pool in (self.demand, self.prefetches):
            live = [r for r in pool if r.queue]
            if live:
                return min(live, key=lambda r: (-r.hotness, r.expert))
        return None

    def _run(self) -> None:
        cache = self.cache
        while True:
            with self.cond:
                while not self._stop and self._next() is None:
                    self.cond.wait()
                if self._stop:
                    return
                r = self._next()
                key = (r.layer, r.expert)
                have = cache.resident(r.layer, r.expert)
                if r.queue[0] < have:  # already there (read meanwhile by another request)
                    r.queue = [p for p in r.queue if p >= have]
                    self.cond.notify_all()
                    continue
                if r.queue[0] > have:  # lower planes were dropped meanwhile: read them first
                    r.queue = list(range(have, r.n_planes))
                plane = r.queue[0]
                size = cache.plane_sizes(r.layer)[plane]
                room = cache.try_make_room(size, r.layer, self.pinned | self.reading | {key})
                if not room and not r.prefetch:
                    # only pinned experts are left: keep the complete ones (the caller computes
                    # and unpins them), let incomplete ones lose planes (they are read again)
                    complete = {k for k in self.pinned if cache.resident(*k) >= self.pin_need.get(k, 0)}
                    room = cache.try_make_room(size, r.layer, complete | self.reading | {key})
                if not room:
                    if r.prefetch:  # never wait on pins for a prefetch: drop it
                        self.prefetches.remove(r)
                        self.prefetch_cancelled += 1
                        continue
                    self.cond.wait()  # the caller frees pins as it computes
                    continue
                cache.reserve(size)  # while the read is in flight
                self.reading.add(key)
            t0 = time.perf_counter()
            try:
                if self.read_delay_s:
                    time.sleep(self.read_delay_s)
                (buf,) = cache.reader.read_new(r.layer, r.expert, plane, 1)
            except BaseException as exc:  # a damaged shard: the caller raises it
                with self.cond:
                    cache.release(size)
                    self.reading.discard(key)
                    self.error = exc
                    self.cond.notify_all()
                continue
            t1 = time.perf_counter()
            with self.cond:
                cache.release(size)
                if self.log_reads:
                    self.read_log.append((r.layer, r.expert, plane, t0, t1))
                if cache.resident(r.layer, r.expert) == plane:
                    cache.add_planes(r.layer, r.expert, [buf], prefetched=r.prefetch)
                if r.queue and r.queue[0] == plane:
                    r.queue.pop(0)
                self.reading.discard(key)
                if r.prefetch and not r.queue and r in self.prefetches:
                    self.prefetches.remove(r)
                self.cond.notify_all()


def wants_from_routing(top: np.ndarray, w: np.ndarray, n_planes_of) -> dict[int, tuple[int, float]]:
    """{expert: (n_planes, hotness)} for one layer: hotness = tokens choosing the expert (prefill)
    or its gate weight (decode, one token)."""
    out: dict[int, tuple[int, float]] = {}
    T = top.shape[0]
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        hot = float(w[rows, slot].max()) if T == 1 else float(len(rows))
        out[int(e)] = (n_planes_of(int(e)), hot)
    return out
