#!/usr/bin/env python3
"""Write a large synthetic MoE GGUF (OLMoE- or gpt-oss-shaped) for benchmarks (fast, memory-lean).

    python tools/make_bench_model.py --shape olmoe-1b-7b --type Q4_0 --out PATH   # ~4.0 GB
    python tools/make_bench_model.py --shape olmoe-small                          # ~1.2 GB
    python tools/make_bench_model.py --shape olmoe-small --check                  # + llama.cpp run
    python tools/make_bench_model.py --shape olmoe-1b-7b --type Q4_K_M            # ~4.2 GB, from Q4_0
    python tools/make_bench_model.py --shape gpt-oss-20b --type MXFP4             # ~12.1 GB
    python tools/make_bench_model.py --shape gpt-oss-20b --layers 2 --vocab 4096  # ~0.9 GB, same layers

Quantized blocks are generated directly (random codes + fp16 scales), never as floats, and
tensors are written one layer at a time, so a 4 GB file needs a few hundred MB of RAM and one or
two minutes of CPU. OLMoE shapes: experts and attention use --type (Q4_0 or Q8_0; the K-quant types
are that Q4_0 file requantized by llama.cpp), token_embd/output Q8_0, norms and routers F32 (as
llama.cpp keeps them).

gpt-oss-20b (tools/bench_gpt_oss.py; --type MXFP4 only, and MXFP4 only with it): the architecture
llama.cpp reads as "gpt-oss" with gpt-oss-20b's shape (24 layers, hidden 2880, 64 query / 8 KV heads
of 64, 32 experts of 2880, top-4, sliding window 128 on every other layer, attention sinks, biases,
yarn rope, vocab 201088). Experts MXFP4 (random FP4 codes and E8M0 exponents), attention and
token_embd/output Q8_0, norms, biases, sinks and routers F32: 12.1 GB, written in 5 to 6 minutes
on 2 cores (4 of them calibrating) with a peak RSS of 1.2 GB.

Routing calibrated to a trained MoE's: the bundled model (top-8 of 64 experts, trained with a
load-balancing loss; its per-layer routing measured on its test split, models/data/verify.json).
Random weights route with far too much token-to-token reuse: the attention output (a running mix
over the context) piles up in the residual stream layer after layer, so deep layers pick nearly the
same experts for consecutive tokens, which flatters every expert cache; and they spread picks
almost evenly, with flat gate weights. So the writer runs the model it writes (a float numpy
forward pass over CAL_SEQS sequences of CAL_POS random tokens, what the bench feeds) and fits,
layer by layer, three knobs to three targets (routing_targets: the trained model's figures over
relative depth, mapped to the shape's top-k of E as excess over independent, uniform picks):
a per-expert term along the hidden states' common direction in the router rows (a bias, in
effect; gpt-oss: its router bias itself) to the popularity entropy; the attention output's
gain to the reuse of consecutive tokens' experts; the router's scale to the first expert's share
of the top-k gate mass (the concentration that sets how much `fast` skips). The targets, the
knobs chosen and what they reached are stored in the file (edgemoe.devices.bench.*) and printed
by `edgemoe bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import edgemoe.testing.synth as synth
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import edgemoe.testing.synth as synth
import gguf

from edgemoe.runtime import llama_ref

Q = gguf.GGMLQuantizationType
REQUANTIZED = ("Q4_K_M", "Q5_K_M", "Q6_K")  # written by llama.cpp's quantizer from the Q4_0 file
CAL_SEQS, CAL_POS = 16, 32  # calibration: sequences x positions (the bench: prompt 16 + decode 16)
GAIN_RANGE = (0.05, 4.0)  # attention-output gains the calibration may choose
SKEW_MAX = 20.0  # popularity skews it may choose (router rows + skew * |row| * z_e * u, z standard normal)
SCALE_RANGE = (0.002, 20.0)  # router scales it may choose
DEFAULT_DIR = Path.home() / ".cache" / "edgemoe" / "bench-models"


@dataclass(frozen=True)
class BenchShape:
    n_layer: int
    n_embd: int = 2048
    n_head: int = 16
    n_expert: int = 64
    n_expert_used: int = 8
    n_ff_exp: int = 1024
    vocab: int = 50304  # normal tokens; the file has synth.N_SPECIAL control tokens more
    n_ctx_train: int = 4096
    arch: str = "olmoe"  # "gpt-oss": bench_gpt_oss.GptOssShape


SHAPES = {
    # OLMoE-1B-7B: 16 layers, hidden 2048, 16 heads (no GQA), 64 experts x 1024, top-8
    "olmoe-1b-7b": BenchShape(n_layer=16),
    # same per-layer geometry (1.2 MB Q4_0 expert slices), 4 layers: ~1.2 GB
    "olmoe-small": BenchShape(n_layer=4),
}

# ---- direct block generation -------------------------------------------------------------------

# Q4_0 stores x = (q - 8) * d. Random nibbles would give mean -0.5*d; map code 0 (-8) to 8 (0)
# so values are -7..7 with zero mean (std 4.18 units of d).
_LUT4 = np.arange(256, dtype=np.uint8)
_lo, _hi = _LUT4 & 0xF, _LUT4 >> 4
_LUT4 = (np.where(_lo == 0, 8, _lo) | (np.where(_hi == 0, 8, _hi) << 4)).astype(np.uint8)
_Q4_STD = float(np.sqrt(2 * sum(k * k for k in range(1, 8)) / 16))
_Q8_STD = float(np.sqrt(((np.arange(-128, 128) + 0.5) ** 2).mean()))


def quant_blocks(
    rng: np.random.Generator, shape: tuple[int, ...], std: float, qtype: Q, jitter: float = 0.1
) -> np.ndarray:
    """Random Q4_0/Q8_0 data for a float tensor of numpy `shape`, element std ~`std`.
    Returns uint8 of shape (*shape[:-1], row_bytes)."""
    blk, bsize = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    nb = n // blk
    out = np.empty((nb, bsize), np.uint8)
    unit = _Q4_STD if qtype == Q.Q4_0 else _Q8_STD
    d = (std / unit) * (1.0 + jitter * rng.standard_normal(nb, dtype=np.float32))
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    raw = np.frombuffer(rng.bytes(nb * (bsize - 2)), np.uint8)
    if qtype == Q.Q4_0:
        raw = _LUT4[raw]
    out[:, 2:] = raw.reshape(nb, bsize - 2)
    return out.reshape(*shape[:-1], shape[-1] // blk * bsize)


def dequant(x: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(x, qtype)


# ---- routing calibration -----------------------------------------------------------------------

# Routing of a trained MoE: the bundled model (models/shakespeare-moe.md, "Routing"), trained by
# tools/train_default_model.py with a load-balancing loss, top-8 of 64 experts like OLMoE, its
# per-layer figures measured on its test split and saved in models/data/verify.json ("routing").
TRAINED_ROUTING = Path(__file__).resolve().parents[1] / "models" / "data" / "verify.json"


@dataclass(frozen=True)
class RoutingTargets:
    """Per-layer targets of a bench model's routing (arrays of n_layer):
    reuse    mean |topk(t) & topk(t-1)| / k
    entropy  entropy of the experts' shares of all picks / log(n_expert) (popularity skew)
    top1     mean share of a token's top-k gate mass held by its first expert (concentration)"""

    reuse: np.ndarray
    entropy: np.ndarray
    top1: np.ndarray
    source: str


