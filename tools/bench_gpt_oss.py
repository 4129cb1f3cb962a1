"""gpt-oss-shaped benchmark models for tools/make_bench_model.py (`--shape gpt-oss-20b --type MXFP4`).

The file is what llama.cpp reads as architecture "gpt-oss" (src/models/openai-moe.cpp), with the
shape of gpt-oss-20b: 24 layers, hidden 2880, 64 query and 8 KV heads of 64, sliding-window
attention (128) on every other layer (llama.cpp's pattern for gpt-oss: layers 0, 2, 4, ...),
attention sinks, biases on q/k/v/o, a router with a bias, 32 experts of width 2880 with biases,
top-4, gpt-oss's clamped SwiGLU (alpha 1.702, limit 7: hard-coded in llama.cpp), yarn rope as in
the released files (base 150000, factor 32 over an original context of 4096), vocab 201088.
Experts are MXFP4 (as released), generated directly as random blocks (random FP4 codes, E8M0
exponents for the intended element std), never as floats; attention, token_embd and output Q8_0;
norms, biases, sinks and routers F32.

Routing is calibrated as make_bench_model's olmoe (see its docstring), on a float numpy forward pass
of this graph (GptOssCalibration). gpt-oss routes by the top-k of router logits plus a bias, then a
softmax over those k: the popularity knob (the "router skew") is that bias itself, skew * |row| * z_e
(z: skew_vector), where olmoe, without one, adds the term to the router rows along the hidden states'
common direction; the router scale multiplies rows and bias (no pick changes, the top-k softmax
sharpens); the attention gain multiplies W_o and its bias.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import make_bench_model as mb
except ImportError:  # loaded by file path, tools/ not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_bench_model as mb

from edgemoe.runtime.experts import swiglu_oai  # noqa: E402 (the engine's gpt-oss activation)

Q = mb.Q
ATTN_TYPE = Q.Q8_0  # attention weights (token_embd and output: Q8_0 too, as the olmoe writer)
BIAS_STD = 0.1  # q/k/v/o and expert biases (the router's starts at 0: calibration sets it)
FILE_TYPE = {Q.MXFP4: 38, Q.Q8_0: 7, Q.Q4_0: 2}  # llama_ftype (38: MOSTLY_MXFP4_MOE)
CHUNK_ROWS = 16384  # token_embd and output (201088 rows) are generated this many rows at a time

# MXFP4 block: 1 byte E8M0 exponent e, then 16 bytes of 32 E2M1 nibbles; an element is
# code_value * 2^(e - 128) with gguf's doubled E2M1 code values (gguf.quants.MXFP4.kvalues).
_MXFP4_UNIT = float(np.sqrt(np.mean(np.square(mb.gguf.quants.MXFP4.kvalues))))  # std of a uniform code


@dataclass(frozen=True)
class GptOssShape(mb.BenchShape):
    arch: str = "gpt-oss"
    n_head_kv: int = 8
    head_dim: int = 64
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0  # yarn
    rope_orig_ctx: int = 4096


SHAPES = {
    # gpt-oss-20b; vocab: 201088 token rows in all, as the released file (N_SPECIAL of them control tokens)
    "gpt-oss-20b": GptOssShape(
        n_layer=24,
        n_embd=2880,
        n_head=64,
        n_expert=32,
        n_expert_used=4,
        n_ff_exp=2880,
        vocab=201088 - mb.synth.N_SPECIAL,
        n_ctx_train=131072,
    ),
}


def tensor_plan(shape: GptOssShape, wtype: Q):
    """[(name, numpy shape, type)] in file order; wtype: the experts' type."""
    D, E, F, V = shape.n_embd, shape.n_expert, shape.n_ff_exp, shape.vocab + mb.synth.N_SPECIAL
    qd, kvd = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    plan = [("token_embd.weight", (V, D), Q.Q8_0)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (D,), Q.F32)]
        for n, rows in (("q", qd), ("k", kvd), ("v", kvd)):
            plan += [(p + f"attn_{n}.weight", (rows, D), ATTN_TYPE), (p + f"attn_{n}.bias", (rows,), Q.F32)]
        plan += [
            (p + "attn_output.weight", (D, qd), ATTN_TYPE),
            (p + "attn_output.bias", (D,), Q.F32),
            (p + "attn_sinks.weight", (shape.n_head,), Q.F32),
            (p + "post_attention_norm.weight", (D,), Q.F32),
            (p + "ffn_gate_inp.weight", (E, D), Q.F32),
            (p + "ffn_gate_inp.bias", (E,), Q.F32),
            (p + "ffn_gate_exps.weight", (E, F, D), wtype),
            (p + "ffn_gate_exps.bias", (E, F), Q.F32),
            (p + "ffn_up_exps.weight", (E, F, D), wtype),
            (p + "ffn_up_exps.bias", (E, F), Q.F32),
            (p + "ffn_down_exps.weight", (E, D, F), wtype),
            (p + "ffn_down_exps.bias", (E, D), Q.F32),
        ]
    plan += [("output_norm.weight", (D,), Q.F32), ("output.weight", (V, D), Q.Q8_0)]
    return plan


