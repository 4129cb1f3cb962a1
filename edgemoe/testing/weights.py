"""The synthetic models' tensors: random weights with llama.cpp's tensor names per architecture,
and their encoding to the file's dtype.

Weights are random but not trivial: norm weights ~ 1 +- 0.2, biases where the architecture has
them, distinct experts, routers with a clear preference per token, and an output layer scaled so
the logits have a standard deviation of ~3 over the vocabulary (so argmax and KL comparisons
against llama.cpp are meaningful).

Shapes: GGUF lists dimensions innermost first; numpy arrays here are the reverse, e.g.
ffn_gate_exps is GGUF [n_embd, n_ff_exp, n_expert] = numpy (n_expert, n_ff_exp, n_embd).
"""

from __future__ import annotations

import gguf
import numpy as np

from .spec import WRITE_DTYPES, SynthSpec


def _tensors(spec: SynthSpec) -> dict[str, np.ndarray]:
    """All tensors of the model as float32 numpy arrays (numpy shape = reversed GGUF shape).

    One generator draws every tensor in the order written here, so a seed gives the same file."""
    rng = np.random.default_rng(spec.seed)

    def randn(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_w(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def router():
        return _router(rng, spec)

    t = _embedding_tensors(spec, randn, norm_w)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        if spec.arch == "deepseek2":
            _deepseek2_layer(t, p, i, spec, randn, norm_w, router)
        elif spec.arch == "gpt-oss":
            _gpt_oss_layer(t, p, spec, randn, norm_w, router)
        else:
            _llama_like_layer(t, p, i, spec, rng, randn, norm_w, router)
    return t


def _embedding_tensors(spec: SynthSpec, randn, norm_w) -> dict[str, np.ndarray]:
    """token_embd, output_norm and (unless tied) output, with phimoe's biases."""
    a, D, V = spec.arch, spec.n_embd, spec.n_vocab
    t: dict[str, np.ndarray] = {}
    # granite divides the logits by logit_scale: compensate so the final std stays logit_std
    logit_div = spec.logit_scale if a == "granitemoe" else 1.0
    out_std = spec.logit_std * logit_div / np.sqrt(D)
    t["token_embd.weight"] = randn(V, D, std=out_std if spec.is_tied else 1.0)
    t["output_norm.weight"] = norm_w(D)
    if a == "phimoe":
        t["output_norm.bias"] = randn(D, std=0.1)
    if not spec.is_tied:
        t["output.weight"] = randn(V, D, std=out_std)
    if a == "phimoe":
        t["output.bias"] = randn(V, std=0.5)
    return t


def _llama_like_layer(t, p, i, spec: SynthSpec, rng: np.random.Generator, randn, norm_w, router) -> None:
    """Layer of the llama-like families (llama, olmoe, qwen2moe, qwen3moe, granitemoe, phimoe):
    standard attention with their norms and biases, routed experts, qwen2moe's gated shared expert."""
    a = spec.arch
    D, H, KV, hd = spec.n_embd, spec.n_head, spec.n_head_kv, spec.n_head_dim
    E, F = spec.n_expert, spec.n_ff_exp
    q_dim, kv_dim = H * hd, KV * hd
    t[p + "attn_norm.weight"] = norm_w(D)
    if a == "phimoe":
        t[p + "attn_norm.bias"] = randn(D, std=0.1)
    t[p + "attn_q.weight"] = randn(q_dim, D, std=1 / np.sqrt(D))
    t[p + "attn_k.weight"] = randn(kv_dim, D, std=1 / np.sqrt(D))
    t[p + "attn_v.weight"] = randn(kv_dim, D, std=1 / np.sqrt(D))
    if a in ("qwen2moe", "phimoe"):
        t[p + "attn_q.bias"] = randn(q_dim, std=0.2)
        t[p + "attn_k.bias"] = randn(kv_dim, std=0.2)
        t[p + "attn_v.bias"] = randn(kv_dim, std=0.2)
    t[p + "attn_output.weight"] = randn(D, q_dim, std=1 / np.sqrt(q_dim))
    if a == "phimoe":
        t[p + "attn_output.bias"] = randn(D, std=0.1)
    if a == "olmoe":  # full width, applied before the reshape to heads
        t[p + "attn_q_norm.weight"] = norm_w(q_dim)
        t[p + "attn_k_norm.weight"] = norm_w(kv_dim)
    if a == "qwen3moe":  # per head, shared by all heads
        t[p + "attn_q_norm.weight"] = norm_w(hd)
        t[p + "attn_k_norm.weight"] = norm_w(hd)
    t[p + "ffn_norm.weight"] = norm_w(D)
    if a == "phimoe":
        t[p + "ffn_norm.bias"] = randn(D, std=0.1)
    t[p + "ffn_gate_inp.weight"] = router()
    t[p + "ffn_gate_exps.weight"] = randn(E, F, D, std=1 / np.sqrt(D))
    t[p + "ffn_up_exps.weight"] = randn(E, F, D, std=1 / np.sqrt(D))
    t[p + "ffn_down_exps.weight"] = randn(E, D, F, std=1 / np.sqrt(F))
    if a == "qwen2moe":
        S = spec.n_ff_shexp
        t[p + "ffn_gate_inp_shexp.weight"] = randn(1, D, std=1 / np.sqrt(D))
        t[p + "ffn_gate_shexp.weight"] = randn(S, D, std=1 / np.sqrt(D))
        t[p + "ffn_up_shexp.weight"] = randn(S, D, std=1 / np.sqrt(D))
        t[p + "ffn_down_shexp.weight"] = randn(D, S, std=1 / np.sqrt(S))
    if a == "phimoe" and i == 0:
        # only layer 0 carries them (llama.cpp duplicates them for the other layers)
        t["rope_factors_short.weight"] = (1.0 + 0.5 * rng.random(hd // 2)).astype(np.float32)
        t["rope_factors_long.weight"] = (1.0 + 4.0 * rng.random(hd // 2)).astype(np.float32)


def _deepseek2_layer(t, p, i, spec: SynthSpec, randn, norm_w, router) -> None:
    """deepseek2 layer in llama.cpp's absorbed MLA form (src/models/deepseek2.cpp)."""
    D, H, E, F = spec.n_embd, spec.n_head, spec.n_expert, spec.n_ff_exp
    L, R, N, V = spec.kv_lora_rank, spec.qk_rope_dim, spec.qk_nope_dim, spec.v_head_dim
    QL = spec.q_lora_rank
    t[p + "attn_norm.weight"] = norm_w(D)
    if QL > 0:
        t[p + "attn_q_a.weight"] = randn(QL, D, std=1 / np.sqrt(D))
        t[p + "attn_q_a_norm.weight"] = norm_w(QL)
        t[p + "attn_q_b.weight"] = randn(H * (N + R), QL, std=1 / np.sqrt(QL))
    else:
        t[p + "attn_q.weight"] = randn(H * (N + R), D, std=1 / np.sqrt(D))
    t[p + "attn_kv_a_mqa.weight"] = randn(L + R, D, std=1 / np.sqrt(D))
    t[p + "attn_kv_a_norm.weight"] = norm_w(L)
    # GGUF attn_k_b [nope, kv_lora, n_head], attn_v_b [kv_lora, v_head, n_head]
    t[p + "attn_k_b.weight"] = randn(H, L, N, std=1 / np.sqrt(L))
    t[p + "attn_v_b.weight"] = randn(H, V, L, std=1 / np.sqrt(L))
    t[p + "attn_output.weight"] = randn(D, H * V, std=1 / np.sqrt(H * V))
    t[p + "ffn_norm.weight"] = norm_w(D)
    if i < spec.n_leading_dense:
        S = spec.n_ff_dense
        t[p + "ffn_gate.weight"] = randn(S, D, std=1 / np.sqrt(D))
        t[p + "ffn_up.weight"] = randn(S, D, std=1 / np.sqrt(D))
        t[p + "ffn_down.weight"] = randn(D, S, std=1 / np.sqrt(S))
        return
    t[p + "ffn_gate_inp.weight"] = router()
    if spec.exp_probs_b:
        # comparable to the spread of the sigmoid scores, so it changes the selection
        t[p + "exp_probs_b.bias"] = randn(E, std=0.3)
    t[p + "ffn_gate_exps.weight"] = randn(E, F, D, std=1 / np.sqrt(D))
    t[p + "ffn_up_exps.weight"] = randn(E, F, D, std=1 / np.sqrt(D))
    t[p + "ffn_down_exps.weight"] = randn(E, D, F, std=1 / np.sqrt(F))
    S = F * spec.n_shared_expert
    t[p + "ffn_gate_shexp.weight"] = randn(S, D, std=1 / np.sqrt(D))
    t[p + "ffn_up_shexp.weight"] = randn(S, D, std=1 / np.sqrt(D))
    t[p + "ffn_down_shexp.weight"] = randn(D, S, std=1 / np.sqrt(S))


def _gpt_oss_layer(t, p, spec: SynthSpec, randn, norm_w, router) -> None:
    """gpt-oss layer (src/models/openai-moe.cpp): biases everywhere, attention sinks, expert
    biases; gate/up projections large enough that the activation's clamp at 7 is exercised."""
    D, H, KV, hd = spec.n_embd, spec.n_head, spec.n_head_kv, spec.n_head_dim
    E, F = spec.n_expert, spec.n_ff_exp
    q_dim, kv_dim = H * hd, KV * hd
    t[p + "attn_norm.weight"] = norm_w(D)
    t[p + "attn_q.weight"] = randn(q_dim, D, std=1 / np.sqrt(D))
    t[p + "attn_k.weight"] = randn(kv_dim, D, std=1 / np.sqrt(D))
    t[p + "attn_v.weight"] = randn(kv_dim, D, std=1 / np.sqrt(D))
    t[p + "attn_q.bias"] = randn(q_dim, std=0.2)
    t[p + "attn_k.bias"] = randn(kv_dim, std=0.2)
    t[p + "attn_v.bias"] = randn(kv_dim, std=0.2)
    t[p + "attn_output.weight"] = randn(D, q_dim, std=1 / np.sqrt(q_dim))
    t[p + "attn_output.bias"] = randn(D, std=0.1)
    t[p + "attn_sinks.weight"] = (1.0 + randn(H, std=1.0)).astype(np.float32)
    t[p + "post_attention_norm.weight"] = norm_w(D)
    t[p + "ffn_gate_inp.weight"] = router()
    t[p + "ffn_gate_inp.bias"] = randn(E, std=0.5)
    t[p + "ffn_gate_exps.weight"] = randn(E, F, D, std=3 / np.sqrt(D))
    t[p + "ffn_up_exps.weight"] = randn(E, F, D, std=3 / np.sqrt(D))
    t[p + "ffn_down_exps.weight"] = randn(E, D, F, std=0.3 / np.sqrt(F))
    t[p + "ffn_gate_exps.bias"] = randn(E, F, std=0.5)
    t[p + "ffn_up_exps.bias"] = randn(E, F, std=0.5)
    t[p + "ffn_down_exps.bias"] = randn(E, D, std=0.1)


def _router(rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """Router rows (n_expert, n_embd): logits std ~router_scale on unit-RMS input."""
    g = rng.standard_normal((spec.n_expert, spec.n_embd))
    g *= spec.router_scale / np.linalg.norm(g, axis=1, keepdims=True)
    return g.astype(np.float32)


_KEEP_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "rope_factors")


def _encode(name: str, x: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Convert a float32 tensor to the file dtype; 1-D tensors, norms, biases, routers stay F32."""
    qt = WRITE_DTYPES[dtype]
    if x.ndim < 2 or any(k in name for k in _KEEP_F32) or qt == gguf.GGMLQuantizationType.F32:
        return x.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qt == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16), qt
    blk = gguf.GGML_QUANT_SIZES[qt][0]
    if x.shape[-1] % blk:
        return x.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(x, qt), qt