def trained_routing(path: Path = TRAINED_ROUTING) -> dict:
    """{"k", "n_expert", "layers": [{reuse, entropy_vs_uniform, top1_weight, ...}]} of the trained model."""
    import json

    v = json.loads(path.read_text(encoding="utf-8"))
    return {"k": v["config"]["num_experts_per_tok"], "n_expert": v["config"]["num_experts"], **v["routing"]}


def routing_targets(n_layer: int, k: int, n_expert: int, measured: dict | None = None) -> RoutingTargets:
    """The trained model's per-layer routing, interpolated over relative depth and mapped to top-k of
    n_expert: reuse and top-1 share as their excess over independent, uniform picks (reuse k/E, top-1
    share 1/k), so a model of the trained model's own shape gets its figures back; the popularity
    entropy ratio as it is."""
    m = measured or trained_routing()
    k0, e0, layers = m["k"], m["n_expert"], m["layers"]
    depth = np.arange(len(layers)) / max(len(layers) - 1, 1)
    rel = np.arange(n_layer) / max(n_layer - 1, 1)

    def mapped(key, base0, base):
        excess = [max(0.0, (r[key] - base0) / (1 - base0)) for r in layers]
        return base + (1 - base) * np.interp(rel, depth, excess)

    return RoutingTargets(
        reuse=mapped("reuse", k0 / e0, k / n_expert),
        entropy=np.interp(rel, depth, [r["entropy_vs_uniform"] for r in layers]),
        top1=mapped("top1_weight", 1 / k0, 1 / k),
        source=f"the bundled model (top-{k0} of {e0}, {len(layers)} layers, measured on {m['tokens']:,} test tokens)",
    )


