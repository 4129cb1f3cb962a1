"""Routing: which experts each token uses and with what weights, as llama.cpp's build_moe_ffn
computes them (the router product and its softmax or sigmoid are ggml's own where its kernels
are loaded, so the weights are llama.cpp's to the bit)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..models.config import ModelArgs
from ..quant import ggml_graph

if TYPE_CHECKING:
    from .engine import Layer


def route(args: ModelArgs, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts [T, K] and their gate weights [T, K] of h [T, D], by the model's gating."""
    return ROUTERS[args.gating](args, layer, h)


def route_softmax(args: ModelArgs, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts, top-k, renormalised if norm_topk (the six original arches);
    each step rounds as llama.cpp's build_moe_ffn (see route_deepseek)."""
    a = args
    probs = router_probs(layer.router, h, "softmax")  # [T, E]
    top = topk(probs, a.n_expert_used)  # [T, K]
    w = np.take_along_axis(probs, top, axis=-1)
    return top, (renormalised(w) if a.norm_topk else w).astype(np.float32)


def route_deepseek(args: ModelArgs, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """deepseek2: softmax or sigmoid scores; the selection adds exp_probs_b (V3) and is limited
    to the n_group_used expert groups whose two best (biased) scores sum highest; the weights
    are the unbiased scores, renormalised if expert_weights_norm, times expert_weights_scale.

    Every step rounds as llama.cpp's build_moe_ffn does (the router product and its sigmoid or
    softmax are ggml's own, see router_probs), so the gate weights are llama.cpp's to the bit:
    on a quantized file a last-bit difference in them reaches the next layer's Q8_0
    activations through the residual, and can flip a rounding there."""
    a = args
    probs = router_probs(layer.router, h, a.gating_func)  # [T, E], as ggml computes them
    sel = probs + layer.exp_probs_b if layer.exp_probs_b is not None else probs
    if a.n_expert_groups > 1:
        sel = limit_groups(sel, a.n_expert_groups, a.n_group_used)
    top = topk(sel, a.n_expert_used)
    w = np.take_along_axis(probs, top, axis=-1)
    if a.norm_topk:
        w = renormalised(w)
    if a.expert_weights_scale not in (0.0, 1.0):
        w = w * np.float32(a.expert_weights_scale)
    return top, w.astype(np.float32)


def route_topk_softmax(args: ModelArgs, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss: top-k of the router logits (+ router bias), then softmax over those k."""
    a = args
    logits = h @ layer.router.T  # [T, E]
    if layer.router_b is not None:
        logits = logits + layer.router_b
    top = topk(logits, a.n_expert_used)
    return top, softmax(np.take_along_axis(logits, top, axis=-1)).astype(np.float32)


ROUTERS = {"softmax": route_softmax, "deepseek": route_deepseek, "softmax_weight": route_topk_softmax}


def renormalised(w: np.ndarray) -> np.ndarray:
    """w [T, K] / its row sums, as llama.cpp: ggml_sum_rows adds in order in double, the sum is
    clamped at 6.1e-5 (the smallest normal f16), and the division is in float."""
    wsum = np.cumsum(w.astype(np.float64), axis=-1)[:, -1:].astype(np.float32)
    return w / np.maximum(wsum, np.float32(6.103515625e-5))


def router_probs(router: np.ndarray, h: np.ndarray, gating: str) -> np.ndarray:
    """The router's scores [T, E] = sigmoid or softmax of h [T, D] @ router [E, D].T, computed by
    ggml itself (a two-node graph: ggml_mul_mat of the F32 router, then ggml_sigmoid or
    ggml_soft_max, on the CPU backend), so they are llama.cpp's to the bit: its F32 product runs
    llamafile's tinyBLAS with its own summation order, which BLAS and numpy's exp do not
    reproduce. Without the ggml kernels: numpy, equal to ~1e-7."""
    if not ggml_graph.available() or h.shape[0] == 0:
        logits = h @ router.T
        return (softmax(logits) if gating == "softmax" else sigmoid(logits)).astype(np.float32)
    return ggml_graph.Graph.get().router_probs(router, h, gating == "softmax")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first (ggml_argsort_top_k)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def limit_groups(sel: np.ndarray, n_groups: int, n_used: int) -> np.ndarray:
    """-inf outside the n_used groups whose top-2 scores sum highest (llama.cpp's build_moe_ffn)."""
    T, E = sel.shape
    grouped = sel.reshape(T, n_groups, E // n_groups)
    top2 = -np.sort(-grouped, axis=-1)[..., :2].astype(np.float32)
    gscore = top2[..., 0] + top2[..., 1]  # [T, n_groups]
    keep = topk(gscore, n_used)  # [T, n_used]
    ok = np.zeros((T, n_groups), dtype=bool)
    np.put_along_axis(ok, keep, True, axis=-1)
    return np.where(ok[:, :, None], grouped, -np.inf).reshape(T, E)
