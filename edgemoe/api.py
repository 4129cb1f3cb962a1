"""The Python API: edgemoe.load(...) -> Model with logits / generate / stream / chat / stats."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeMoEError
from .models.config import DEFAULT_N_CTX, ModelArgs
from .models.gguf_file import GGUFFile
from .models.tokenizer import StreamDecoder, open_tokenizer
from .quant import kernels
from .runtime import memory, policy, streaming
from .runtime.cache import ExpertCache
from .runtime.engine import Engine, KVCache
from .runtime.memory import BASELINE_RSS  # resident_bytes counts from the RSS after `import edgemoe`
from .runtime.sampling import Sampler, SamplingParams
from .runtime.streaming import CacheStats, StoreExperts
from .store import reader as store
from .store.reader import StoreReader

# What the runtime (numpy, numba and its compiled kernels, llama.cpp's library and vocabulary, the
# interpreter) adds at load, before it can be measured after the warm-up token: 166-233 MiB on an
# x86-64 Linux machine (tools/bench_first_load.py prints it), more on the first run after an install,
# which compiles the numba kernels (docs/benchmarks.md). Used to
# size a default budget and to refuse a budget before the model is loaded; the refusal after the
# warm-up counts the measured figure.
RUNTIME_ESTIMATE = 200 * 1024 * 1024


@dataclass(frozen=True)
class Stats:
    """Cumulative counters of a loaded model. The TUI, server and benchmarks all read this."""

    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    resident_bytes: int  # process RSS now minus RSS right after `import edgemoe`
    peak_resident_bytes: int  # peak RSS (VmHWM where the OS has it) minus the same baseline
    budget_bytes: int | None
    model_bytes: int  # the GGUF file
    kv_bytes: int  # the KV cache as allocated (pages are touched only as the context fills)
    n_ctx: int
    cache: CacheStats | None = None  # expert cache figures when experts stream from a store
    # the quality in force (a preset name or thresholds, policy.parse_quality) and whether it is
    # lossless: every plane of every chosen expert, nothing skipped (what "max" computes)
    quality: str = "max"
    lossless: bool = True


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


@dataclass(frozen=True)
class Response:
    """One streamed token."""

    text: str  # the text this token adds (may be empty while a UTF-8 sequence or stop string is pending)
    token: int
    tokens_per_s: float
    stats: Stats
    finish_reason: str | None = None  # "stop" | "length" on the last response


def bundled_model_path() -> Path:
    """The small model that ships with edgemoe: edgemoe/bundled/ when installed, models/ in a checkout."""
    here = Path(__file__).resolve().parent
    root = here / "bundled" if (here / "bundled").is_dir() else here.parent / "models"
    found = sorted(root.glob("*.gguf"))
    if not found:
        raise EdgeMoEError(f"the bundled model is missing from {root}; pass a model path with -m")
    return found[0]


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    memory_budget: int | str | None = None,
    quality: str | None = None,
    n_ctx: int | None = None,
    **options: Any,
) -> Model:
    """Load a GGUF MoE model. path None = the bundled model.

    path: a GGUF file or an expert store directory (edgemoe convert). A GGUF given a budget (or too
    large for free memory) is converted into a store under ~/.cache/edgemoe/stores on first use.
    options: kv_type ("f16" default, as llama.cpp; "f32" for exact comparisons); bits (read experts
    at this nested width instead of all planes); cache_policy ("lru", "lfu", "score");
    progress (show the conversion progress bar); pipeline (background HEBF reads, default on);
    prefetch (read the next layer's predicted experts ahead, default off: measured, its wrong
    guesses cost more reads than its right ones saved, docs/benchmarks.md); preload (fill the expert cache at
    load, default on).
    """
    return Model(path, memory_budget=memory_budget, quality=quality, n_ctx=n_ctx, **options)


class Model:
    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        memory_budget: int | str | None = None,
        quality: str | None = None,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        bits: int | None = None,
        cache_policy: str = "score",
        progress: bool = True,
        pipeline: bool = True,
        prefetch: bool = False,
        preload: bool = True,
        onnx_experts: bool | dict = False,
    ):
        self.path = Path(path) if path is not None else bundled_model_path()
        self._quality = policy.parse_quality(quality)  # validated now; the default is settled below
        self.budget_bytes = None if memory_budget is None else memory.parse_size(memory_budget)
        self._budget_given = memory_budget is not None
        self._quality_asked = quality
        self._n_ctx_asked, self._kv_type = n_ctx, kv_type
        if isinstance(n_ctx, bool) or not (n_ctx is None or (isinstance(n_ctx, int) and n_ctx > 0)):
            raise EdgeMoEError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.store_path: Path | None = None
        self.memory_plan: MemoryPlan | None = None  # set for models that stream experts
        self._experts: StoreExperts | None = None
        self._reader: StoreReader | None = None
        if store.is_store(self.path):
            self.store_path = self.path
        elif self.path.is_file() and (self.path.suffix.lower() == ".onnx" or self._needs_store(n_ctx, kv_type, bits)):
            self.store_path = self._converted_store(progress)
        # the default (policy.DEFAULT, "max") is lossless for a GGUF in place and a store alike
        self._quality = policy.parse_quality(quality)
        self.quality = self._quality.name
        dense_path = self.store_path / store.DENSE if self.store_path else self.path
        self._file = GGUFFile(dense_path)
        try:
            if self.store_path:
                self._reader = StoreReader(self.store_path)
                self.config = ModelArgs.from_gguf(self._file, n_ff_exp=self._reader.n_ff_exp)
            else:
                self.config = ModelArgs.from_gguf(self._file)
            self.n_ctx = n_ctx or min(DEFAULT_N_CTX, self.config.n_ctx_train)
            self._kv = KVCache(self.config, self.n_ctx, kv_type)
            if self.store_path:
                self._open_store(bits, cache_policy, pipeline, prefetch)
                if onnx_experts:  # experts on onnxruntime by the rule of edgemoe.store.onnx_experts
                    from .store.onnx_experts import OnnxExperts

                    opts = dict(onnx_experts) if isinstance(onnx_experts, dict) else {}
                    self._onnx_pool = opts.pop("pool", None)
                    self._experts.onnx = OnnxExperts(self._experts.scheme, self._experts.shapes, **opts)
            else:
                self._check_memory()
                if kernels.packs_any(self._file.tensors.values()):
                    # as llama.cpp does by default: Q4_0 matrices repacked in RAM for ggml's
                    # faster kernels; the bytes must be ours to rewrite, so copy the file in
                    self._file.load_into_memory(streaming.embedding_on_disk(self._file))
            self._engine = Engine(self._file, self.config, self._experts)
            self._tok = open_tokenizer(dense_path, self.store_path, self.config.n_vocab, self._file.metadata)
            if self._tok.n_vocab != self.config.n_vocab:
                raise EdgeMoEError(
                    f"{self.path}: vocabulary has {self._tok.n_vocab} tokens but token_embd has "
                    f"{self.config.n_vocab} rows"
                )
            self._lock = threading.RLock()
            self._ctx_tokens: list[int] = []  # what the KV cache holds, for prompt-prefix reuse
            self._prompt_tokens = 0
            self._generated_tokens = 0
            self._prompt_time = 0.0
            self._decode_time = 0.0
            self._closed = False
            self._warm_up()
            if self._experts is not None:
                self._fit_cache_after_warmup()
                if preload:
                    self._experts.preload()
        except BaseException:
            self._closed = False
            self.close()
            raise

    # ---- memory -------------------------------------------------------------------------------

    def _needs_store(self, n_ctx: int | None, kv_type: str, bits: int | None) -> bool:
        """A GGUF runs in place unless a budget or bits are asked for, or it does not fit in free memory."""
        if self.budget_bytes is not None or bits is not None or self._quality_asked not in (None, "max"):
            return True
        need = self.path.stat().st_size
        avail = memory.available()
        if need > 0.9 * avail:
            print(
                f"edgemoe: {self.path.name} ({memory.format_size(need)}) does not fit in free memory "
                f"({memory.format_size(avail)}): streaming its experts within a budget of "
                f"{memory.format_size(int(0.8 * avail))}",
                file=sys.stderr,
            )
            self.budget_bytes = int(0.8 * avail)
            return True
        return False

    def _converted_store(self, progress: bool) -> Path:
        from .store.convert import convert

        dst = streaming.cache_dir() / (streaming.store_key(self.path) + ".edgemoe")
        if store.is_store(dst):
            return dst
        if self.budget_bytes is not None and self.path.suffix.lower() != ".onnx":
            self._refuse_before_converting()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(
                f"edgemoe: converting {self.path.name} into an expert store at {dst} (first use only)", file=sys.stderr
            )
        return convert(self.path, dst, progress=progress)

    def _refuse_before_converting(self) -> None:
        """A budget that cannot hold the dense weights, the KV cache, scratch and the runtime is
        refused from the GGUF's header alone, before a conversion that could take minutes. The
        minimum stated counts one layer's chosen experts at their source size (the store's widest
        planes are within a few percent of it), so it is a budget that works."""
        from .store.convert import resident_dense_bytes, source_expert_bytes

        gf = GGUFFile(self.path)
        try:
            c = ModelArgs.from_gguf(gf)
            n_ctx = self._n_ctx_asked or min(DEFAULT_N_CTX, c.n_ctx_train)
            fixed = streaming.fixed_bytes(c, n_ctx, resident_dense_bytes(gf), KVCache(c, n_ctx, self._kv_type).nbytes)
            layer = c.n_expert_used * source_expert_bytes(gf, c)
        finally:
            gf.close()
        so_far = max(memory.rss() - BASELINE_RSS, 0)  # the runtime's imports; kernels and vocabulary to come
        if self.budget_bytes < fixed + so_far:
            raise streaming.refuse(
                self.budget_bytes,
                fixed + max(RUNTIME_ESTIMATE, so_far),
                layer * 5 // 4,
                f"dense weights, KV cache (n_ctx={n_ctx}), scratch and the runtime",
            )

    def _open_store(self, bits: int | None, policy: str, pipeline: bool, prefetch: bool) -> None:
        # the resident part must stay resident under memory pressure
        self._file.load_into_memory(streaming.embedding_on_disk(self._file))
        r = self._reader
        c = self.config
        for i in range(c.n_layer):
            have = len(r.locations[i]) if i < len(r.locations) else 0
            if have != (0 if c.is_dense(i) else c.n_expert):
                raise EdgeMoEError(
                    f"{r.root / store.MANIFEST}: layer {i} has {have} experts in the store, "
                    f"the model's configuration has {0 if c.is_dense(i) else c.n_expert}"
                )
        experts_all = r.all_experts_bytes()
        fixed = streaming.fixed_bytes(c, self.n_ctx, self._file.resident_bytes, self._kv.nbytes)
        # Before the warm-up the runtime is not known yet. A budget is refused only when what the
        # runtime holds so far leaves no room; the minimum stated then counts the estimate.
        so_far = max(memory.rss() - BASELINE_RSS - self._file.resident_bytes, 0)
        runtime = max(RUNTIME_ESTIMATE, so_far)
        if self.budget_bytes is None:  # no budget: hold every expert if free memory allows
            self._budget_given = False
            self.budget_bytes = int(min(fixed + experts_all + runtime, 0.8 * memory.available()))
        cache = ExpertCache(r, max(self.budget_bytes - fixed, 0), policy)
        self._experts = StoreExperts(r, cache, self.config, self._file, bits, self._quality, pipeline, prefetch)
        min_cache = self._experts.min_layer_bytes(c.n_expert_used)
        if cache.capacity - so_far < min_cache:
            raise streaming.refuse(
                self.budget_bytes,
                fixed + runtime,
                min_cache,
                f"dense weights, KV cache (n_ctx={self.n_ctx}), scratch and the runtime",
            )
        self._fixed_bytes = fixed

    def _warm_up(self) -> None:
        """One token through the whole model at load, and the largest attention graph once: compiles
        the kernels and sizes ggml's work buffer (so the runtime can be measured), and turns
        tensors whose shapes contradict the configuration into one clear error now rather than a
        crash mid-generation."""
        try:
            self.logits([self._tok.bos if self._tok.bos >= 0 else 0])
            self._ctx_tokens = []  # the warm-up is not a prompt to reuse
            self._engine.reserve(self._kv, streaming.N_BATCH)
        except EdgeMoEError:
            raise
        except (ValueError, TypeError, IndexError) as exc:
            raise EdgeMoEError(
                f"{self.path}: the tensors do not fit the model's configuration ({type(exc).__name__}: {exc})"
            ) from None

    def _fit_cache_after_warmup(self) -> None:
        """After the warm-up token, measure what the runtime itself holds since `import edgemoe`
        (numpy, numba and its compiled kernels, llama.cpp's vocabulary, the interpreter) and
        shrink the expert cache by it, so that the budget covers everything."""
        cache = self._experts.cache
        dense = self._file.resident_bytes  # copied into anonymous memory at load
        overhead = max(memory.rss() - BASELINE_RSS - dense - cache.nbytes, 0)
        if not self._budget_given:
            experts_all = self._reader.all_experts_bytes()
            avail = memory.available()
            self.budget_bytes = int(min(self._fixed_bytes + overhead + experts_all, 0.8 * avail))
            if self.budget_bytes < self._fixed_bytes + overhead + experts_all:
                print(
                    f"edgemoe: {memory.format_size(avail)} free: budget {memory.format_size(self.budget_bytes)} "
                    f"(80%), experts stream from {self.store_path}",
                    file=sys.stderr,
                )
        capacity = self.budget_bytes - self._fixed_bytes - overhead
        min_cache = self._experts.min_layer_bytes(self.config.n_expert_used)
        if capacity < min_cache:
            raise streaming.refuse(
                self.budget_bytes,
                self._fixed_bytes + overhead,
                min_cache,
                f"dense weights, KV cache (n_ctx={self.n_ctx}), scratch and the runtime",
            )
        cache.capacity = min(cache.capacity, capacity)
        cache.clear()
        pool = 0
        if self._experts.onnx is not None:  # onnxruntime sessions hold weights of their own
            from .store.onnx_experts import DEFAULT_POOL_SHARE

            asked = getattr(self, "_onnx_pool", None)
            pool = int(DEFAULT_POOL_SHARE * cache.capacity) if asked is None else memory.parse_size(asked)
            pool = max(0, min(pool, cache.capacity - min_cache))
            cache.capacity -= pool
            self._experts.onnx.pool_bytes = pool
        self.memory_plan = MemoryPlan(
            budget=self.budget_bytes,
            dense=self._file.resident_bytes,
            kv=self._kv.nbytes,
            scratch=self._fixed_bytes - self._file.resident_bytes - self._kv.nbytes,
            runtime=overhead,
            cache_capacity=cache.capacity,
            min_cache=min_cache,
            onnx_pool=pool,
            experts=self._reader.all_experts_bytes(),
        )

    def set_budget(self, memory_budget: int | str) -> MemoryPlan:
        """Change the memory budget of a loaded model whose experts stream from a store: the expert
        cache grows or shrinks (evicting at once) to fit. Returns the new plan."""
        self._check_open()
        budget = memory.parse_size(memory_budget)
        if self._experts is None or self.memory_plan is None:
            raise EdgeMoEError(
                "this model runs from its GGUF file in place; load it with memory_budget= to stream "
                "experts and change the budget later"
            )
        with self._lock:
            plan = self.memory_plan
            capacity = budget - (plan.budget - plan.cache_capacity)
            if capacity < plan.min_cache:
                raise streaming.refuse(
                    budget,
                    plan.budget - plan.cache_capacity,
                    plan.min_cache,
                    "dense weights, KV cache, scratch and the runtime",
                )
            cache = self._experts.cache
            cache.capacity = capacity
            cache.shrink_to_capacity()
            self.budget_bytes = budget
            self._budget_given = True
            self.memory_plan = dataclasses.replace(plan, budget=budget, cache_capacity=capacity)
            return self.memory_plan

    def set_quality(self, quality: str) -> None:
        """Change the quality preset ("max", "balanced", "fast") or thresholds ("high,low[,naee]")
        of a loaded model. Below "max" the experts must stream from a store."""
        self._check_open()
        q = policy.parse_quality(quality)
        if self._experts is None and q.name != "max":
            raise EdgeMoEError("quality below max needs an expert store: load the model with a budget or quality")
        with self._lock:
            self._quality = q
            self.quality = q.name
            if self._experts is not None:
                self._experts.quality = q

    def _check_memory(self) -> None:
        need = self._file.file_size + self._kv.nbytes
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise EdgeMoEError(
                f"memory budget {memory.format_size(self.budget_bytes)} is below what {self.path.name} needs "
                f"held whole ({memory.format_size(need)}: weights {memory.format_size(self._file.file_size)} + "
                f"KV cache {memory.format_size(self._kv.nbytes)} at n_ctx={self.n_ctx}); lower n_ctx or raise "
                f"the budget"
            )

    # ---- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._check_open()
        return self._tok.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        self._check_open()
        return self._tok.detokenize([int(t) for t in ids])

    # ---- evaluation ---------------------------------------------------------------------------

    def logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [len(token_ids), vocab] float32, computed from a fresh context."""
        self._check_open()
        ids = _as_ids(token_ids, self.config.n_vocab)
        with self._lock:
            self._kv.reset()
            self._ctx_tokens = []
            out = np.concatenate(
                [
                    self._engine.forward(ids[i : i + streaming.N_BATCH], self._kv, all_logits=True)
                    for i in range(0, len(ids), streaming.N_BATCH)
                ]
            )
            self._ctx_tokens = list(ids)
            return out

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate the prompt, reusing the KV cache for a shared prefix; returns last logits [V]."""
        keep = 0
        for a, b in zip(self._ctx_tokens, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # always evaluate at least one token to get logits
        self._kv.n_past = keep
        self._ctx_tokens = self._ctx_tokens[:keep]
        t0 = time.perf_counter()
        todo = np.asarray(ids[keep:])
        for i in range(0, len(todo), streaming.N_BATCH):  # bounded activation scratch
            logits = self._engine.forward(todo[i : i + streaming.N_BATCH], self._kv, all_logits=False)[-1]
        self._prompt_time += time.perf_counter() - t0
        self._prompt_tokens += len(ids) - keep
        self._ctx_tokens = list(ids)
        return logits

    def stream(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        add_bos: bool = True,
        ignore_eos: bool = False,
    ) -> Iterator[Response]:
        """Generate from a prompt (text, or token ids), one Response per token."""
        self._check_open()
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise EdgeMoEError(f"max_tokens must be a positive int, got {max_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise EdgeMoEError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if isinstance(prompt, str):
            ids = self._tok.tokenize(prompt, add_bos=add_bos, special=True)
        else:
            ids = list(_as_ids(prompt, self.config.n_vocab))
        if not ids:
            raise EdgeMoEError("the prompt is empty and the model has no BOS token to start from")
        if len(ids) >= self.n_ctx:
            raise EdgeMoEError(f"the prompt has {len(ids)} tokens; the context holds n_ctx={self.n_ctx}")
        return self._stream(ids, params, max_tokens, stops, ignore_eos)

    def _stream(
        self, ids: list[int], params: SamplingParams, max_tokens: int, stops: list[str], ignore_eos: bool
    ) -> Iterator[Response]:
        with self._lock:
            sampler = Sampler(params)
            logits = self._prefill(ids)
            history = list(ids)
            dec = StreamDecoder()
            pending = ""  # text held back because it may be the start of a stop string
            t_start = time.perf_counter()
            for n in range(1, max_tokens + 1):
                tok = sampler(logits, history)
                history.append(tok)
                self._generated_tokens += 1
                finish = None
                if self._tok.is_eog(tok) and not ignore_eos:
                    text, finish = pending + dec.flush(), "stop"
                else:
                    pending += dec.feed(self._tok.piece(tok))
                    text, hit = _split_stop(pending, stops)
                    if hit:
                        finish = "stop"
                        pending = ""
                    else:
                        safe = _safe_prefix_len(pending, stops)
                        text, pending = pending[:safe], pending[safe:]
                if finish is None and (n == max_tokens or len(history) >= self.n_ctx):
                    finish = "length"
                    text += pending + dec.flush()
                if finish is None:
                    t0 = time.perf_counter()
                    logits = self._engine.forward(np.asarray([tok]), self._kv, all_logits=False)[-1]
                    self._decode_time += time.perf_counter() - t0
                    self._ctx_tokens.append(tok)
                rate = n / max(time.perf_counter() - t_start, 1e-9)
                yield Response(text, tok, rate, self.stats(), finish)
                if finish is not None:
                    return

    def generate(self, prompt: str | list[int], **kwargs: Any) -> str:
        return "".join(r.text for r in self.stream(prompt, **kwargs))

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **kwargs: Any) -> str | Iterator[Response]:
        """Reply to a conversation with the model's chat template (base models: a plain transcript)."""
        self._check_open()
        prompt, extra_stops = self._tok.apply_chat_template(messages)
        stop = kwargs.pop("stop", None)
        stops = ([stop] if isinstance(stop, str) else list(stop or [])) + extra_stops
        it = self.stream(prompt, stop=stops or None, add_bos=not self._tok.chat_template, **kwargs)
        if stream:
            return it
        return "".join(r.text for r in it).strip() if extra_stops else "".join(r.text for r in it)

    def routing_trace(self, token_ids: list[int] | np.ndarray, weights: bool = False):
        """The experts every layer chooses for each token, [tokens, layers, top_k] (-1 in dense
        layers), evaluating the tokens one at a time as decoding does (for cache studies:
        tools/replay_trace.py); with weights=True also their gate weights, as (experts, weights)."""
        self._check_open()
        ids = _as_ids(token_ids, self.config.n_vocab)
        L = self.config.n_layer
        with self._lock:
            self._kv.reset()
            self._ctx_tokens = []
            self._engine.trace = []
            try:
                for t in ids:
                    self._engine.forward(np.asarray([t]), self._kv, all_logits=False)
                rec = self._engine.trace
                top, w = (
                    np.stack([np.concatenate([r[j] for r in rec[i::L]]) for i in range(L)], axis=1) for j in (0, 1)
                )
            finally:
                self._engine.trace = None
                self._kv.reset()
        return (top, w) if weights else top  # [T, L, K]

    # ---- stats and lifetime -------------------------------------------------------------------

    def decode_logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Next-token logits [n, vocab] float32 at each position of token_ids, the tokens fed one at
        a time from a fresh context (one forward step of one token each, as decoding feeds them) at
        the quality in force. The context is left empty."""
        self._check_open()
        ids = [int(t) for t in _as_ids(token_ids, self.config.n_vocab)]
        if len(ids) > self.n_ctx:
            raise EdgeMoEError(f"{len(ids)} tokens do not fit the context n_ctx={self.n_ctx}")
        with self._lock:
            self._kv.reset()
            self._ctx_tokens = []
            try:
                rows = [self._engine.forward(np.asarray([t]), self._kv, all_logits=False)[-1] for t in ids]
            finally:
                self._kv.reset()
        return np.stack(rows).astype(np.float32)

    @property
    def tokenizer(self):
        """The model's tokenizer (llama.cpp's vocabulary, or tokenizers' for an ONNX import): its
        chat template, BOS/EOS, apply_chat_template."""
        return self._tok

    @property
    def lock(self) -> threading.RLock:
        """The lock every generation holds: one request at a time runs on a model."""
        return self._lock

    @property
    def streamed_experts(self) -> StoreExperts | None:
        """The experts streaming from the store through the expert cache, or None when the model runs
        from its GGUF in place."""
        return self._experts

    def stats(self) -> Stats:
        now = memory.rss()
        peak = memory.peak_rss()
        decode_steps = max(self._generated_tokens - 1, 0)
        return Stats(
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated_tokens,
            prompt_tokens_per_s=self._prompt_tokens / self._prompt_time if self._prompt_time else 0.0,
            decode_tokens_per_s=decode_steps / self._decode_time if self._decode_time else 0.0,
            resident_bytes=max(now - BASELINE_RSS, 0),
            peak_resident_bytes=max(peak - BASELINE_RSS, 0),
            budget_bytes=self.budget_bytes,
            model_bytes=self._file.file_size if self._reader is None else self._store_bytes(),
            kv_bytes=self._kv.nbytes,
            n_ctx=self.n_ctx,
            cache=self._experts.snapshot() if self._experts is not None else None,
            quality=self._quality_in_force(),
            lossless=self._quality.lossless and not self._narrowed(),
        )

    def _narrowed(self) -> bool:
        """bits= below the store's top width: every expert is read at fewer planes (lossy)."""
        return self._experts is not None and self._experts.n_planes < self._experts.scheme.n_planes

    def _quality_in_force(self) -> str:
        q = self._quality.name
        return f"{q} at {self._experts.bits_of(self._experts.n_planes)} bits" if self._narrowed() else q

    def _store_bytes(self) -> int:
        return self._file.file_size + self._reader.all_experts_bytes()

    def _check_open(self) -> None:
        if getattr(self, "_closed", True):
            raise EdgeMoEError("this model is closed")

    def close(self) -> None:
        """Free the model's memory: caches, mappings, file descriptors. Safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for part in ("_tok", "_reader", "_file"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
        if self._experts is not None:
            self._experts.close()
            self._experts.cache.clear()
        self._engine = self._kv = self._experts = None  # type: ignore[assignment]

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return f"<edgemoe.Model {self.path.name} {c.arch} {c.n_layer} layers {c.n_expert}x{c.n_expert_used} experts>"


def _as_ids(token_ids: Any, n_vocab: int) -> np.ndarray:
    try:
        ids = np.asarray(token_ids)
    except (TypeError, ValueError):
        raise EdgeMoEError(f"token ids must be a list of ints, got {type(token_ids).__name__}") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise EdgeMoEError("token ids must be a non-empty 1-D list of ints")
    if ids.min() < 0 or ids.max() >= n_vocab:
        raise EdgeMoEError(f"token id out of range 0..{n_vocab - 1}: got {int(ids.min())}..{int(ids.max())}")
    return ids.astype(np.int64)


def _split_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of text can be emitted without possibly cutting into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