def reuse(top: np.ndarray) -> float:
    """Mean share of a token's experts that the previous token of its sequence also chose;
    top is (sequences, positions, k)."""
    k = top.shape[-1]
    same = (top[:, 1:, :, None] == top[:, :-1, None, :]).any(-1)
    return float(same.sum(-1).mean() / k)


def popularity(top: np.ndarray, n_expert: int) -> tuple[float, float]:
    """(entropy of the picks / log(n_expert): 1 = even, busiest expert's share over the uniform share)."""
    c = np.bincount(top.ravel(), minlength=n_expert) / top.size
    nz = c[c > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(n_expert)), float(c.max() * n_expert)


def top1_share(logits: np.ndarray, k: int) -> float:
    """Mean share of the top-k softmax mass held by the first expert."""
    z = np.sort(logits, -1)[..., ::-1][..., :k]
    w = np.exp(z - z[..., :1])
    return float((1 / w.sum(-1)).mean())


def skew_vector(seed: int, layer: int, n_expert: int) -> np.ndarray:
    """Fixed per-expert directions of the router-row norm skew (popularity), standard normal."""
    return np.random.default_rng([seed, 10_000 + layer]).standard_normal(n_expert)


def bisect(f, lo: float, hi: float, target: float, steps: int = 14, geometric: bool = False) -> float:
    """x in [lo, hi] where the monotone f comes closest to target (a bound when out of reach)."""
    flo, fhi = f(lo), f(hi)
    up = fhi >= flo
    if (target <= flo) == up:
        return lo
    if (target >= fhi) == up:
        return hi
    for _ in range(steps):
        mid = np.sqrt(lo * hi) if geometric else (lo + hi) / 2
        lo, hi = (mid, hi) if (f(mid) < target) == up else (lo, mid)
    return (lo + hi) / 2 if not geometric else float(np.sqrt(lo * hi))


def make_router(rng: np.random.Generator, D: int, E: int, scale: float = 2.0) -> np.ndarray:
    """Random router rows (E, D) of norm `scale`: logits std ~scale on a unit-RMS hidden state."""
    g = rng.standard_normal((E, D))
    g *= scale / np.linalg.norm(g, axis=1, keepdims=True)
    return g.astype(np.float32)


def scale_blocks(data: np.ndarray, qt: Q, g: float) -> np.ndarray:
    """Multiply a Q4_0/Q8_0 tensor by g in place (its fp16 block scales)."""
    bsize = gguf.GGML_QUANT_SIZES[qt][1]
    blocks = data.reshape(-1, bsize)
    d = blocks[:, :2].copy().view(np.float16)
    blocks[:, :2] = (d.astype(np.float32) * g).astype(np.float16).view(np.uint8)
    return data


