"""The experts' FFN: the gated activation (as ggml rounds it), one expert on its tokens, the
experts of a GGUF in place, and the weighted sum of the chosen experts' outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..models.gguf_file import GGUFFile
from ..quant import buffers, ggml_graph, kernels
from .weights import rows, stacked_experts


def expert_act(args: ModelArgs, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The expert FFN's gated activation on gate/up projections g, u [T, F] (biases already added),
    as llama.cpp's build_moe_ffn: SwiGLU silu(g) * u (see swiglu), or gpt-oss's ggml_swiglu_oai
    with alpha 1.702 and limit 7 (hard-coded in llama.cpp): x = min(g, 7), y = clip(u, -7, 7),
    x * sigmoid(1.702 x) * (y + 1)."""
    if args.expert_act == "swiglu_oai":
        return swiglu_oai(g, u)
    return swiglu(g, u)


def swiglu_oai(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gpt-oss's ggml_swiglu_oai [T, F] float32: x = min(g, 7), y = clip(u, -7, 7), x * sigmoid(1.702 x) * (y + 1)."""
    x = np.minimum(g, np.float32(_OAI_LIMIT))
    y = np.clip(u, np.float32(-_OAI_LIMIT), np.float32(_OAI_LIMIT))
    return (x / (np.float32(1.0) + np.exp(np.float32(-_OAI_ALPHA) * x)) * (y + np.float32(1.0))).astype(
        np.float32, copy=False
    )


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u [T, F], bit for bit as llama.cpp's ggml_swiglu_split on the CPU: computed by
    ggml's own ggml_vec_swiglu_f32 where the ggml kernels are loaded (its SIMD expf differs from
    numpy's exp in the last bit of about a quarter of the values). The product is the activation
    that ggml quantizes to Q8_0 for the down projection of a quantized file, where a 1-ulp
    difference now and then moves a value across a rounding boundary of the quantizer: the
    token's output then differs by ~1e-3 relative, and through the KV cache every later one."""
    fn = ggml_graph.vec_swiglu()
    if fn is None:
        return (g / (np.float32(1.0) + np.exp(-g)) * u).astype(np.float32, copy=False)
    g = np.ascontiguousarray(g, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    if g.shape != u.shape:
        raise EdgeMoEError(f"swiglu: gate {g.shape} and up {u.shape} differ")
    y = np.empty_like(g)
    n = g.shape[-1] if g.ndim else 1
    if g.ndim <= 1 or g.size == n or n % 64 == 0:
        # llama.cpp calls it per row; rows that are whole SIMD vectors give the same bits in one call
        fn(g.size, *(buffers.addr(a) for a in (y, g, u)))
    else:
        g2, u2, y2 = g.reshape(-1, n), u.reshape(-1, n), y.reshape(-1, n)
        for r in range(g2.shape[0]):
            fn(n, *(buffers.addr(a) for a in (y2[r], g2[r], u2[r])))
    return y


_OAI_ALPHA = 1.702
_OAI_LIMIT = 7.0


@dataclass(frozen=True)
class ExpertBias:
    """One expert's FFN biases (gpt-oss): gate [F], up [F], down [D]."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


def expert_biases(gf: GGUFFile, i: int) -> list[ExpertBias] | None:
    """Layer i's per-expert biases from `ffn_{gate,up,down}_exps.bias` (GGUF [F|D, E]), or None."""
    ts = [gf.maybe(f"blk.{i}.ffn_{w}_exps.bias") for w in ("gate", "up", "down")]
    if all(t is None for t in ts):
        return None
    if any(t is None for t in ts):
        raise EdgeMoEError(f"{gf.path}: layer {i} has only some of the ffn_*_exps.bias tensors")
    g, u, d = (rows(t) for t in ts)  # [E, F], [E, F], [E, D]
    return [ExpertBias(g[e], u[e], d[e]) for e in range(g.shape[0])]


def expert_ffn(
    args: ModelArgs,
    gate: kernels.QWeight,
    up: kernels.QWeight,
    down: kernels.QWeight,
    x: np.ndarray,
    bias: ExpertBias | None = None,
) -> np.ndarray:
    """One expert on x [T, D] -> [T, D]: down(act(gate x + bg, up x + bu)) + bd."""
    y = kernels.matmul(down, expert_hidden(args, gate, up, x, bias))
    if bias is not None:
        y += bias.down
    return y


def expert_hidden(
    args: ModelArgs, gate: kernels.QWeight, up: kernels.QWeight, x: np.ndarray, bias: ExpertBias | None = None
) -> np.ndarray:
    """The expert's hidden activation act(gate x + bg, up x + bu) [T, F] (float32, contiguous): the
    input of its down projection."""
    g = kernels.matmul(gate, x)  # [T, F]
    u = kernels.matmul(up, x)  # [T, F]
    if bias is not None:
        g += bias.gate
        u += bias.up
    return np.ascontiguousarray(expert_act(args, g, u), dtype=np.float32)


def swiglu_ffn(gate: kernels.QWeight, up: kernels.QWeight, down: kernels.QWeight, x: np.ndarray) -> np.ndarray:
    g = kernels.matmul(gate, x)  # [T, F]
    u = kernels.matmul(up, x)  # [T, F]
    return kernels.matmul(down, swiglu(g, u))  # [T, D]


class ExpertSource(Protocol):
    """Where a MoE layer's routed experts come from, and how their outputs are combined: the
    engine calls moe_layer once per MoE layer, after routing. GGUFExperts computes the experts in
    place from the GGUF; streaming.StoreExperts plans widths, fetches planes through the expert
    cache and computes them. predict(): the next MoE layer's (layer, top, w) guessed from h, for a
    prefetch."""

    def moe_layer(
        self, i: int, h: np.ndarray, top: np.ndarray, w: np.ndarray, predict: Callable[[], tuple | None] | None = None
    ) -> np.ndarray:
        """sum_k w[t, k] * expert_{top[t, k]}(h[t]) [T, D] of layer i."""
        ...


class GGUFExperts:
    """Experts read in place from the GGUF file's stacked tensors (memory-mapped)."""

    def __init__(self, gf: GGUFFile, args: ModelArgs):
        self.args = args

        def stacked(i: int, what: str) -> list[kernels.QWeight] | None:
            if args.is_dense(i):
                return None
            return stacked_experts(gf.tensor(f"blk.{i}.ffn_{what}_exps.weight"), gf)

        self.gate = [stacked(i, "gate") for i in range(args.n_layer)]
        self.up = [stacked(i, "up") for i in range(args.n_layer)]
        self.down = [stacked(i, "down") for i in range(args.n_layer)]
        self.bias = [None if args.is_dense(i) else expert_biases(gf, i) for i in range(args.n_layer)]

    def ffn(self, i: int, e: int, x: np.ndarray) -> np.ndarray:
        b = self.bias[i]
        return expert_ffn(
            self.args, self.gate[i][e], self.up[i][e], self.down[i][e], x, b[e] if b is not None else None
        )

    def hidden(self, i: int, e: int, x: np.ndarray) -> np.ndarray:
        """Expert e of layer i's hidden activation on x (expert_hidden)."""
        b = self.bias[i]
        return expert_hidden(self.args, self.gate[i][e], self.up[i][e], x, b[e] if b is not None else None)

    def moe_layer(self, i: int, h: np.ndarray, top: np.ndarray, w: np.ndarray, predict=None) -> np.ndarray:
        return combine(h, top, w, lambda e, x: self.ffn(i, e, x))


def combine(h: np.ndarray, top: np.ndarray, w: np.ndarray, ffn, order=None) -> np.ndarray:
    """sum_k w[t, k] * ffn(top[t, k], h[t]) [T, D], each expert run once on all its tokens (in
    `order`, default ascending); slots with weight 0 (skipped) are left out.

    The weighted outputs are added in slot order k = 0, 1, ..., K-1, as llama.cpp's build_moe_ffn
    adds its per-slot views: float addition is not associative, and another order differs in the
    last bit, which the next layer's RMS norm and Q8_0 activations can turn into a visible
    difference on a quantized file."""
    T, K = top.shape
    if T == 1 and order is None:  # decode: one token, each expert once
        out = np.zeros_like(h)
        for e, gw in zip(top[0].tolist(), w[0].tolist()):
            if gw != 0:
                out += ffn(e, h) * np.float32(gw)
        return out
    slots = np.zeros((T, K, h.shape[1]), dtype=np.float32)  # [T, K, D]
    for e in order if order is not None else np.unique(top):
        rows, slot = np.nonzero((top == e) & (w != 0))
        if len(rows):
            slots[rows, slot] = ffn(int(e), np.ascontiguousarray(h[rows])) * w[rows, slot][:, None]
    return sum_slots(slots)


def sum_slots(slots: np.ndarray) -> np.ndarray:
    """The weighted expert outputs slots [T, K, D] summed over K in slot order, as llama.cpp's
    build_moe_ffn adds its per-slot views (another order differs in the last bit)."""
    out = slots[:, 0].copy()
    for k in range(1, slots.shape[1]):
        out += slots[:, k]
    return out
