"""The Python API: edgemoe.load(...) -> Model with logits / generate / stream / chat / stats."""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeMoEError
from .models import gguf_file
from .models.config import DEFAULT_N_CTX, ModelArgs
from .models.gguf_file import GGUFFile
from .models.tokenizer import StreamDecoder, as_token_ids, open_tokenizer
from .quant import kernels
from .runtime import memory, policy
from .runtime.budget import Budget, MemoryPlan
from .runtime.cache import ExpertCache
from .runtime.engine import N_BATCH, N_SPAN, Engine
from .runtime.kvcache import KVCache
from .runtime.memory import BASELINE_RSS  # resident_bytes counts from the RSS after `import edgemoe`
from .runtime.sampling import Sampler, SamplingParams, StopFilter
from .runtime.stats import Stats
from .runtime.streaming import StoreExperts
from .store import catalog
from .store import reader as store
from .store.reader import StoreReader


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
    load, default on); threads (kernel threads, default EDGEMOE_THREADS, else the physical cores
    as llama.cpp counts them; process-wide: the last load's count applies to every model).
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
        threads: int | None = None,
    ):
        if threads is not None:
            kernels.set_threads(threads)  # validated before anything loads
        self.path = Path(path) if path is not None else bundled_model_path()
        self._quality = policy.parse_quality(quality)  # validated now
        self.quality = self._quality.name
        self._budget = Budget(None if memory_budget is None else memory.parse_size(memory_budget))
        if isinstance(n_ctx, bool) or not (n_ctx is None or (isinstance(n_ctx, int) and n_ctx > 0)):
            raise EdgeMoEError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.store_path: Path | None = None
        self._experts: StoreExperts | None = None
        self._reader: StoreReader | None = None
        self._onnx_pool: int | str | None = None  # onnx_experts={"pool": ...}: bytes for its sessions
        if store.is_store(self.path):
            self.store_path = self.path
        elif self.path.is_file() and (
            self.path.suffix.lower() == ".onnx" or self._budget.needs_store(self.path, bits, quality)
        ):
            self.store_path = self._converted_store(progress, n_ctx, kv_type)
        dense_path = self.store_path / store.DENSE if self.store_path else self.path
        self._reader = StoreReader(self.store_path) if self.store_path else None  # its headers checked first
        self._file = GGUFFile(dense_path)
        try:
            self._open(dense_path, n_ctx, kv_type, bits, cache_policy, pipeline, prefetch, onnx_experts)
            self._warm_up()
            if self._experts is not None:
                self._fit_cache_after_warmup()
                if preload:
                    self._experts.preload()
        except BaseException:
            self._closed = False
            self.close()
            raise

    def _open(self, dense_path, n_ctx, kv_type, bits, cache_policy, pipeline, prefetch, onnx_experts) -> None:
        """Configuration, KV cache, experts (in place or streamed), engine and tokenizer."""
        if self.store_path:
            self.config = ModelArgs.from_gguf(self._file, n_ff_exp=self._reader.n_ff_exp)
        else:
            self.config = ModelArgs.from_gguf(self._file)
        self.n_ctx = n_ctx or min(DEFAULT_N_CTX, self.config.n_ctx_train)
        if self.n_ctx > self.config.n_ctx_train:  # as llama.cpp warns ("possible training context overflow")
            warnings.warn(
                f"{self.path.name}: n_ctx {self.n_ctx} is beyond the model's training context "
                f"{self.config.n_ctx_train}: output past that position may degrade",
                stacklevel=4,
            )
        self._kv = KVCache(self.config, self.n_ctx, kv_type)
        if self.store_path:
            self._open_store(bits, cache_policy, pipeline, prefetch)
            if onnx_experts:  # experts on onnxruntime by the rule of edgemoe.store.onnx_experts
                from .store.onnx_experts import OnnxExperts

                opts = dict(onnx_experts) if isinstance(onnx_experts, dict) else {}
                self._onnx_pool = opts.pop("pool", None)
                self._experts.onnx = OnnxExperts(self._experts.scheme, self._experts.shapes, **opts)
        else:
            self._budget.check_in_place(self.path, self._file.file_size, self._kv.nbytes, self.n_ctx)
            if kernels.packs_any(self._file.tensors.values()):
                # as llama.cpp does by default: Q4_0 and Q4_K matrices repacked in RAM for ggml's
                # faster kernels; the bytes must be ours to rewrite, so copy the file in
                self._file.load_into_memory(gguf_file.embedding_on_disk(self._file))
        self._engine = Engine(self._file, self.config, self._experts)
        self._tok = open_tokenizer(dense_path, self.store_path, self.config.n_vocab, self._file.metadata)
        if self._tok.n_vocab != self.config.n_vocab:
            raise EdgeMoEError(
                f"{self.path}: vocabulary has {self._tok.n_vocab} tokens but token_embd has {self.config.n_vocab} rows"
            )
        self._lock = threading.RLock()
        self._ctx_tokens: list[int] = []  # what the KV cache holds, for prompt-prefix reuse
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._prompt_time = 0.0
        self._decode_time = 0.0
        self._closed = False

    # ---- memory (decided in runtime.budget) ----------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        return self._budget.bytes

    @property
    def memory_plan(self) -> MemoryPlan | None:
        """How the budget is split, for models that stream experts (None otherwise)."""
        return self._budget.plan

    def _converted_store(self, progress: bool, n_ctx: int | None, kv_type: str) -> Path:
        from .store.convert import convert

        found, fp = catalog.find_store(self.path)  # beside the model (edgemoe convert), else the cache's
        if found is not None:
            return found
        dst = catalog.cache_store(self.path, fp)
        if self.path.suffix.lower() != ".onnx":
            self._budget.refuse_before_converting(self.path, n_ctx, lambda c, n: KVCache(c, n, kv_type).nbytes)
        catalog.ensure_writable_dir(dst.parent, "an expert store")
        if progress:
            print(
                f"edgemoe: converting {self.path.name} into an expert store at {dst} (first use only)", file=sys.stderr
            )
        return convert(self.path, dst, progress=progress, force=store.is_store(dst))  # replaces an older format's

    def _open_store(self, bits: int | None, policy: str, pipeline: bool, prefetch: bool) -> None:
        # the resident part must stay resident under memory pressure
        self._reader.load_dense(self._file)  # into memory, every tensor checked against its checksum
        r = self._reader
        c = self.config
        for i in range(c.n_layer):
            have = len(r.locations[i]) if i < len(r.locations) else 0
            if have != (0 if c.is_dense(i) else c.n_expert):
                raise EdgeMoEError(
                    f"{r.root / store.MANIFEST}: layer {i} has {have} experts in the store, "
                    f"the model's configuration has {0 if c.is_dense(i) else c.n_expert}"
                )
        capacity = self._budget.open_store(
            c, self.n_ctx, self._file.resident_bytes, self._kv.nbytes, r.all_experts_bytes()
        )
        cache = ExpertCache(r, capacity, policy)
        self._experts = StoreExperts(r, cache, self.config, self._file, bits, self._quality, pipeline, prefetch)
        self._budget.check_open(capacity, self._experts.min_layer_bytes(c.n_expert_used))

    def _warm_up(self) -> None:
        """One token through the whole model at load, and the largest attention graph once: compiles
        the kernels and sizes ggml's work buffer (so the runtime can be measured), and turns
        tensors whose shapes contradict the configuration into one clear error now rather than a
        crash mid-generation."""
        try:
            self.logits([self._tok.bos if self._tok.bos >= 0 else 0])
            self._ctx_tokens = []  # the warm-up is not a prompt to reuse
            self._engine.reserve(self._kv, N_BATCH)
            self._kv.reset()  # its pages back: the runtime is measured without them
        except EdgeMoEError:
            raise
        except (ValueError, TypeError, IndexError) as exc:
            raise EdgeMoEError(
                f"{self.path}: the tensors do not fit the model's configuration ({type(exc).__name__}: {exc})"
            ) from None

    def _fit_cache_after_warmup(self) -> None:
        self._budget.fit_after_warmup(
            self._experts.cache,
            self._file.resident_bytes,  # copied into anonymous memory at load
            self._kv.nbytes,
            self._experts.min_layer_bytes(self.config.n_expert_used),
            self._reader.all_experts_bytes(),
            self.store_path,
            self._experts.onnx,
            self._onnx_pool,
        )
        cache, kv = self._experts.cache, self._kv
        kv.on_write = lambda: self._budget.lend(cache, self.config, kv)
        kv.on_write()

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
            return self._budget.resize(self._experts.cache, budget)

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
        ids = as_token_ids(token_ids, self.config.n_vocab)
        with self._lock:
            self._kv.reset()
            self._ctx_tokens = []
            out = np.concatenate(
                [
                    self._engine.forward(ids[i : i + N_SPAN], self._kv, all_logits=True)
                    for i in range(0, len(ids), N_SPAN)
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
        for i in range(0, len(todo), N_SPAN):  # layer by layer in spans: bounded activation scratch
            logits = self._engine.forward(todo[i : i + N_SPAN], self._kv, all_logits=False)[-1]
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
            ids = list(as_token_ids(prompt, self.config.n_vocab))
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
            held = StopFilter(stops)  # holds back text that may be the start of a stop string
            t_start = time.perf_counter()
            for n in range(1, max_tokens + 1):
                tok = sampler(logits, history)
                history.append(tok)
                self._generated_tokens += 1
                finish = None
                if self._tok.is_eog(tok) and not ignore_eos:
                    text, finish = held.flush() + dec.flush(), "stop"
                else:
                    text, hit = held.feed(dec.feed(self._tok.piece(tok)))
                    finish = "stop" if hit else None
                if finish is None and (n == max_tokens or len(history) >= self.n_ctx):
                    finish = "length"
                    text += held.flush() + dec.flush()
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
        ids = as_token_ids(token_ids, self.config.n_vocab)
        L = self.config.n_layer
        with self._lock:
            self._engine.trace = rec = []
            try:
                self._one_at_a_time(ids)
            finally:
                self._engine.trace = None
        top, w = (np.stack([np.concatenate([r[j] for r in rec[i::L]]) for i in range(L)], axis=1) for j in (0, 1))
        return (top, w) if weights else top  # [T, L, K]

    def _one_at_a_time(self, ids) -> list[np.ndarray]:
        """Each token's next-token logits, the tokens fed one at a time from a fresh context as
        decoding feeds them; the context is left empty."""
        with self._lock:
            self._kv.reset()
            self._ctx_tokens = []
            try:
                return [self._engine.forward(np.asarray([t]), self._kv, all_logits=False)[-1] for t in ids]
            finally:
                self._kv.reset()

    # ---- stats and lifetime -------------------------------------------------------------------

    def decode_logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Next-token logits [n, vocab] float32 at each position of token_ids, the tokens fed one at
        a time from a fresh context (one forward step of one token each, as decoding feeds them) at
        the quality in force. The context is left empty."""
        self._check_open()
        ids = [int(t) for t in as_token_ids(token_ids, self.config.n_vocab)]
        if len(ids) > self.n_ctx:
            raise EdgeMoEError(f"{len(ids)} tokens do not fit the context n_ctx={self.n_ctx}")
        return np.stack(self._one_at_a_time(ids)).astype(np.float32)

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