class Calibration:
    """A float numpy forward pass of the model being written (as llama.cpp's olmoe graph computes
    it, up to quantization noise) on CAL_SEQS sequences of CAL_POS random tokens.

    A router is what `logits` takes: here the F32 rows (E, D); subclasses (bench_gpt_oss) may
    use another form and override the hooks below the attention."""

    FFN_NORM = "ffn_norm.weight"  # the norm before the router and experts

    def __init__(self, shape: BenchShape, seed: int, targets: RoutingTargets | None = None):
        n_vocab = shape.vocab
        self.shape = shape
        self.seed = seed
        self.ids = np.random.default_rng(seed + 1).integers(0, n_vocab - 8, size=(CAL_SEQS, CAL_POS))
        self.h: np.ndarray | None = None
        self.pos = np.arange(CAL_POS, dtype=np.float64)
        self.causal = np.tril(np.ones((CAL_POS, CAL_POS), bool))
        self.targets = targets or routing_targets(shape.n_layer, shape.n_expert_used, shape.n_expert)
        self.gains: list[float] = []
        self.reached: list[float] = []  # reuse
        self.entropy: list[float] = []  # popularity entropy / log(n_expert)
        self.busiest: list[float] = []
        self.top1: list[float] = []
        self.skews: list[float] = []  # router-row norm skew (popularity)
        self.scales: list[float] = []  # router scale (concentration)

    def embed(self, token_embd: np.ndarray) -> None:
        rows = dequant(token_embd[self.ids.ravel()], Q.Q8_0)
        self.h = rows.reshape(CAL_SEQS, CAL_POS, -1).astype(np.float32)

    def attention(self, t: dict[str, np.ndarray], p: str, wtype: Q) -> np.ndarray:
        """The layer's attention output for every calibration token, (S, P, D), before W_o's gain."""
        S, P, D = self.h.shape
        H = self.shape.n_head
        hd = D // H
        x = _rms(self.h, t[p + "attn_norm.weight"])
        q = _rms(x @ dequant(t[p + "attn_q.weight"], wtype).T, t[p + "attn_q_norm.weight"]).reshape(S, P, H, hd)
        k = _rms(x @ dequant(t[p + "attn_k.weight"], wtype).T, t[p + "attn_k_norm.weight"]).reshape(S, P, H, hd)
        v = (x @ dequant(t[p + "attn_v.weight"], wtype).T).reshape(S, P, H, hd)
        q = np.stack([_neox_rope(q[s], self.pos) for s in range(S)])
        k = np.stack([_neox_rope(k[s], self.pos) for s in range(S)])
        sc = np.einsum("sthd,suhd->shtu", q, k) / np.sqrt(hd)
        sc = np.where(self.causal[None, None], sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        mix = np.einsum("shtu,suhd->sthd", pr, v).reshape(S, P, D)
        return (mix @ dequant(t[p + "attn_output.weight"], wtype).T).astype(np.float32)

    def choose_gain(self, att: np.ndarray, ffn_norm: np.ndarray, router: np.ndarray, layer: int) -> float:
        """The attention-output gain at which this layer's reuse comes closest to its target
        (bisection, as reuse grows with the gain: the attention output is the slowly changing part;
        the closest of the gains tried, since on a finite sample it does not grow smoothly)."""
        k, target = self.shape.n_expert_used, self.targets.reuse[layer]
        tried = {}

        def reuse_at(g):
            x = _rms(self.h + g * att, ffn_norm)
            tried[g] = reuse(np.argsort(-self.logits(x, router), -1)[..., :k])
            return tried[g]

        lo, hi = GAIN_RANGE
        if reuse_at(lo) < target < reuse_at(hi):
            for _ in range(12):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if reuse_at(mid) < target else (lo, mid)
        return min(tried, key=lambda g: abs(tried[g] - target))

    def choose_routing(self, att: np.ndarray, ffn_norm: np.ndarray, router: np.ndarray, layer: int):
        """(attention gain, router): popularity first, by adding skew * |row| * z_e * u to each router
        row (z: fixed normal per expert, skew_vector; u: the direction of the layer's mean normed
        hidden state, which most tokens share, so the term acts as a per-expert bias), until the
        popularity entropy meets its target; then the gain for reuse with that router
        (choose_gain); then the whole router scaled until the first expert's share of the top-k
        mass meets its target (scaling changes no pick)."""
        E, k = self.shape.n_expert, self.shape.n_expert_used
        z = skew_vector(self.seed, layer, E)
        row = self.row_norm(router)
        r = router
        for _ in range(4):  # the gain moves popularity and the skew moves reuse: alternate
            gain = self.choose_gain(att, ffn_norm, r, layer)
            x = _rms(self.h + gain * att, ffn_norm)
            u = x.reshape(-1, x.shape[-1]).mean(0)
            u /= np.linalg.norm(u)

            def skewed(skew, u=u):
                return self.skewed(router, skew * row, z, u)

            def entropy_at(skew, x=x, skewed=skewed):
                return popularity(np.argsort(-self.logits(x, skewed(skew)), -1)[..., :k], E)[0]

            skew = bisect(entropy_at, 0.0, SKEW_MAX, self.targets.entropy[layer])
            r = skewed(skew)
        gain = self.choose_gain(att, ffn_norm, r, layer)  # reuse, the cache's figure, is met last
        logits = self.logits(_rms(self.h + gain * att, ffn_norm), r)
        scale = bisect(lambda c: top1_share(c * logits, k), *SCALE_RANGE, self.targets.top1[layer], geometric=True)
        self.skews.append(float(skew))
        self.scales.append(float(scale))
        return gain, self.scaled(r, scale)

    # ---- the router's form (overridden by bench_gpt_oss) ----

    def router_of(self, t: dict[str, np.ndarray], p: str):
        """The layer's router as generated (its tensors in t)."""
        return t[p + "ffn_gate_inp.weight"]

    def router_tensors(self, p: str, router) -> dict[str, np.ndarray]:
        """The file's tensors of a calibrated router."""
        return {p + "ffn_gate_inp.weight": router}

    @staticmethod
    def logits(x: np.ndarray, router) -> np.ndarray:
        return x @ router.T

    @staticmethod
    def row_norm(router) -> float:
        """Mean norm of the router rows (~ the logits' std on a unit-RMS hidden state)."""
        return float(np.linalg.norm(router, axis=1).mean())

    @staticmethod
    def skewed(router, amount: float, z: np.ndarray, u: np.ndarray):
        """The router with amount * z_e along u added to each row e (see choose_routing)."""
        return router + amount * z[:, None] * u[None, :]

    @staticmethod
    def scaled(router, scale: float):
        return (scale * router).astype(np.float32)

    def moe(self, t: dict[str, np.ndarray], p: str, wtype: Q, gain: float, att: np.ndarray) -> None:
        """Advance the hidden states through the layer: attention (with its gain), then the experts
        the router picks, weighted by gate_weights."""
        k = self.shape.n_expert_used
        self.h = self.h + gain * att
        x = _rms(self.h, t[p + self.FFN_NORM])
        logits = self.logits(x, self.router_of(t, p))
        top = np.argsort(-logits, -1)[..., :k]
        self.record(gain, top, logits)
        xf, tf = x.reshape(-1, x.shape[-1]), top.reshape(-1, k)
        wf = self.gate_weights(logits, top).reshape(-1, k)
        out = np.zeros_like(xf)
        for e in np.unique(tf):
            rows, slot = np.nonzero(tf == e)
            out[rows] += wf[rows, slot][:, None] * self.expert(t, p, e, xf[rows], wtype)
        self.h = (self.h + out.reshape(self.h.shape)).astype(np.float32)

    def record(self, gain: float, top: np.ndarray, logits: np.ndarray) -> None:
        """The layer's figures: its gain, reuse, popularity and first expert's share."""
        self.gains.append(gain)
        self.reached.append(reuse(top))
        ent, busiest = popularity(top, self.shape.n_expert)
        self.entropy.append(ent)
        self.busiest.append(busiest)
        self.top1.append(top1_share(logits, self.shape.n_expert_used))

    def gate_weights(self, logits: np.ndarray, top: np.ndarray) -> np.ndarray:
        """The picked experts' weights: softmax over all experts, top-k not renormalised (olmoe)."""
        pz = np.exp(logits - logits.max(-1, keepdims=True))
        pz /= pz.sum(-1, keepdims=True)
        return np.take_along_axis(pz, top, -1)

    def expert(self, t: dict[str, np.ndarray], p: str, e: int, x: np.ndarray, wtype: Q) -> np.ndarray:
        """Expert e's SwiGLU FFN on rows x."""
        a = x @ dequant(t[p + "ffn_gate_exps.weight"][e], wtype).T
        b = x @ dequant(t[p + "ffn_up_exps.weight"][e], wtype).T
        return (a / (1 + np.exp(-a)) * b) @ dequant(t[p + "ffn_down_exps.weight"][e], wtype).T


def tensor_plan(shape: BenchShape, wtype: Q):
    """[(name, numpy shape, type)] in file order."""
    D, E, F, V = shape.n_embd, shape.n_expert, shape.n_ff_exp, shape.vocab + synth.N_SPECIAL
    plan = [("token_embd.weight", (V, D), Q.Q8_0)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (D,), Q.F32),
            (p + "attn_q.weight", (D, D), wtype),
            (p + "attn_k.weight", (D, D), wtype),
            (p + "attn_v.weight", (D, D), wtype),
            (p + "attn_output.weight", (D, D), wtype),
            (p + "attn_q_norm.weight", (D,), Q.F32),
            (p + "attn_k_norm.weight", (D,), Q.F32),
            (p + "ffn_norm.weight", (D,), Q.F32),
            (p + "ffn_gate_inp.weight", (E, D), Q.F32),
            (p + "ffn_gate_exps.weight", (E, F, D), wtype),
            (p + "ffn_up_exps.weight", (E, F, D), wtype),
            (p + "ffn_down_exps.weight", (E, D, F), wtype),
        ]
    plan += [("output_norm.weight", (D,), Q.F32), ("output.weight", (V, D), Q.Q8_0)]
    return plan


