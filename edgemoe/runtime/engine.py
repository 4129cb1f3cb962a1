"""The forward pass: per layer attend -> route -> fetch experts -> combine, as llama.cpp does it.

Shapes: T = tokens in this batch, S = tokens in the KV cache after this batch, D = n_embd,
H = query heads, Hk = KV heads, G = H // Hk, Dh = head size, E = experts, K = experts used per token,
F = expert FFN width, V = vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..models.gguf_file import GGUFFile
from ..quant import ggml_graph, kernels
from . import routing
from .experts import ExpertSource, GGUFExperts, swiglu_ffn
from .kvcache import KVCache
from .weights import mat, router_matrix, stacked_experts, vec

# Queries per attention call: bounds the attention scratch (scores over the whole context).
N_BATCH = 64
# Prompt tokens per forward pass, run layer by layer: every expert a layer's tokens chose is read
# (and computed for all of them) once per span, not once per batch of N_BATCH. Bounds the rest of
# the activation scratch (runtime/budget.scratch_bytes counts both).
N_SPAN = 512


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
    router: np.ndarray | None  # [E, D] float32 (None: dense FFN layer)
    gate_shexp: kernels.QWeight | None
    up_shexp: kernels.QWeight | None
    down_shexp: kernels.QWeight | None
    gate_inp_shexp: np.ndarray | None  # [D]
    rope_freqs: np.ndarray | None
    # deepseek2 MLA (absorbed form): q = wq x, or wq_b RMSNorm(wq_a x)
    wq_a: kernels.QWeight | None = None
    q_a_norm: np.ndarray | None = None
    wq_b: kernels.QWeight | None = None
    wkv_a: kernels.QWeight | None = None  # attn_kv_a_mqa: x -> [kv_lora | k_pe]
    kv_a_norm: np.ndarray | None = None
    wk_b: list[kernels.QWeight] | None = None  # per head [kv_lora, nope]: q_nope -> latent
    wv_b: list[kernels.QWeight] | None = None  # per head [v_head, kv_lora]: latent -> v
    # gpt-oss
    sinks: np.ndarray | None = None  # [H] attention sink logits
    router_b: np.ndarray | None = None  # [E] ffn_gate_inp.bias
    swa: bool = False  # sliding-window attention layer
    # deepseek-v3 style routing: bias added to the scores for selection only
    exp_probs_b: np.ndarray | None = None  # [E]
    # deepseek2 leading dense layers (router is None there)
    ffn_gate: kernels.QWeight | None = None
    ffn_up: kernels.QWeight | None = None
    ffn_down: kernels.QWeight | None = None

    @property
    def dense(self) -> bool:
        return self.ffn_gate is not None


class Engine:
    def __init__(self, gf: GGUFFile, args: ModelArgs, experts: ExpertSource | None = None):
        """experts: where expert FFNs come from (ffn(layer, expert, x, importance) -> y);
        default: the GGUF file itself."""
        self.args = args
        self.file = gf
        for name, t in gf.tensors.items():
            if not kernels.supported(t.qtype):
                raise EdgeMoEError(
                    f"{gf.path}: tensor {name} has weight type {t.qtype.name}, which edgemoe cannot read"
                )
        self.tok_embd = mat(gf.tensor("token_embd.weight"))
        self.output_norm = vec(gf.tensor("output_norm.weight"))
        self.output_norm_b = vec(gf.maybe("output_norm.bias"))
        out = gf.maybe("output.weight")
        # tied embeddings: token_embd's rows are read back, so it is never repacked
        self.output = mat(out, gf) if out is not None else mat(gf.tensor("token_embd.weight"))
        self.output_b = vec(gf.maybe("output.bias"))
        n_ctx_orig = args.rope_n_ctx_orig
        self._rope_long = vec(gf.maybe("rope_factors_long.weight"))
        self._rope_short = vec(gf.maybe("rope_factors_short.weight"))
        self.n_ctx_orig = n_ctx_orig
        self.layers = [self._load_layer(i) for i in range(args.n_layer)]
        self.expert_src: ExpertSource = experts if experts is not None else GGUFExperts(gf, args)
        self.trace: list[tuple[np.ndarray, np.ndarray]] | None = None  # when a list: (top, w) [T, K] of each layer call
        # when set: observe(layer, h [T, D], top [T, K], w [T, K]) before each MoE layer's experts run
        self.observe = None
        # the arch-specific attention of the layer step (routing: runtime/routing.py)
        self._attend = {"standard": self.attention, "mla": self.attention_mla}[args.attention]

    def _load_layer(self, i: int) -> Layer:
        gf = self.file
        a = self.args
        p = f"blk.{i}."
        t = gf.tensor
        m = gf.maybe
        mla = a.attention == "mla"
        dense = a.is_dense(i)
        return Layer(
            attn_norm=vec(t(p + "attn_norm.weight")),
            attn_norm_b=vec(m(p + "attn_norm.bias")),
            wq=mat(m(p + "attn_q.weight") if mla else t(p + "attn_q.weight"), gf),
            wk=None if mla else mat(t(p + "attn_k.weight"), gf),
            wv=None if mla else mat(t(p + "attn_v.weight"), gf),
            wo=mat(t(p + "attn_output.weight"), gf),
            bq=vec(m(p + "attn_q.bias")),
            bk=vec(m(p + "attn_k.bias")),
            bv=vec(m(p + "attn_v.bias")),
            bo=vec(m(p + "attn_output.bias")),
            q_norm=vec(m(p + "attn_q_norm.weight")),
            k_norm=vec(m(p + "attn_k_norm.weight")),
            # gpt-oss names its pre-FFN norm post_attention_norm
            ffn_norm=vec(m(p + "ffn_norm.weight") or t(p + "post_attention_norm.weight")),
            ffn_norm_b=vec(m(p + "ffn_norm.bias")),
            router=None if dense else router_matrix(t(p + "ffn_gate_inp.weight")),
            gate_shexp=mat(m(p + "ffn_gate_shexp.weight"), gf),
            up_shexp=mat(m(p + "ffn_up_shexp.weight"), gf),
            down_shexp=mat(m(p + "ffn_down_shexp.weight"), gf),
            gate_inp_shexp=vec(m(p + "ffn_gate_inp_shexp.weight")),
            rope_freqs=vec(m(p + "rope_freqs.weight")),
            wq_a=mat(m(p + "attn_q_a.weight"), gf),
            q_a_norm=vec(m(p + "attn_q_a_norm.weight")),
            wq_b=mat(m(p + "attn_q_b.weight"), gf),
            wkv_a=mat(t(p + "attn_kv_a_mqa.weight"), gf) if mla else None,
            kv_a_norm=vec(t(p + "attn_kv_a_norm.weight")) if mla else None,
            wk_b=stacked_experts(t(p + "attn_k_b.weight")) if mla else None,
            wv_b=stacked_experts(t(p + "attn_v_b.weight")) if mla else None,
            sinks=vec(m(p + "attn_sinks.weight")),
            router_b=vec(m(p + "ffn_gate_inp.bias")),
            swa=a.is_swa(i),
            exp_probs_b=vec(m(p + "exp_probs_b.bias")),
            ffn_gate=mat(t(p + "ffn_gate.weight"), gf) if dense else None,
            ffn_up=mat(t(p + "ffn_up.weight"), gf) if dense else None,
            ffn_down=mat(t(p + "ffn_down.weight"), gf) if dense else None,
        )

    # ---- pieces -------------------------------------------------------------------------------

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """RMSNorm, plus a bias where the model has one (phimoe: llama.cpp does not subtract the mean)."""
        y = _rms(x, w, self.args.norm_eps)
        return y + b if b is not None else y

    def _rope_cache(
        self, pos: np.ndarray, freq_factors: np.ndarray | None, n_ctx: int, theta_base: float | None = None
    ):
        """cos/sin [T, n_rot/2] for these positions, as ggml's rope (with yarn and freq factors)."""
        a = self.args
        n_dims = a.n_rot
        base = theta_base or a.rope_theta
        half = np.arange(0, n_dims, 2, dtype=np.float64)  # i0
        inv = base ** (-half / n_dims)
        if freq_factors is not None:
            inv = inv / freq_factors[: n_dims // 2]
        theta_extrap = pos[:, None].astype(np.float64) * inv[None, :]
        fs = a.rope_freq_scale
        mscale = a.rope_attn_factor
        theta = theta_extrap * fs
        if a.rope_scaling == "yarn":

            def corr_dim(n_rot: float) -> float:
                return n_dims * np.log(a.rope_n_ctx_orig / (n_rot * 2 * np.pi)) / (2 * np.log(base))

            low = max(0.0, np.floor(corr_dim(a.yarn_beta_fast)))
            high = min(n_dims - 1.0, np.ceil(corr_dim(a.yarn_beta_slow)))
            y = (half / 2 - low) / max(0.001, high - low)
            ramp = 1 - np.minimum(1, np.maximum(0, y))
            theta = theta * (1 - ramp) + theta_extrap * ramp
            mscale *= 1.0 + 0.1 * np.log(1.0 / fs)
        return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)

    def _layer_freq_factors(self, layer: Layer, n_ctx: int) -> np.ndarray | None:
        if layer.rope_freqs is not None:
            return layer.rope_freqs
        if self._rope_long is None:
            return None
        return self._rope_long if n_ctx > self.n_ctx_orig else self._rope_short

    def _apply_rope(self, layer: Layer, x: np.ndarray, pos: np.ndarray, n_ctx: int) -> np.ndarray:
        """x [T, H, Dh] with the first n_rot dims of each head rotated for positions pos [T], by
        ggml's own ggml_rope_ext where its kernels are loaded (its float32 theta recurrence and
        libm sin/cos are llama.cpp's to the bit), else in numpy (equal to ~1e-6)."""
        a = self.args
        base = (a.rope_theta_swa if layer.swa else None) or a.rope_theta  # gpt-oss: freq_base_swa
        ff = self._layer_freq_factors(layer, n_ctx)
        if ggml_graph.available():
            mode = ggml_graph.ROPE_NEOX if a.rope_type == "neox" else ggml_graph.ROPE_NORM
            ext = 1.0 if a.rope_scaling == "yarn" else 0.0
            return ggml_graph.Graph.get().rope(
                x,
                pos,
                a.n_rot,
                mode,
                ff,
                a.rope_n_ctx_orig,
                base,
                a.rope_freq_scale,
                ext,
                a.rope_attn_factor,
                a.yarn_beta_fast,
                a.yarn_beta_slow,
            )
        cos, sin = self._rope_cache(pos, ff, n_ctx, base)
        n = a.n_rot
        c = cos[:, None, :]
        s = sin[:, None, :]
        out = x.copy()
        if a.rope_type == "neox":
            x0, x1 = x[..., : n // 2], x[..., n // 2 : n]
            out[..., : n // 2] = x0 * c - x1 * s
            out[..., n // 2 : n] = x0 * s + x1 * c
        else:
            x0, x1 = x[..., 0:n:2], x[..., 1:n:2]
            out[..., 0:n:2] = x0 * c - x1 * s
            out[..., 1:n:2] = x0 * s + x1 * c
        return out

    def reserve(self, cache: KVCache, n_batch: int) -> None:
        """Run the largest attention graph once: n_batch queries over every cell of the cache. ggml's
        CPU backend keeps a work buffer (f16 copies of the query and of the attention weights) as
        large as the largest graph it has computed; sized here, at load, it is part of the runtime
        the budget measures, and does not grow later with a longer prompt or context."""
        if not ggml_graph.available():
            return
        a = self.args
        n_kv = ggml_graph.kv_len(cache.n_ctx, cache.n_ctx)
        T = min(n_batch, cache.n_ctx)
        q = np.zeros((T, a.n_head, cache.k.shape[-1]), dtype=np.float32)
        v = a.kv_lora_rank if a.attention == "mla" else cache.v[0]
        mask = np.zeros((T, n_kv), dtype=np.float32)
        ggml_graph.Graph.get().attention(q, cache.k[0], v, n_kv, mask, a.attn_scale, self.layers[0].sinks)

    def _attention_core(self, i: int, layer: Layer, q: np.ndarray, cache: KVCache, p0: int) -> np.ndarray:
        """softmax(scale q K^T + mask [+ sink]) V [H, T, Dv] for q [T, H, Dk] at positions p0.., over
        the cache's cells 0..p0+T-1 (MLA: V is the first kv_lora_rank of each K row). Through
        ggml's ops on llama.cpp's shapes where its kernels are loaded: the same result to the bit,
        the f16 cache's rounding of q and of the attention weights included."""
        a = self.args
        T = q.shape[0]
        S = p0 + T
        mla = a.attention == "mla"
        if not ggml_graph.available():
            K = kernels.to_f32(cache.k[i, :S])  # [S, Hk, Dk]
            if mla:
                V = K[..., : a.kv_lora_rank]
            else:
                V = kernels.to_f32(np.ascontiguousarray(cache.v[i, :, :, :S].transpose(2, 0, 1)))
            return self._sdpa(q, K, V, p0, layer).transpose(1, 0, 2)
        n_kv = ggml_graph.kv_len(S, cache.n_ctx)
        mask = np.where(self._masked(layer, p0, T, n_kv), np.float32(-np.inf), np.float32(0.0))
        v = a.kv_lora_rank if mla else cache.v[i]
        return ggml_graph.Graph.get().attention(q, cache.k[i], v, n_kv, mask, a.attn_scale, layer.sinks)

    def _masked(self, layer: Layer, p0: int, T: int, S: int) -> np.ndarray:
        """[T, S]: which cache cells each query position may not see (later ones; on sliding-window
        layers also those n_swa or more positions back)."""
        qpos = p0 + np.arange(T)
        mask = np.arange(S)[None, :] > qpos[:, None]
        if layer.swa:
            mask |= (qpos[:, None] - np.arange(S)[None, :]) >= self.args.n_swa
        return mask

    def _sdpa(self, q: np.ndarray, K: np.ndarray, V: np.ndarray, p0: int, layer: Layer) -> np.ndarray:
        """softmax(scale q K^T + mask [+ sink]) V as llama.cpp's build_attn_mha (no flash attention).
        q [T, H, Dk]; K [S, Hk, Dk], V [S, Hk, Dv] (positions 0..S-1); returns [T, H, Dv].
        Causal mask; on sliding-window layers keys with pos_q - pos_k >= n_swa are masked too;
        attention sinks (gpt-oss) are one extra logit per head that takes probability mass."""
        a = self.args
        T, H, Dk = q.shape
        S, Hk = K.shape[0], K.shape[1]
        G = H // Hk
        qg = q.reshape(T, Hk, G, Dk).transpose(1, 2, 0, 3)  # [Hk, G, T, Dk]
        scores = np.matmul(qg, K.transpose(1, 2, 0)[:, None]) * np.float32(a.attn_scale)  # [Hk,G,T,S]
        mask = self._masked(layer, p0, T, S)
        if mask.any():
            scores = np.where(mask, np.float32(-np.inf), scores)
        mx = scores.max(axis=-1, keepdims=True)
        if layer.sinks is not None:
            sk = layer.sinks.reshape(Hk, G, 1, 1).astype(np.float32)
            mx = np.maximum(mx, sk)
        scores -= mx
        np.exp(scores, out=scores)
        denom = scores.sum(axis=-1, keepdims=True)
        if layer.sinks is not None:
            denom = denom + np.exp(sk - mx)
        scores /= denom
        out = np.matmul(scores, V.transpose(1, 0, 2)[:, None])  # [Hk, G, T, Dv]
        return out.transpose(2, 0, 1, 3).reshape(T, H, V.shape[-1])

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
        q = self._apply_rope(layer, q, pos, cache.n_ctx)
        k = self._apply_rope(layer, k, pos, cache.n_ctx)

        p0 = int(pos[0])  # this batch's first position: its K and V go to the cells from there
        cache.k[i, p0 : p0 + T] = k
        cache.v[i, :, :, p0 : p0 + T] = v.transpose(1, 2, 0)
        out = self._attention_core(i, layer, q, cache, p0)  # [H, T, Dv]
        out = out.transpose(1, 0, 2).reshape(T, a.n_head * a.head_dim_v)
        o = kernels.matmul(layer.wo, np.ascontiguousarray(out, dtype=np.float32))
        if layer.bo is not None:
            o += layer.bo
        return o

    def attention_mla(self, i: int, layer: Layer, h: np.ndarray, cache: KVCache, pos: np.ndarray) -> np.ndarray:
        """deepseek2's multi-head latent attention in llama.cpp's absorbed form (MQA over the latent).

        q = wq x (or wq_b RMSNorm(wq_a x)) split per head into [nope | rope]; the latent
        [RMSNorm(kv_cmpr) | rope(k_pe)] = wkv_a x is cached (one "kv head"); the query's nope part
        is absorbed into latent space with attn_k_b; V is the latent itself, decompressed per head
        after attention with attn_v_b. kq_scale (args.attn_scale) = mscale^2 / sqrt(nope + rope)."""
        a = self.args
        T = h.shape[0]
        H, L, R = a.n_head, a.kv_lora_rank, a.n_rot
        nope = a.head_dim - R
        if layer.wq_a is not None:
            q = kernels.matmul(layer.wq_b, _rms(kernels.matmul(layer.wq_a, h), layer.q_a_norm, a.norm_eps))
        else:
            q = kernels.matmul(layer.wq, h)
        q = q.reshape(T, H, a.head_dim)
        kv = kernels.matmul(layer.wkv_a, h)  # [T, L + R]
        kv_c = _rms(kv[:, :L], layer.kv_a_norm, a.norm_eps)  # [T, L]
        q_pe = self._apply_rope(layer, np.ascontiguousarray(q[..., nope:]), pos, cache.n_ctx)  # [T, H, R]
        k_pe = self._apply_rope(layer, np.ascontiguousarray(kv[:, None, L:]), pos, cache.n_ctx)  # [T, 1, R]
        q_nope = q[..., :nope]
        q_abs = np.stack(
            [kernels.matmul(layer.wk_b[hh], np.ascontiguousarray(q_nope[:, hh])) for hh in range(H)], axis=1
        )  # [T, H, L]
        Q = np.concatenate([q_abs, q_pe], axis=-1)  # [T, H, L + R]

        p0 = int(pos[0])  # this batch's first position: its K and V go to the cells from there
        cache.k[i, p0 : p0 + T, 0, :L] = kv_c
        cache.k[i, p0 : p0 + T, 0, L:] = k_pe[:, 0]
        lat = self._attention_core(i, layer, Q, cache, p0)  # [H, T, L]
        o = np.stack(
            [kernels.matmul(layer.wv_b[hh], np.ascontiguousarray(lat[hh])) for hh in range(H)], axis=1
        )  # [T, H, Dv]
        return kernels.matmul(layer.wo, np.ascontiguousarray(o.reshape(T, H * a.head_dim_v), dtype=np.float32))

    def route(self, layer: Layer, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts [T, K] and their gate weights [T, K], as llama.cpp's build_moe_ffn
        (runtime/routing.py)."""
        return routing.route(self.args, layer, h)

    def experts(self, i: int, layer: Layer, h: np.ndarray, top: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The chosen experts' outputs, weighted and summed [T, D]; `predict` gives the expert source
        the next MoE layer's likely routing (its router applied to this layer's input) to prefetch."""
        if self.observe is not None:
            self.observe(i, h, top, w)
        return self.expert_src.moe_layer(i, h, top, w, lambda: self._predict_next(i, h))

    def _predict_next(self, i: int, h: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        j = next((j for j in range(i + 1, self.args.n_layer) if not self.layers[j].dense), None)
        if j is None:
            return None
        top, w = self.route(self.layers[j], h)
        return j, top, w

    def moe(self, i: int, layer: Layer, h: np.ndarray) -> np.ndarray:
        top, w = self.route(layer, h)
        if self.trace is not None:
            self.trace.append((top.copy(), w.copy()))
        out = self.experts(i, layer, h, top, w)
        if layer.gate_shexp is not None:
            sh = swiglu_ffn(layer.gate_shexp, layer.up_shexp, layer.down_shexp, h)
            if layer.gate_inp_shexp is not None:
                g = h @ layer.gate_inp_shexp  # [T]
                sh = sh * (1.0 / (1.0 + np.exp(-g)))[:, None]
            out += sh
        return out

    def dense_ffn(self, i: int, layer: Layer, h: np.ndarray) -> np.ndarray:
        """deepseek2's leading dense layers: one SwiGLU FFN (ffn_gate/up/down), no routing."""
        if self.trace is not None:  # keep one entry per layer: no experts here
            k = (h.shape[0], self.args.n_expert_used)
            self.trace.append((np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=np.float32)))
        return swiglu_ffn(layer.ffn_gate, layer.ffn_up, layer.ffn_down, h)

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
            raise EdgeMoEError(f"context is full: {cache.n_past} + {T} tokens exceed n_ctx={cache.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise EdgeMoEError(f"token id out of range 0..{a.n_vocab - 1}: {tokens.min()}..{tokens.max()}")
        pos = np.arange(cache.n_past, cache.n_past + T)
        cache.will_write(T)
        if "token_embd.weight" in getattr(self.file, "on_disk", ()):  # read from the file a row at a time
            rows = self.file.read_rows("token_embd.weight", tokens)
            w = self.tok_embd
            x = kernels.dequantize_rows(kernels.QWeight(rows, w.qtype, w.shape[1], w.name), np.arange(len(rows)))
        else:
            x = kernels.dequantize_rows(self.tok_embd, tokens)  # [T, D]
        if a.embedding_scale != 1.0:
            x *= np.float32(a.embedding_scale)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm, layer.attn_norm_b)
            att = self._attend_in_batches(i, layer, h, cache, pos)
            x = x + att * np.float32(a.residual_scale) if a.residual_scale != 1.0 else x + att
            h = self._norm(x, layer.ffn_norm, layer.ffn_norm_b)
            m = self.dense_ffn(i, layer, h) if layer.dense else self.moe(i, layer, h)
            x = x + m * np.float32(a.residual_scale) if a.residual_scale != 1.0 else x + m
        cache.n_past += T
        if not all_logits:
            return self._logits(x[-1:])
        out = np.empty((T, a.n_vocab), dtype=np.float32)
        for c in range(0, T, N_BATCH):
            out[c : c + N_BATCH] = self._logits(x[c : c + N_BATCH])
        return out

    def _attend_in_batches(self, i: int, layer: Layer, h: np.ndarray, cache: KVCache, pos: np.ndarray) -> np.ndarray:
        """Attention of T tokens at positions pos, N_BATCH queries at a time (each batch sees the
        cells the ones before it wrote)."""
        T = h.shape[0]
        if T <= N_BATCH:
            return self._attend(i, layer, h, cache, pos)
        out = np.empty((T, self.args.n_embd), dtype=np.float32)
        for c in range(0, T, N_BATCH):
            b = slice(c, c + N_BATCH)
            out[b] = self._attend(i, layer, np.ascontiguousarray(h[b]), cache, pos[b])
        return out

    def _logits(self, x: np.ndarray) -> np.ndarray:
        a = self.args
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
    """RMSNorm over the last axis, times w, bit for bit as llama.cpp computes it on the CPU
    (ggml_compute_forward_rms_norm_f32, then ggml_mul): the float32 squares summed in sequence in
    double, mean = float(sum / n), scale = 1 / sqrtf(mean + eps), (x * scale) * w. This is the
    activation ggml quantizes to Q8_0 for the next matmul of a quantized file, where a 1-ulp
    difference (x / sqrt(mean) with a float32 pairwise mean, as before) sometimes crosses a
    rounding boundary of the quantizer and changes the token's output by ~1e-3 relative."""
    if w is None:  # a file with q_norm but no k_norm, say: the warm-up turns this into one clear error
        raise TypeError("a norm's weight tensor is missing")
    x = np.asarray(x, dtype=np.float32)
    ssq = np.cumsum((x * x).astype(np.float64), axis=-1)[..., -1:]  # in order, as ggml's loop
    mean = (ssq / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return (x * scale) * w.astype(np.float32, copy=False)
