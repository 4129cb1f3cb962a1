"""deepseek2 (DeepSeek V2/V3 and their -Lite forms): what its GGUF metadata means beyond the
llama-like families: multi-head latent attention in llama.cpp's absorbed form, and its routing
(softmax or sigmoid scores, a selection bias, renormalisation and scaling, YaRN's attention scale)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import EdgeMoEError

# llama.cpp's expert_gating_func values (include/llama.h llama_expert_gating_func_type)
GATING_FUNC = {0: "softmax", 1: "softmax", 2: "sigmoid"}


def mla_fields(key, f, extra: dict) -> tuple[int, int]:
    """MLA's ranks into extra; returns the true q/k and v head sizes (key_length_mla, value_length_mla)."""
    k_mla = int(key("attention.key_length_mla", 0))
    v_mla = int(key("attention.value_length_mla", 0))
    if not (k_mla and v_mla) or f.maybe("blk.0.attn_kv_b.weight") is not None:
        raise EdgeMoEError(
            f"{f.path}: deepseek2 file without the absorbed MLA tensors (attn_k_b, "
            "attn_v_b, key_length_mla); reconvert it with a recent llama.cpp"
        )
    extra.update(
        kv_lora_rank=int(key("attention.kv_lora_rank", required=True)),
        q_lora_rank=int(key("attention.q_lora_rank", 0) or 0),
    )
    return k_mla, v_mla


def routing_fields(
    key, f, extra: dict, scaling: str, freq_scale: float, rope_attn_factor: float, head_dim: int
) -> tuple[bool, float, float]:
    """The gating function and weight scale into extra; returns (norm_topk, the rope's attn_factor,
    the attention scale).

    llama.cpp (src/models/deepseek2.cpp, src/llama-context.cpp): the file stores
    0.1 * mscale_all_dim; with yarn the rope's attn_factor is divided by (1 + 0.1 ln factor) when
    it is set, and kq_scale = mscale^2 / sqrt(head size) with
    mscale = attn_factor_org * (1 + 0.1 * log_mul * ln factor)."""
    norm_topk = bool(key("expert_weights_norm", False))
    func = int(key("expert_gating_func", 0) or 0)
    if func not in GATING_FUNC:
        raise EdgeMoEError(f"{f.path}: expert_gating_func {func} is not supported (1 softmax, 2 sigmoid)")
    extra.update(gating_func=GATING_FUNC[func], expert_weights_scale=float(key("expert_weights_scale", 0.0) or 0.0))
    log_mul = float(key("rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
    extra.update(rope_yarn_log_mul=log_mul)
    if scaling == "yarn" and log_mul != 0.0 and freq_scale < 1.0:
        rope_attn_factor /= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    mscale = rope_attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    mscale *= 1.0 + 0.1 * log_mul * math.log(1.0 / freq_scale)
    m = np.float32(mscale)
    attn_scale = float(m * m / np.sqrt(np.float32(head_dim)))  # in float32, as llama.cpp
    return norm_topk, rope_attn_factor, attn_scale


def expert_groups(key, f, n_expert: int, extra: dict) -> None:
    """Group-limited expert selection (V3) into extra: expert_group_count groups, the best
    expert_group_used_count of them per token."""
    n_groups = int(key("expert_group_count", 0) or 0)
    if n_groups > 1:
        n_group_used = int(key("expert_group_used_count", 0) or 0)
        if n_expert % n_groups or not 0 < n_group_used < n_groups or n_expert // n_groups < 2:
            raise EdgeMoEError(
                f"{f.path}: bad expert groups: {n_expert} experts, {n_groups} groups, {n_group_used} used"
            )
        extra.update(n_expert_groups=n_groups, n_group_used=n_group_used)