def weight_std(name: str, shp: tuple[int, ...], n_embd: int) -> float:
    """Element std of a quantized weight: token rows 1, output logits ~3, the rest 1/sqrt(fan-in)."""
    if name == "token_embd.weight":
        return 1.0
    if name == "output.weight":
        return 3.0 / np.sqrt(n_embd)
    return 1.0 / np.sqrt(shp[-1])


def make_tensor(rng: np.random.Generator, name: str, shp: tuple[int, ...], qt: Q, shape: BenchShape) -> np.ndarray:
    """One tensor of the olmoe plan, drawn from rng: norms 1 +- 0.2, routers, quantized blocks."""
    if qt == Q.F32:
        if name.endswith("ffn_gate_inp.weight"):
            return make_router(rng, shape.n_embd, shape.n_expert)
        return (1.0 + 0.2 * rng.standard_normal(shp)).astype(np.float32)
    return quant_blocks(rng, shp, weight_std(name, shp, shape.n_embd), qt)


def add_hparams(w: gguf.GGUFWriter, shape: BenchShape, wtype: Q) -> None:
    """olmoe's model metadata."""
    w.add_name(f"edgemoe-bench-olmoe-{shape.n_layer}L")
    w.add_file_type(2 if wtype == Q.Q4_0 else 7)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff_exp)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)


