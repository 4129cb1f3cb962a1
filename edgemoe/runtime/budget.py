"""The memory budget, decided in one place: whether a GGUF runs in place or streams its experts, the
refusals (each stating a budget that works), and the plan that splits a budget into dense weights,
KV cache, scratch, the runtime and the expert cache (MemoryPlan).

The order, from the first load on: Budget.needs_store decides the load path from the file's size,
the budget asked and free memory; refuse_before_converting refuses a budget from the GGUF's header
before a conversion; open_store sizes the expert cache before the warm-up token, counting what the
runtime holds so far; fit_after_warmup measures the runtime after the warm-up token and shrinks the
cache by it (the plan); resize moves a loaded model to a new budget.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeMoEError
from ..models.config import DEFAULT_N_CTX, ModelArgs
from ..models.gguf_file import GGUFFile
from ..store.convert import resident_dense_bytes, source_expert_bytes
from . import memory
from .cache import ExpertCache
from .engine import N_BATCH, N_SPAN
from .kvcache import KVCache
from .memory import BASELINE_RSS, format_size

SAFETY_BYTES = 8 * 1024 * 1024
# What the runtime (numpy, numba and its compiled kernels, llama.cpp's library and vocabulary, the
# interpreter) adds at load, before it can be measured after the warm-up token: 166-233 MiB on an
# x86-64 Linux machine (tools/bench_first_load.py prints it), more on the first run after an install,
# which compiles the numba kernels (docs/benchmarks.md). Used to size a default budget and to refuse
# a budget before the model is loaded; the refusal after the warm-up counts the measured figure.
RUNTIME_ESTIMATE = 200 * 1024 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is split (bytes). The runtime figure is measured after a warm-up token."""

    budget: int
    dense: int  # resident weights: embeddings, attention, norms, routers, shared experts
    kv: int  # KV cache at n_ctx
    scratch: int  # activations of one batch, and a safety margin
    runtime: int  # compiled kernels, tokenizer, interpreter growth measured at load
    cache_capacity: int  # what is left for experts
    min_cache: int  # one layer's chosen experts at the lowest width
    onnx_pool: int = 0  # onnxruntime expert sessions (onnx_experts), outside the expert cache
    experts: int = 0  # every expert of the store at every plane: a cache this large holds them all

    @property
    def minimum_budget(self) -> int:
        return self.budget - self.cache_capacity + self.min_cache

    def budget_holding(self, share: float) -> int:
        """The budget whose expert cache holds `share` of every expert's bytes (at least min_cache)."""
        return self.budget - self.cache_capacity + max(self.min_cache, int(share * self.experts))


