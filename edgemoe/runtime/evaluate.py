"""Perplexity in fixed windows, for edgemoe and for llama.cpp as the reference line; the price of a
lossy quality in decode-time KL divergence against "max".

Perplexity (both engines alike): the text is tokenized once with llama.cpp's tokenizer, without BOS, and
cut into consecutive non-overlapping windows of `window` tokens (a short tail is dropped). Each
window is evaluated from a fresh context; its first token is context only, and the other
window-1 tokens are scored. Perplexity = exp(mean negative log-likelihood over all scored tokens).

Quality cost (decode_logits, decode_loss, quality_costs): a token sequence is fed one token at a
time from a fresh context (teacher-forced: one forward step of one token per position, as decoding
runs), at "max" and at the quality under test, and at every position the next-token distributions
are compared: KL(max || quality) (median, 99th percentile), top-1 agreement with max, and agreement
with reference next tokens (llama.cpp's greedy choices on the same sequence). Batched evaluation
(Model.logits, 64-token batches) understates a lossy quality's loss: an expert used by several
tokens of a batch gets the width of its most important use, which decoding never does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeMoEError
from . import llama_ref


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
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
        nll = logz - logits[np.arange(len(w) - 1), w[1:]]
        total += float(nll.sum())
        count += len(w) - 1
    secs = time.perf_counter() - t0
    mean = total / count
    return PerplexityResult(engine, float(np.exp(mean)), mean, count, len(wins), secs)


def llama_cpp_logits_fn(
    path: str, window: int, threads: int | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[], None]]:
    """llama.cpp (llama-cpp-python) evaluating a window from a fresh context, all logits."""
    import llama_cpp

    llm = llama_ref.llama(
        path,
        n_ctx=window,
        n_batch=window,
        n_ubatch=window,
        logits_all=True,
        n_threads=threads,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )

    def fn(ids: np.ndarray) -> np.ndarray:
        llm.reset()  # n_tokens = 0: eval then drops the KV cache from position 0 on
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return fn, llm.close


# ---- the price of a lossy quality, measured as decoding runs ------------------------------------------


def decode_logits(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    """model.decode_logits(token_ids): the tokens fed one at a time from a fresh context."""
    return model.decode_logits(token_ids)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) in nats per position [n] between the softmax distributions of two logit rows."""
    a, b = _log_softmax(ref_logits), _log_softmax(logits)
    return np.maximum((np.exp(a) * (a - b)).sum(axis=-1), 0.0)


@dataclass(frozen=True)
class DecodeLoss:
    """A quality's next-token distributions against "max" on the same tokens, fed one at a time."""

    quality: str
    lossless: bool
    positions: int
    kl_median: float  # nats
    kl_p99: float
    kl_mean: float
    kl_max: float
    top1_vs_max: float  # share of positions whose most likely token is max's
    reference_agreement: float | None  # share of scored positions whose most likely token is the reference's
    reference_positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_loss(
    ref_logits: np.ndarray,
    logits: np.ndarray,
    *,
    quality: str = "",
    lossless: bool = False,
    targets: Sequence[int] | None = None,
) -> DecodeLoss:
    """Compare logits [n, V] with the reference's (max) on the same positions. targets [n]: the
    reference next token at each position (-1: not scored), e.g. llama.cpp's greedy tokens."""
    ref, out = np.asarray(ref_logits), np.asarray(logits)
    if ref.shape != out.shape or ref.ndim != 2 or not len(ref):
        raise EdgeMoEError(f"logits of shapes {ref.shape} and {out.shape} do not compare")
    kl = kl_divergence(ref, out)
    top = out.argmax(axis=-1)
    agree, n_ref = None, 0
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        if t.shape != top.shape:
            raise EdgeMoEError(f"{t.size} targets for {top.size} positions")
        scored = t >= 0
        n_ref = int(scored.sum())
        agree = float((top[scored] == t[scored]).mean()) if n_ref else None
    return DecodeLoss(
        quality=quality,
        lossless=lossless,
        positions=len(kl),
        kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_vs_max=float((top == ref.argmax(axis=-1)).mean()),
        reference_agreement=agree,
        reference_positions=n_ref,
    )