@dataclass(frozen=True)
class ModelKind:
    """What write_bench_model needs of an architecture (olmoe here, gpt-oss in bench_gpt_oss)."""

    tensor_plan: Callable  # (shape, wtype) -> [(name, numpy shape, type)] in file order
    make_tensor: Callable  # (rng, name, numpy shape, type, shape) -> float32 or quantized uint8 data
    calibration: type  # Calibration or a subclass
    add_hparams: Callable  # (writer, shape, wtype): the model's metadata


OLMOE = ModelKind(tensor_plan, make_tensor, Calibration, add_hparams)


def _gpt_oss():
    """tools/bench_gpt_oss.py, loaded on first use: it builds on this module, which it imports as
    make_bench_model (so this file registers itself under that name when it runs as a script)."""
    sys.modules.setdefault("make_bench_model", sys.modules[__name__])
    if "bench_gpt_oss" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpt_oss", Path(__file__).with_name("bench_gpt_oss.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpt_oss"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules["bench_gpt_oss"]


def model_kind(shape: BenchShape) -> ModelKind:
    return _gpt_oss().KIND if shape.arch == "gpt-oss" else OLMOE


def _nbytes(shp, qt: Q) -> int:
    blk, bsize = gguf.GGML_QUANT_SIZES[qt]
    return int(np.prod(shp)) // blk * bsize