class Budget:
    """One model's budget: asked (bytes) or None, settled as the load goes on."""

    def __init__(self, asked: int | None):
        self.bytes = asked
        self.given = asked is not None
        self.plan: MemoryPlan | None = None  # set for models that stream experts
        self.lent = 0  # bytes reserved for the context (KV cache, attention scratch) the expert cache holds for now
        self._fixed = 0  # dense + KV + scratch of a streaming model

    def needs_store(self, path: Path, bits: int | None, quality_asked: str | None) -> bool:
        """A GGUF runs in place unless a budget, bits or a lossy quality are asked for, or it does
        not fit in free memory (then the budget is 80% of free memory)."""
        if self.bytes is not None or bits is not None or quality_asked not in (None, "max"):
            return True
        need = path.stat().st_size
        avail = memory.available()
        if need > 0.9 * avail:
            print(
                f"edgemoe: {path.name} ({format_size(need)}) does not fit in free memory "
                f"({format_size(avail)}): streaming its experts within a budget of "
                f"{format_size(int(0.8 * avail))}",
                file=sys.stderr,
            )
            self.bytes = int(0.8 * avail)
            return True
        return False

    def refuse_before_converting(self, path: Path, n_ctx_asked: int | None, kv_bytes_of) -> None:
        """A budget that cannot hold the dense weights, the KV cache, scratch and the runtime is
        refused from the GGUF's header alone, before a conversion that could take minutes. The
        minimum stated counts one layer's chosen experts at their source size (the store's widest
        planes are within a few percent of it), so it is a budget that works.
        kv_bytes_of(args, n_ctx): the KV cache's bytes."""
        if self.bytes is None:
            return
        gf = GGUFFile(path)
        try:
            c = ModelArgs.from_gguf(gf)
            n_ctx = n_ctx_asked or min(DEFAULT_N_CTX, c.n_ctx_train)
            fixed = fixed_bytes(c, n_ctx, resident_dense_bytes(gf), kv_bytes_of(c, n_ctx))
            layer = c.n_expert_used * source_expert_bytes(gf, c)
        finally:
            gf.close()
        so_far = max(memory.rss() - BASELINE_RSS, 0)  # the runtime's imports; kernels and vocabulary to come
        if self.bytes < fixed + so_far:
            raise refuse(
                self.bytes,
                fixed + max(RUNTIME_ESTIMATE, so_far),
                layer * 5 // 4,
                f"dense weights, KV cache (n_ctx={n_ctx}), scratch and the runtime",
            )

    def check_in_place(self, path: Path, file_size: int, kv_bytes: int, n_ctx: int) -> None:
        need = file_size + kv_bytes
        if self.bytes is not None and need > self.bytes:
            raise EdgeMoEError(
                f"memory budget {format_size(self.bytes)} is below what {path.name} needs "
                f"held whole ({format_size(need)}: weights {format_size(file_size)} + "
                f"KV cache {format_size(kv_bytes)} at n_ctx={n_ctx}); lower n_ctx or raise "
                f"the budget"
            )

    def open_store(self, args: ModelArgs, n_ctx: int, dense: int, kv: int, experts_all: int) -> int:
        """The expert cache's capacity before the warm-up, when the runtime is not known yet. With
        no budget: every expert, if free memory allows."""
        self._fixed = fixed_bytes(args, n_ctx, dense, kv)
        self._so_far = max(memory.rss() - BASELINE_RSS - dense, 0)
        self._n_ctx = n_ctx
        if self.bytes is None:
            self.given = False
            self.bytes = int(min(self._fixed + experts_all + self._runtime_guess(), 0.8 * memory.available()))
        return max(self.bytes - self._fixed, 0)

    def _runtime_guess(self) -> int:
        return max(RUNTIME_ESTIMATE, self._so_far)

    def check_open(self, capacity: int, min_cache: int) -> None:
        """A budget is refused before the warm-up only when what the runtime holds so far leaves no
        room for one layer's chosen experts; the minimum stated then counts the estimate."""
        if capacity - self._so_far < min_cache:
            raise refuse(self.bytes, self._fixed + self._runtime_guess(), min_cache, self._what())

    def _what(self) -> str:
        return f"dense weights, KV cache (n_ctx={self._n_ctx}), scratch and the runtime"

    def fit_after_warmup(
        self,
        cache: ExpertCache,
        dense: int,
        kv: int,
        min_cache: int,
        experts_all: int,
        store_path: Path,
        onnx=None,
        onnx_pool: int | str | None = None,
    ) -> MemoryPlan:
        """After the warm-up token, measure what the runtime itself holds since `import edgemoe`
        (numpy, numba and its compiled kernels, llama.cpp's vocabulary, the interpreter) and
        shrink the expert cache by it, so that the budget covers everything. onnx: the
        onnxruntime experts, given onnx_pool bytes of the cache (when None, their default share)."""
        overhead = max(memory.rss() - BASELINE_RSS - dense - cache.nbytes, 0)
        if not self.given:
            avail = memory.available()
            self.bytes = int(min(self._fixed + overhead + experts_all, 0.8 * avail))
            if self.bytes < self._fixed + overhead + experts_all:
                print(
                    f"edgemoe: {format_size(avail)} free: budget {format_size(self.bytes)} "
                    f"(80%), experts stream from {store_path}",
                    file=sys.stderr,
                )
        capacity = self.bytes - self._fixed - overhead
        if capacity < min_cache:
            raise refuse(self.bytes, self._fixed + overhead, min_cache, self._what())
        cache.set_capacity(min(cache.capacity, capacity))
        cache.clear()
        pool = 0
        if onnx is not None:  # onnxruntime sessions hold weights of their own
            pool = int(onnx.default_pool_share * cache.capacity) if onnx_pool is None else memory.parse_size(onnx_pool)
            pool = max(0, min(pool, cache.capacity - min_cache))
            cache.set_capacity(cache.capacity - pool)
            onnx.pool_bytes = pool
        self.plan = MemoryPlan(
            budget=self.bytes,
            dense=dense,
            kv=kv,
            scratch=self._fixed - dense - kv,
            runtime=overhead,
            cache_capacity=cache.capacity,
            min_cache=min_cache,
            onnx_pool=pool,
            experts=experts_all,
        )
        return self.plan

    def resize(self, cache: ExpertCache, budget: int) -> MemoryPlan:
        """A new budget for a loaded model: the expert cache grows, or shrinks at once (evicting)."""
        plan = self.plan
        capacity = budget - (plan.budget - plan.cache_capacity)
        if capacity < plan.min_cache:
            raise refuse(
                budget,
                plan.budget - plan.cache_capacity,
                plan.min_cache,
                "dense weights, KV cache, scratch and the runtime",
            )
        cache.set_capacity(capacity + self.lent)
        self.bytes = budget
        self.given = True
        self.plan = dataclasses.replace(plan, budget=budget, cache_capacity=capacity)
        return self.plan

    def lend(self, cache: ExpertCache, args: ModelArgs, kv: KVCache) -> None:
        """The plan reserves the KV cache and the attention scratch for n_ctx positions, but they
        take memory only as the context fills: before each forward pass (the KV cache's high-water
        mark counting its tokens) the expert cache holds what the context does not use yet, and
        gives it back (evicting at once) before it is written."""
        if self.plan is None:
            return
        free = kv.nbytes - kv.held_bytes() + scratch_bytes(args, kv.n_ctx) - scratch_bytes(args, kv.high)
        free = max(int(free), 0)
        if free != self.lent:
            self.lent = free
            cache.set_capacity(self.plan.cache_capacity + free)