def mxfp4_blocks(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Random MXFP4 data for a float tensor of numpy `shape`, element std ~`std`, zero mean: uniform
    random nibbles (the code values are symmetric about 0) and per block the exponent
    128 + log2(std / unit), rounded down or up at random with the odds that make the expected
    square std^2. Returns uint8 of shape (*shape[:-1], row_bytes)."""
    blk, bsize = mb.gguf.GGML_QUANT_SIZES[Q.MXFP4]
    nb = int(np.prod(shape)) // blk
    out = np.empty((nb, bsize), np.uint8)
    e = 128 + np.log2(std / _MXFP4_UNIT)
    lo = np.floor(e)
    p_up = (4.0 ** (e - lo) - 1) / 3  # P(lo + 1): (1 - p) 4^lo + p 4^(lo + 1) = 4^e
    out[:, 0] = np.clip(lo + (rng.random(nb, dtype=np.float32) < p_up), 2, 254)
    out[:, 1:] = np.frombuffer(rng.bytes(nb * (bsize - 1)), np.uint8).reshape(nb, bsize - 1)
    return out.reshape(*shape[:-1], shape[-1] // blk * bsize)


def make_tensor(rng: np.random.Generator, name: str, shp: tuple[int, ...], qt: Q, shape: GptOssShape) -> np.ndarray:
    """One tensor of the plan, drawn from rng: as the olmoe writer's (norms, router rows, Q8_0/Q4_0
    blocks), MXFP4 blocks, sinks ~ N(0, 1), biases ~ N(0, BIAS_STD^2), the router bias 0."""
    if qt == Q.MXFP4:
        return mxfp4_blocks(rng, shp, mb.weight_std(name, shp, shape.n_embd))
    if qt != Q.F32 and len(shp) == 2 and shp[0] > CHUNK_ROWS:
        return _chunked_blocks(rng, shp, mb.weight_std(name, shp, shape.n_embd), qt)
    if qt != Q.F32 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
        return mb.make_tensor(rng, name, shp, qt, shape)
    if name.endswith("ffn_gate_inp.bias"):
        return np.zeros(shp, np.float32)
    if name.endswith("attn_sinks.weight"):
        return rng.standard_normal(shp).astype(np.float32)
    return (BIAS_STD * rng.standard_normal(shp)).astype(np.float32)


def _chunked_blocks(rng: np.random.Generator, shp: tuple[int, int], std: float, qt: Q) -> np.ndarray:
    """mb.quant_blocks, CHUNK_ROWS rows at a time (its random bytes and scales are as large as the
    result: the vocab tables alone would take the writer past 1.9 GB)."""
    out = np.empty((shp[0], mb._nbytes((shp[1],), qt)), np.uint8)
    for r in range(0, shp[0], CHUNK_ROWS):
        rows = min(CHUNK_ROWS, shp[0] - r)
        out[r : r + rows] = mb.quant_blocks(rng, (rows, shp[1]), std, qt)
    return out


def add_hparams(w: mb.gguf.GGUFWriter, shape: GptOssShape, wtype: Q) -> None:
    """gpt-oss's model metadata (the keys of the released files and edgemoe.testing.synth)."""
    w.add_name(f"edgemoe-bench-gpt-oss-{shape.n_layer}L")
    w.add_file_type(FILE_TYPE[wtype])
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff_exp)
    w.add_expert_feed_forward_length(shape.n_ff_exp)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_scaling_type(mb.gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(shape.rope_scaling_factor)
    w.add_rope_scaling_orig_ctx_len(shape.rope_orig_ctx)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
    w.add_sliding_window(shape.sliding_window)


def yarn_cos_sin(shape: GptOssShape, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (positions, head_dim / 2) of the file's rope as ggml computes it with yarn
    (ext_factor 1, beta_fast 32, beta_slow 1, attn_factor 1): angles interpolated by 1/factor on the
    slow dimensions, kept on the fast ones, a ramp between; both scaled by 1 + 0.1 ln(factor)."""
    hd, base, fs = shape.head_dim, shape.rope_theta, 1.0 / shape.rope_scaling_factor
    i0 = np.arange(0, hd, 2, dtype=np.float64)
    extrap = pos[:, None] * base ** (-i0 / hd)[None, :]

    def corr_dim(n_rot: float) -> float:
        return hd * np.log(shape.rope_orig_ctx / (n_rot * 2 * np.pi)) / (2 * np.log(base))

    low, high = max(0.0, np.floor(corr_dim(32.0))), min(hd - 1.0, np.ceil(corr_dim(1.0)))
    ramp = 1 - np.clip((i0 / 2 - low) / max(0.001, high - low), 0, 1)
    theta = extrap * fs * (1 - ramp) + extrap * ramp
    mscale = 1.0 + 0.1 * np.log(1.0 / fs)
    return np.cos(theta) * mscale, np.sin(theta) * mscale


class GptOssCalibration(mb.Calibration):
    """The calibration forward pass of the gpt-oss graph: attention with q/k/v/o biases, yarn
    neox rope and sinks (one extra logit per head in the softmax denominator), no q/k norms, GQA;
    post-attention norm; routing by the top-k of x @ router.T + bias, softmax over the k; experts
    with their biases and gpt-oss's activation. CAL_POS is below the sliding window, so the
    sliding-window layers attend as the others here."""

    FFN_NORM = "post_attention_norm.weight"

    def __init__(self, shape: GptOssShape, seed: int, targets: mb.RoutingTargets | None = None):
        super().__init__(shape, seed, targets)
        assert mb.CAL_POS <= shape.sliding_window
        self.cos, self.sin = (a[None, :, None, :] for a in yarn_cos_sin(shape, self.pos))

    def rope(self, x: np.ndarray) -> np.ndarray:
        """neox rope of x (S, P, heads, head_dim) at the calibration positions."""
        a, b = np.split(x, 2, axis=-1)
        return np.concatenate([a * self.cos - b * self.sin, a * self.sin + b * self.cos], -1)

    def attention(self, t: dict[str, np.ndarray], p: str, wtype: Q) -> np.ndarray:
        """The layer's attention output (S, P, D), W_o's bias included, before the gain."""
        S, P, _ = self.h.shape
        H, KV, hd = self.shape.n_head, self.shape.n_head_kv, self.shape.head_dim
        x = mb._rms(self.h, t[p + "attn_norm.weight"])

        def proj(n, heads):
            y = x @ mb.dequant(t[p + f"attn_{n}.weight"], ATTN_TYPE).T + t[p + f"attn_{n}.bias"]
            return y.reshape(S, P, heads, hd)

        q = self.rope(proj("q", H)).reshape(S, P, KV, H // KV, hd)  # query head h reads KV head h // (H / KV)
        k, v = self.rope(proj("k", KV)), proj("v", KV)
        sc = np.einsum("stkgd,sukd->skgtu", q, k) / np.sqrt(hd)  # llama.cpp: 1/sqrt(n_rot), n_rot = head_dim
        sc = np.where(self.causal, sc, -np.inf)
        sink = t[p + "attn_sinks.weight"].reshape(KV, H // KV, 1, 1)
        m = np.maximum(sc.max(-1, keepdims=True), sink)
        pr = np.exp(sc - m)
        pr /= pr.sum(-1, keepdims=True) + np.exp(sink - m)
        mix = np.einsum("skgtu,sukd->stkgd", pr, v).reshape(S, P, H * hd)
        wo = mb.dequant(t[p + "attn_output.weight"], ATTN_TYPE)
        return (mix @ wo.T + t[p + "attn_output.bias"]).astype(np.float32)

    # ---- the router: (rows (E, D), bias (E,)) ----

    def router_of(self, t: dict[str, np.ndarray], p: str):
        return t[p + "ffn_gate_inp.weight"], t[p + "ffn_gate_inp.bias"]

    def router_tensors(self, p: str, router) -> dict[str, np.ndarray]:
        return {p + "ffn_gate_inp.weight": router[0], p + "ffn_gate_inp.bias": router[1]}

    @staticmethod
    def logits(x: np.ndarray, router) -> np.ndarray:
        return x @ router[0].T + router[1]

    @staticmethod
    def row_norm(router) -> float:
        return mb.Calibration.row_norm(router[0])

    @staticmethod
    def skewed(router, amount: float, z: np.ndarray, u: np.ndarray):
        """The router with amount * z_e added to expert e's bias (u, the common direction the olmoe
        writer needs for a bias in effect, is not needed)."""
        return router[0], (router[1] + amount * z).astype(np.float32)

    @staticmethod
    def scaled(router, scale: float):
        return (scale * router[0]).astype(np.float32), (scale * router[1]).astype(np.float32)

    def gate_weights(self, logits: np.ndarray, top: np.ndarray) -> np.ndarray:
        """softmax over the k picked logits (llama.cpp's SOFTMAX_WEIGHT gating)."""
        z = np.take_along_axis(logits, top, -1)
        w = np.exp(z - z[..., :1])
        return w / w.sum(-1, keepdims=True)

    def expert(self, t: dict[str, np.ndarray], p: str, e: int, x: np.ndarray, wtype: Q) -> np.ndarray:
        """Expert e on rows x: biased gate/up projections, swiglu_oai, biased down projection."""

        def proj(n, a):
            return a @ mb.dequant(t[p + f"ffn_{n}_exps.weight"][e], wtype).T + t[p + f"ffn_{n}_exps.bias"][e]

        return proj("down", swiglu_oai(proj("gate", x), proj("up", x)))


KIND = mb.ModelKind(tensor_plan, make_tensor, GptOssCalibration, add_hparams)