def write_bench_model(
    shape: BenchShape, out: Path, wtype: Q = Q.Q4_0, seed: int = 0, log=print, calibrate: bool = True
) -> Path:
    """Write the model: first a calibration pass (generate each layer, run the calibration tokens
    through it, choose its attention gain and router), then the file, every tensor generated again
    from its own seed (its index in the file) so both passes see the same weights. calibrate=False:
    no calibration pass (attention gains 1, routing as the random weights give it; for tests that
    need a large file fast, not for benchmark figures). wtype: the experts' type (and olmoe's
    attention's)."""
    kind = model_kind(shape)
    plan = kind.tensor_plan(shape, wtype)
    index = {name: i for i, (name, _, _) in enumerate(plan)}

    def make(name, shp, qt):
        return kind.make_tensor(np.random.default_rng([seed, index[name]]), name, shp, qt, shape)

    t0 = time.time()
    cal = kind.calibration(shape, seed)
    if calibrate:
        routers = calibrate_layers(cal, plan, make, wtype, log, t0)
    else:
        cal.gains, routers = [1.0] * shape.n_layer, {}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, shape.arch)
        kind.add_hparams(w, shape, wtype)
        if calibrate:
            add_calibration(w, cal)
        synth.add_tokenizer(w, shape.vocab)
        _write_tensors(w, plan, make, cal.gains, routers, log, t0)
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def calibrate_layers(cal: Calibration, plan, make, wtype: Q, log, t0: float) -> dict[str, np.ndarray]:
    """The calibration pass, one layer in memory at a time; returns the calibrated routers' tensors
    ({name: data}; the attention gains are in cal.gains)."""
    cal.embed(make(*plan[0]))
    routers: dict[str, np.ndarray] = {}
    for i in range(cal.shape.n_layer):
        p = f"blk.{i}."
        t = {name: make(name, shp, qt) for name, shp, qt in plan if name.startswith(p)}
        att = cal.attention(t, p, wtype)
        gain, router = cal.choose_routing(att, t[p + cal.FFN_NORM], cal.router_of(t, p), i)
        new = cal.router_tensors(p, router)
        t.update(new)
        routers.update(new)
        cal.moe(t, p, wtype, gain, att)
        tg = cal.targets
        log(
            f"  layer {i}: attention gain {gain:.3f}, reuse {cal.reached[-1]:.3f} (target {tg.reuse[i]:.3f}); "
            f"router skew {cal.skews[-1]:.2f}, popularity entropy {cal.entropy[-1]:.3f} of uniform (target "
            f"{tg.entropy[i]:.3f}), busiest expert {cal.busiest[-1]:.2f}x uniform; router scale "
            f"{cal.scales[-1]:.2f}, first expert's share {cal.top1[-1]:.3f} (target {tg.top1[i]:.3f}); "
            f"{time.time() - t0:.0f} s"
        )
    return routers


def add_calibration(w: gguf.GGUFWriter, cal: Calibration) -> None:
    """The routing targets, the knobs chosen and what they reached (edgemoe.devices.bench.*, which
    `edgemoe bench` reads)."""
    tg = cal.targets
    w.add_string("edgemoe.devices.bench.routing_source", tg.source)
    for key, target, reached in (
        ("reuse", tg.reuse, cal.reached),
        ("entropy", tg.entropy, cal.entropy),
        ("top1", tg.top1, cal.top1),
    ):
        w.add_array(f"edgemoe.devices.bench.{key}_target", [float(x) for x in target])
        w.add_array(f"edgemoe.devices.bench.{key}_calibrated", [float(x) for x in reached])
    w.add_array("edgemoe.devices.bench.attn_gain", cal.gains)
    w.add_array("edgemoe.devices.bench.router_skew", cal.skews)
    w.add_array("edgemoe.devices.bench.router_scale", cal.scales)


def _write_tensors(w: gguf.GGUFWriter, plan, make, gains: list[float], routers: dict, log, t0: float) -> None:
    """Tensor infos, then each tensor generated again (one at a time), with its layer's attention
    gain on the attention output (weight and bias) and the calibrated routers in place."""
    for name, shp, qt in plan:
        if qt == Q.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            byte_shape = (*shp[:-1], _nbytes((shp[-1],), qt))
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shp, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done, total = 0, sum(_nbytes(s, q) if q != Q.F32 else 4 * int(np.prod(s)) for _, s, q in plan)
    for name, shp, qt in plan:
        data = routers.get(name)
        if data is None:
            data = make(name, shp, qt)
        if ".attn_output." in name:
            g = gains[int(name.split(".")[1])]
            data = (data * np.float32(g)).astype(np.float32) if qt == Q.F32 else scale_blocks(data, qt, g)
        w.write_tensor_data(data)
        done += data.nbytes
        if name.endswith("ffn_down_exps.weight"):
            log(f"  {name}: {done / 1e9:.2f}/{total / 1e9:.2f} GB, {time.time() - t0:.1f} s")


