"""The forward pass: per layer attend -> route -> fetch experts -> combine, as llama.cpp does it.

Shapes: T = tokens in this batch, S = tokens in the KV cache after this batch, D = n_embd,
H = query heads, Hk = KV heads, G = H // Hk, Dh = head size, E = experts, K = experts used per token,
F = expert FFN width, V = vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import kernels
from .config import ModelArgs
from .gguf_file import GGUFFile, Tensor
from .errors import EdgeMoEError


def _vec(t: Tensor | None) -> np.ndarray | None:
    """Small 1-D tensors (norm weights, biases) as float32 arrays."""
    if t is None:
        return None
    if t.qtype.name == "F32":
        return np.asarray(t.data, dtype=np.float32).reshape(-1)
    if t.qtype.name == "F16":
        return np.asarray(t.data, dtype=np.float32).reshape(-1)
    w = kernels.QWeight(t.data.reshape(1, -1), t.qtype, int(np.prod(t.shape)), t.name)
    return kernels.dequantize_rows(w, np.array([0]))[0]


def _mat(t: Tensor | None) -> kernels.QWeight | None:
    """A 2-D weight [n_out, n_in] as a zero-copy quantized view."""
    if t is None:
        return None
    n_in = t.shape[0]
    data = t.data.reshape(-1, t.data.shape[-1])
    return kernels.QWeight(data, t.qtype, n_in, t.name)


def _experts(t: Tensor) -> list[kernels.QWeight]:
    """A stacked 3-D expert tensor (GGUF shape [n_in, n_out, E]) as one view per expert."""
    n_in = t.shape[0]
    return [kernels.QWeight(t.data[e], t.qtype, n_in, f"{t.name}[{e}]") for e in range(t.shape[2])]


@dataclass
class Layer:
    attn_norm: np.ndarray
    attn_norm_b: np.ndarray | None
    wq: kernels.QWeight
    wk: kernels.QWeight
    wv: kernels.QWeight
    wo: kernels.QWeight
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    bo: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    ffn_norm: np.ndarray
    ffn_norm_b: np.ndarray | None
    router: np.ndarray  # [E, D] float32
    gate_exps: list[kernels.QWeight]
    up_exps: list[kernels.QWeight]
    down_exps: list[kernels.QWeight]
    gate_shexp: kernels.QWeight | None
    up_shexp: kernels.QWeight | None
    down_shexp: kernels.QWeight | None
    gate_inp_shexp: np.ndarray | None  # [D]
    rope_freqs: np.ndarray | None


class KVCache:
    """Per-layer K and V for up to n_ctx positions. np.zeros is lazily backed: untouched pages
    cost no memory, so RSS grows with the context actually used."""

    def __init__(self, args: ModelArgs, n_ctx: int, dtype: str = "f16"):
        if dtype not in ("f16", "f32"):
            raise EdgeMoEError(f"kv cache type {dtype!r} is not one of f16, f32")
        npdt = np.float16 if dtype == "f16" else np.float32
        self.n_ctx = n_ctx
        self.k = np.zeros((args.n_layer, n_ctx, args.n_head_kv, args.head_dim), dtype=npdt)
        self.v = np.zeros((args.n_layer, n_ctx, args.n_head_kv, args.head_dim_v), dtype=npdt)
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def reset(self) -> None:
        self.n_past = 0


class Engine:
    def __init__(self, gf: GGUFFile, args: ModelArgs):
        self.args = args
        self.file = gf
        for name, t in gf.tensors.items():
            if not kernels.supported(t.qtype):
                raise EdgeMoEError(
                    f"{gf.path}: tensor {name} has weight type {t.qtype.name}, which edgemoe cannot read"
                )
        self.tok_embd = _mat(gf.tensor("token_embd.weight"))
        self.output_norm = _vec(gf.tensor("output_norm.weight"))
        self.output_norm_b = _vec(gf.maybe("output_norm.bias"))
        out = gf.maybe("output.weight") or gf.tensor("token_embd.weight")
        self.output = _mat(out)
        self.output_b = _vec(gf.maybe("output.bias"))
        n_ctx_orig = args.rope_n_ctx_orig
        self._rope_long = _vec(gf.maybe("rope_factors_long.weight"))
        self._rope_short = _vec(gf.maybe("rope_factors_short.weight"))
        self.n_ctx_orig = n_ctx_orig
        self.layers = [self._load_layer(i) for i in range(args.n_layer)]

    def _load_layer(self, i: int) -> Layer:
        gf = self.file
        p = f"blk.{i}."
        t = gf.tensor
        m = gf.maybe
        return Layer(
            attn_norm=_vec(t(p + "attn_norm.weight")),
            attn_norm_b=_vec(m(p + "attn_norm.bias")),
            wq=_mat(t(p + "attn_q.weight")),
            wk=_mat(t(p + "attn_k.weight")),
            wv=_mat(t(p + "attn_v.weight")),
            wo=_mat(t(p + "attn_output.weight")),
            bq=_vec(m(p + "attn_q.bias")),
            bk=_vec(m(p + "attn_k.bias")),
            bv=_vec(m(p + "attn_v.bias")),
            bo=_vec(m(p + "attn_output.bias")),
            q_norm=_vec(m(p + "attn_q_norm.weight")),
            k_norm=_vec(m(p + "attn_k_norm.weight")),
            ffn_norm=_vec(t(p + "ffn_norm.weight")),
            ffn_norm_b=_vec(m(p + "ffn_norm.bias")),
            router=_router(t(p + "ffn_gate_inp.weight")),
            gate_exps=_experts(t(p + "ffn_gate_exps.weight")),
            up_exps=_experts(t(p + "ffn_up_exps.weight")),
            down_exps=_experts(t(p + "ffn_down_exps.weight")),
            gate_shexp=_mat(m(p + "ffn_gate_shexp.weight")),
            up_shexp=_mat(m(p + "ffn_up_shexp.weight")),
            down_shexp=_mat(m(p + "ffn_down_shexp.weight")),
            gate_inp_shexp=_vec(m(p + "ffn_gate_inp_shexp.weight")),
            rope_freqs=_vec(m(p + "rope_freqs.weight")),
        )

    # ---- pieces -------------------------------------------------------------------------------

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """RMSNorm, plus a bias where the model has one (phimoe: llama.cpp does not subtract the mean)."""
        y = _rms(x, w, self.args.norm_eps)
        return y + b if b is not None else y

    def _rope_cache(self, pos: np.ndarray, freq_factors: np.ndarray | None, n_ctx: int):
        """cos/sin [T, n_rot/2] for these positions, as ggml's rope (with yarn and freq factors)."""
        a = self.args
        n_dims = a.n_rot
        half = np.arange(0, n_dims, 2, dtype=np.float64)  # i0
        inv = a.rope_theta ** (-half / n_dims)
        if freq_factors is not None:
            inv = inv / freq_factors[: n_dims // 2]
        theta_extrap = pos[:, None].astype(np.float64) * inv[None, :]
        fs = a.rope_freq_scale
        mscale = a.rope_attn_factor
        theta = theta_extrap * fs
        if a.rope_scaling == "yarn":
            def corr_dim(n_rot: float) -> float:
                return n_dims * np.log(a.rope_n_ctx_orig / (n_rot * 2 * np.pi)) / (2 * np.log(a.rope_theta))

            low = max(0.0, np.floor(corr_dim(a.yarn_beta_fast)))
            high = min(n_dims - 1.0, np.ceil(corr_dim(a.yarn_beta_slow)))
            y = (half / 2 - low) / max(0.001, high - low)
            ramp = 1 - np.minimum(1, np.maximum(0, y))
            theta = theta * (1 - ramp) + theta_extrap * ramp
            mscale *= 1.0 + 0.1 * np.log(1.0 / fs)
        return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)

    def _apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x [T, H, Dh]; rotates the first n_rot dims."""
        n = self.args.n_rot
        c = cos[:, None, :]
        s = sin[:, None, :]
        out = x.copy()
        if self.args.rope_type == "neox":
            x0, x1 = x[..., : n // 2], x[..., n // 2 : n]
            out[..., : n // 2] = x0 * c - x1 * s
            out[..., n // 2 : n] = x0 * s + x1 * c
        else:
            x0, x1 = x[..., 0:n:2], x[..., 1:n:2]
            out[..., 0:n:2] = x0 * c - x1 * s
            out[..., 1:n:2] = x0 * s + x1 * c
        return out

    def _layer_freq_factors(self, layer: Layer, n_ctx: int) -> np.ndarray | None:
        if layer.rope_freqs is not None:
            return layer.rope_freqs
        if self._rope_long is None:
            return None
        return self._rope_long if n_ctx > self.n_ctx_orig else self._rope_short

    def attention(self, i: int, layer: Layer, h: np.ndarray, cache: KVCache, pos: np.ndarray) -> np.ndarray:
        a = self.args
        T = h.shape[0]
        q = kernels.matmul(layer.wq, h)  # [T, H*Dh]
        k = kernels.matmul(layer.wk, h)  # [T, Hk*Dh]
        v = kernels.matmul(layer.wv, h)  # [T, Hk*Dhv]
        if layer.bq is not None:
            q += layer.bq
        if layer.bk is not None:
            k += layer.bk
        if layer.bv is not None:
            v += layer.bv
        if layer.q_norm is not None and layer.q_norm.size == q.shape[1]:  # olmoe: full width
            q = _rms(q, layer.q_norm, a.norm_eps)
            k = _rms(k, layer.k_norm, a.norm_eps)
        q = q.reshape(T, a.n_head, a.head_dim)
        k = k.reshape(T, a.n_head_kv, a.head_dim)
        v = v.reshape(T, a.n_head_kv, a.head_dim_v)
        if layer.q_norm is not None and layer.q_norm.size == a.head_dim:  # qwen3: per head
            q = _rms(q, layer.q_norm, a.norm_eps)
            k = _rms(k, layer.k_norm, a.norm_eps)
        cos, sin = self._rope_cache(pos, self._layer_freq_factors(layer, cache.n_ctx), cache.n_ctx)
        q = self._apply_rope(q, cos, sin)
        k = self._apply_rope(k, cos, sin)

        p0 = cache.n_past
        S = p0 + T
        cache.k[i, p0:S] = k
        cache.v[i, p0:S] = v
        K = cache.k[i, :S].astype(np.float32)  # [S, Hk, Dh]
        Vv = cache.v[i, :S].astype(np.float32)  # [S, Hk, Dhv]
        G = a.n_gqa
        qg = q.reshape(T, a.n_head_kv, G, a.head_dim).transpose(1, 2, 0, 3)  # [Hk, G, T, Dh]
        scores = np.matmul(qg, K.transpose(1, 2, 0)[:, None]) * np.float32(a.attn_scale)  # [Hk,G,T,S]
        if T > 1:
            mask = np.arange(S)[None, :] > (p0 + np.arange(T))[:, None]  # [T, S]
            scores = np.where(mask, np.float32(-np.inf), scores)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, Vv.transpose(1, 0, 2)[:, None])  # [Hk, G, T, Dhv]
        out = out.transpose(2, 0, 1, 3).reshape(T, a.n_head * a.head_dim_v)
        o = kernels.matmul(layer.wo, np.ascontiguousarray(out, dtype=np.float32))
        if layer.bo is not None:
            o += layer.bo
        return o

    def route(self, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts [T, K] and their gate weights [T, K], as llama.cpp's build_moe_ffn."""
        a = self.args
        logits = h @ layer.router.T  # [T, E]
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : a.n_expert_used]  # [T, K]
        w = np.take_along_axis(probs, top, axis=-1)
        if a.norm_topk:
            w = w / w.sum(axis=-1, keepdims=True)
        return top, w.astype(np.float32)

    def experts(self, i: int, layer: Layer, h: np.ndarray, top: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.zeros_like(h)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            x = np.ascontiguousarray(h[rows])
            y = _swiglu_ffn(layer.gate_exps[e], layer.up_exps[e], layer.down_exps[e], x)
            out[rows] += y * w[rows, slot][:, None]
        return out

    def moe(self, i: int, layer: Layer, h: np.ndarray) -> np.ndarray:
        top, w = self.route(layer, h)
        out = self.experts(i, layer, h, top, w)
        if layer.gate_shexp is not None:
            sh = _swiglu_ffn(layer.gate_shexp, layer.up_shexp, layer.down_shexp, h)
            if layer.gate_inp_shexp is not None:
                g = h @ layer.gate_inp_shexp  # [T]
                sh = sh * (1.0 / (1.0 + np.exp(-g)))[:, None]
            out += sh
        return out

    # ---- the whole pass -----------------------------------------------------------------------

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Run tokens [T] after the cache's n_past positions; returns logits [T, V] (or [1, V])."""
        # Our matrices are small; multi-threaded BLAS on them only fights the kernel threads
        # (measured: a 32x2048 @ 2048x64 product took 127 ms with 2 OpenBLAS threads on a busy
        # 2-core machine, 0.1 ms with one).
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._forward(tokens, cache, all_logits)

    def _forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64)
        T = tokens.shape[0]
        if T == 0:
            raise EdgeMoEError("no tokens to evaluate")
        if cache.n_past + T > cache.n_ctx:
            raise EdgeMoEError(
                f"context is full: {cache.n_past} + {T} tokens exceed n_ctx={cache.n_ctx}"
            )
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise EdgeMoEError(f"token id out of range 0..{a.n_vocab - 1}: {tokens.min()}..{tokens.max()}")
        pos = np.arange(cache.n_past, cache.n_past + T)
        x = kernels.dequantize_rows(self.tok_embd, tokens)  # [T, D]
        if a.embedding_scale != 1.0:
            x *= np.float32(a.embedding_scale)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm, layer.attn_norm_b)
            att = self.attention(i, layer, h, cache, pos)
            x = x + att * np.float32(a.residual_scale) if a.residual_scale != 1.0 else x + att
            h = self._norm(x, layer.ffn_norm, layer.ffn_norm_b)
            m = self.moe(i, layer, h)
            x = x + m * np.float32(a.residual_scale) if a.residual_scale != 1.0 else x + m
        cache.n_past += T
        if not all_logits:
            x = x[-1:]
        h = self._norm(x, self.output_norm, self.output_norm_b)
        logits = kernels.matmul(self.output, np.ascontiguousarray(h))
        if self.output_b is not None:
            logits += self.output_b
        if a.logit_scale != 1.0:
            logits /= np.float32(a.logit_scale)
        return logits


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w).astype(np.float32, copy=False)


def _swiglu_ffn(gate: kernels.QWeight, up: kernels.QWeight, down: kernels.QWeight, x: np.ndarray) -> np.ndarray:
    g = kernels.matmul(gate, x)  # [T, F]
    u = kernels.matmul(up, x)  # [T, F]
    hdn = g / (1.0 + np.exp(-g)) * u
    return kernels.matmul(down, np.ascontiguousarray(hdn, dtype=np.float32))  # [T, D]


def _router(t: Tensor) -> np.ndarray:
    w = _mat(t)
    return kernels.dequantize_rows(w, np.arange(w.shape[0]))