def fixed_bytes(args, n_ctx: int, dense: int, kv: int) -> int:
    """What a model streaming its experts holds besides the runtime and the expert cache: resident
    dense weights, the KV cache, one batch's activation scratch and a safety margin."""
    return dense + kv + scratch_bytes(args, n_ctx) + SAFETY_BYTES


def scratch_bytes(args, n_ctx: int) -> int:
    """Activation scratch of one forward pass (float32), generously counted: a span of N_SPAN
    prompt tokens run layer by layer (the residual stream and its temporaries, each token's
    top-k expert outputs, one expert's hidden activations for all of them), attention N_BATCH
    queries at a time (scores over the whole context) and the output head N_BATCH rows at a time."""
    span = N_SPAN * 4 * (8 * args.n_embd + args.n_expert_used * args.n_embd + 6 * args.n_ff_exp)
    batch = N_BATCH * 4 * (2 * args.n_head * n_ctx + args.n_vocab)
    return span + batch


def workable_budget(need: int) -> int:
    """A budget stated in an error as one that works: what was measured to be needed, plus room for
    the runtime's growth from one load to the next (allocator pages, a few MiB), rounded up to a
    whole MiB so that the figure printed is the figure that passes."""
    mib = 1 << 20
    need += max(need // 25, 4 * mib)
    return -(-need // mib) * mib


def refuse(budget: int, fixed: int, min_cache: int, what: str) -> EdgeMoEError:
    works = workable_budget(fixed + min_cache)
    return EdgeMoEError(
        f"memory budget {format_size(budget)} is too small: {what} need {format_size(fixed)} and one layer's "
        f"chosen experts {format_size(min_cache)}; the minimum that works is {works >> 20} MiB "
        f"(--budget {works >> 20}MiB)"
    )