def check_llama_cpp(path: Path, n_threads: int = 2, n_gen: int = 16) -> dict:
    """Load with llama.cpp, prompt 32 tokens, greedy-decode n_gen; load time and tok/s."""

    t0 = time.time()
    # logits_all: llama-cpp-python 0.3.36 leaves llm.scores empty for the last token otherwise
    llm = llama_ref.llama(path, n_ctx=256, n_threads=n_threads, n_threads_batch=n_threads, logits_all=True)
    load_s = time.time() - t0
    prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 4)[:32]
    t1 = time.time()
    llm.eval(prompt)
    prompt_s = time.time() - t1
    toks, t2 = [], time.time()
    for _ in range(n_gen):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(tok)
        llm.eval([tok])
    gen_s = time.time() - t2
    logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return dict(
        load_s=round(load_s, 2),
        prompt_tok_s=round(len(prompt) / prompt_s, 2),
        decode_tok_s=round(n_gen / gen_s, 2),
        n_prompt=len(prompt),
        n_gen=n_gen,
        distinct_generated=len(set(toks)),
        logit_std=round(float(logits.std()), 2),
        finite=bool(np.isfinite(logits).all()),
    )


def _rms(x: np.ndarray, w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _neox_rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
    ang = pos[:, None, None] * inv[None, None, :]  # (T, 1, hd/2)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * c - b * s, a * s + b * c], -1)


def main(argv: list[str] | None = None) -> int:
    shapes = {**SHAPES, **_gpt_oss().SHAPES}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(shapes), default="olmoe-small")
    ap.add_argument(
        "--type",
        choices=["Q4_0", "Q8_0", *REQUANTIZED, "MXFP4"],
        default=None,
        help="olmoe shapes: Q4_0 (the default) or Q8_0, written directly; Q4_K_M, Q5_K_M, Q6_K: the Q4_0 file "
        "(written first if missing) requantized by llama.cpp's own quantizer (llama_model_quantize), with its "
        "per-tensor type choices. gpt-oss-20b: MXFP4 (the default and only type; experts MXFP4, the rest Q8_0/F32)",
    )
    ap.add_argument("--out", type=Path, default=None, help=f"output file (default {DEFAULT_DIR}/<shape>-<type>.gguf)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocab size (normal tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    ap.add_argument("--check", action="store_true", help="load in llama.cpp, time decode")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="llama.cpp threads for --check (on a busy shared box, OpenMP spin "
        "barriers "
        "make 2 threads far slower than 1: compare both)",
    )
    args = ap.parse_args(argv)

    shape = shapes[args.shape]
    gpt_oss = shape.arch == "gpt-oss"
    args.type = args.type or ("MXFP4" if gpt_oss else "Q4_0")
    if gpt_oss != (args.type == "MXFP4"):
        ap.error(
            f"--type {args.type} does not go with --shape {args.shape}: "
            + ("gpt-oss-20b is written with MXFP4 experts only" if gpt_oss else "MXFP4 is for --shape gpt-oss-20b")
        )
    kw = {}
    if args.layers:
        kw["n_layer"] = args.layers
    if args.vocab:
        kw["vocab"] = args.vocab
    shape = dataclasses.replace(shape, **kw)
    out = args.out or DEFAULT_DIR / f"{args.shape}-{args.type}.gguf"
    if out.exists() and not args.force:
        print(f"{out} exists (use --force to rewrite)")
    elif args.type in REQUANTIZED:
        base = out.with_name(f"{args.shape}-Q4_0.gguf")
        if not base.exists():
            write_bench_model(shape, base, Q.Q4_0, args.seed)
        t0 = time.time()
        types = synth.quantize_model(base, out, args.type, nthread=args.threads, requantize=True)
        print(f"wrote {out}: {out.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.1f} s from {base.name}")
        print(f"expert types: {synth.summarize_types(types)}")
    else:
        t0 = time.time()
        write_bench_model(shape, out, Q[args.type], args.seed)
        print(f"wrote {out}: {out.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.1f} s")
    if args.check:
        print(check_llama_cpp(out, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
