"""Perplexity in fixed windows, for edgemoe and for llama.cpp as the reference line.

Method (both engines alike): the text is tokenized once with llama.cpp's tokenizer, without BOS, and
cut into consecutive non-overlapping windows of `window` tokens (a short tail is dropped). Each
window is evaluated from a fresh context; its first token is context only, and the other
window-1 tokens are scored. Perplexity = exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import EdgeMoEError


@dataclass(frozen=True)
class PerplexityResult:
    engine: str
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.windows * (self.tokens_scored / max(self.windows, 1) + 1) / max(self.seconds, 1e-9)


def windows_of(tokens: list[int], window: int, max_windows: int | None = None) -> list[np.ndarray]:
    if window < 2:
        raise EdgeMoEError(f"window must be at least 2 tokens, got {window}")
    n = len(tokens) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EdgeMoEError(f"the text has {len(tokens)} tokens, fewer than one window of {window}")
    arr = np.asarray(tokens[: n * window], dtype=np.int64)
    return list(arr.reshape(n, window))


def perplexity(engine: str, logits_fn: Callable[[np.ndarray], np.ndarray], wins: list[np.ndarray]) -> PerplexityResult:
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    for w in wins:
        logits = np.asarray(logits_fn(w), dtype=np.float64)[:-1]  # [W-1, V] predicting w[1:]
        m = logits.max(axis=-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1)))
        nll = logz - logits[np.arange(len(w) - 1), w[1:]]
        total += float(nll.sum())
        count += len(w) - 1
    secs = time.perf_counter() - t0
    mean = total / count
    return PerplexityResult(engine, float(np.exp(mean)), mean, count, len(wins), secs)


def llama_cpp_logits_fn(path: str, window: int, threads: int | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[], None]]:
    """llama.cpp (llama-cpp-python) evaluating a window from a fresh context, all logits."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
        verbose=False, n_threads=threads, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )

    def fn(ids: np.ndarray) -> np.ndarray:
        llm.reset()  # n_tokens = 0: eval then drops the KV cache from position 0 on
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return fn, llm.close