def quality_costs(
    path: Any,
    token_ids: Sequence[int],
    runs: Sequence[dict[str, Any]],
    *,
    targets: Sequence[int] | None = None,
    reference: dict[str, Any] | None = None,
    **load: Any,
) -> list[DecodeLoss]:
    """The cost of each run's quality on one model: runs are load options ({"quality": "fast",
    "memory_budget": ...}), each loaded fresh (a lossy quality's choices depend on what its cache
    holds), its decode_logits on token_ids compared with those of "max", loaded once with the load
    options of `reference` (quality "max" always, the cache not filled at load: at max neither the
    budget nor the cache's contents change results, only speed). targets: see decode_loss.

    Each load runs in a process of its own, as a user's would: a budget is counted from the RSS
    right after `import edgemoe`, so memory an earlier model of the same process left behind would
    count against the next one's budget."""
    n_ctx = load.pop("n_ctx", None) or len(token_ids) + 1
    ref, _ = decode_in_new_process(
        path, token_ids, {**load, "n_ctx": n_ctx, "preload": False, **(reference or {}), "quality": "max"}
    )
    out = []
    for run in runs:
        logits, info = decode_in_new_process(path, token_ids, {**load, "n_ctx": n_ctx, **run})
        out.append(decode_loss(ref, logits, quality=info["quality"], lossless=info["lossless"], targets=targets))
    return out


_DECODE_WORKER = r"""
import json, sys
import numpy as np
import edgemoe
from edgemoe.runtime.evaluate import decode_logits
job = json.load(open(sys.argv[1]))
load, share = job["load"], job["cache_share"]
if share is not None:  # room for every expert first, then the budget cut to hold `share` of them
    from edgemoe.runtime.memory import available
    load = {**load, "memory_budget": int(0.8 * available())}
with edgemoe.load(job["path"], progress=False, **load) as m:
    if share is not None:
        m.set_budget(m.memory_plan.budget_holding(share))
    np.save(sys.argv[2], decode_logits(m, job["tokens"]))
    s = m.stats()
    c = s.cache
    print(json.dumps(dict(
        quality=s.quality,
        lossless=s.lossless,
        chosen=c.chosen if c else None,
        skipped=c.skipped if c else None,
        uses_by_bits={str(b): n for b, n in sorted(c.uses_by_bits.items())} if c else None,
    )))
"""


def decode_in_new_process(
    path: Any, token_ids: Sequence[int], load: dict[str, Any], cache_share: float | None = None
) -> tuple[np.ndarray, dict]:
    """decode_logits of the model loaded with `load` in a fresh Python process, and what it ran at:
    {"quality", "lossless", and for a store's experts "chosen" and "skipped" (token-expert pairs) and
    "uses_by_bits" (expert computations by width, keys as strings); None for a GGUF in place}.
    cache_share: instead of a budget in `load`, the budget whose expert cache holds this share of
    the store's expert bytes, set from the plan measured in that process (what the process's own
    runtime takes varies by several MB from one process to the next)."""
    with tempfile.TemporaryDirectory(prefix="edgemoe-decode-") as d:
        job, out = Path(d) / "job.json", Path(d) / "logits.npy"
        job.write_text(
            json.dumps(dict(path=str(path), tokens=[int(t) for t in token_ids], load=load, cache_share=cache_share))
        )
        p = subprocess.run([sys.executable, "-c", _DECODE_WORKER, str(job), str(out)], capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EdgeMoEError(f"{path}: decoding at quality {load.get('quality')} failed: {last}")
        return np.load(out), json.loads(p.stdout.strip().splitlines()[-1])
