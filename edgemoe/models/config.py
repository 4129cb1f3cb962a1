"""ModelArgs: the model's configuration, built once from GGUF metadata and tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgeMoEError
from . import deepseek2, gpt_oss
from .gguf_file import GGUFFile

# Architectures the engine runs, with what differs between them (see docs/architectures.md).
# rope: "norm" = adjacent pairs (llama, granite: the converter permuted q/k), "neox" = split halves.
# norm_topk: whether the top-k gate weights are renormalised to sum to 1 (llama.cpp's choice;
# None: read from `expert_weights_norm`). attention: "standard" or "mla" (deepseek2's absorbed
# multi-head latent attention). gating: "softmax" (softmax over all experts, then top-k),
# "deepseek" (softmax or sigmoid per `expert_gating_func`, selection bias, expert groups),
# "softmax_weight" (gpt-oss: top-k of the biased logits, softmax over the k).
# act: the expert activation, see runtime/experts.py: expert_act.
ARCHS: dict[str, dict] = {
    "llama": dict(rope="norm", norm_topk=True),
    "granitemoe": dict(rope="norm", norm_topk=True),
    "olmoe": dict(rope="neox", norm_topk=False),
    "qwen2moe": dict(rope="neox", norm_topk=False),
    "qwen3moe": dict(rope="neox", norm_topk=True),
    "phimoe": dict(rope="neox", norm_topk=True),
    "deepseek2": dict(rope="norm", norm_topk=None, attention="mla", gating="deepseek"),
    "gpt-oss": dict(rope="neox", norm_topk=False, gating="softmax_weight", act="swiglu_oai"),
}

DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    norm_eps: float
    rope_type: str
    n_rot: int
    rope_theta: float
    rope_freq_scale: float  # 1/factor for linear scaling, 1.0 otherwise
    rope_scaling: str  # "none" | "linear" | "yarn"
    rope_n_ctx_orig: int
    rope_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    norm_topk: bool
    attn_scale: float
    embedding_scale: float
    residual_scale: float
    logit_scale: float
    has_shared_expert: bool
    # ---- deepseek2 / gpt-oss (defaults: what the six other arches do) ----
    attention: str = "standard"  # "standard" | "mla"
    gating: str = "softmax"  # "softmax" | "deepseek" | "softmax_weight"
    gating_func: str = "softmax"  # deepseek2: "softmax" | "sigmoid" (expert_gating_func)
    expert_weights_scale: float = 0.0  # 0 or 1: no scaling (llama.cpp's build_moe_ffn)
    n_expert_groups: int = 0  # > 1: group-limited expert selection
    n_group_used: int = 0
    expert_act: str = "silu"  # "silu" (SwiGLU) | "swiglu_oai" (gpt-oss)
    n_leading_dense: int = 0  # deepseek2: the first layers have a dense SwiGLU FFN
    n_ff: int = 0  # width of those dense FFNs
    kv_lora_rank: int = 0  # MLA: compressed KV width (cached together with the n_rot rope dims)
    q_lora_rank: int = 0  # MLA: 0 = no q compression (V2-Lite form: attn_q)
    rope_yarn_log_mul: float = 0.0  # deepseek2: mscale_all_dim (file value / 0.1)
    n_swa: int = 0  # gpt-oss: sliding window (keys with pos_q - pos_k >= n_swa are masked)
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    rope_theta_swa: float = 0.0  # rope base on SWA layers (0: rope_theta)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def cache_dims(self) -> tuple[int, int, int]:
        """(kv heads, K width, V width) per cached position. MLA caches the normed compressed kv
        and the roped k_pe as one K row (head_count_kv 1); V is the first kv_lora_rank of K."""
        if self.attention == "mla":
            return 1, self.kv_lora_rank + self.n_rot, 0
        return self.n_head_kv, self.head_dim, self.head_dim_v

    def is_swa(self, i: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[i]

    def is_dense(self, i: int) -> bool:
        return i < self.n_leading_dense

    @classmethod
    def from_gguf(cls, f: GGUFFile, n_ff_exp: int | None = None) -> ModelArgs:
        """n_ff_exp: given by an expert store, whose dense file has no expert tensors.

        The helpers read (and check) the metadata in a fixed order, so a file with several faults
        always reports the same one first."""
        arch = _architecture(f)
        spec = ARCHS[arch]
        key = _key_reader(f, arch)
        attention = spec.get("attention", "standard")
        extra: dict = {}
        shape = _shape_fields(key, f, arch, attention, extra)
        n_ff_exp, first_moe = _ffn_fields(key, f, arch, n_ff_exp, extra)
        rope = _rope_fields(key, f, shape["head_dim"])
        routing = _routing_fields(key, f, arch, shape, rope, extra)
        has_shared_expert = f.maybe(first_moe + "ffn_gate_shexp.weight") is not None
        return cls(
            arch=arch,
            **shape,
            n_ff_exp=n_ff_exp,
            rope_type=spec["rope"],
            **rope,
            **routing,
            **_rope_base_and_multipliers(key, rope["n_ctx_train"]),
            has_shared_expert=has_shared_expert,
            attention=attention,
            expert_act=spec.get("act", "silu"),
            **extra,
        )


def _architecture(f: GGUFFile) -> str:
    arch = f.architecture
    if arch not in ARCHS:
        raise EdgeMoEError(f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return arch


def _key_reader(f: GGUFFile, arch: str):
    """key(name, default, required): the metadata value `{arch}.{name}`."""

    def key(name: str, default=None, required: bool = False):
        full = f"{arch}.{name}"
        if required:
            return f.require(full)
        return f.get(full, default)

    return key


def _shape_fields(key, f: GGUFFile, arch: str, attention: str, extra: dict) -> dict:
    """Sizes, heads (MLA's ranks into extra), experts, norm epsilon and vocabulary."""
    n_embd = int(key("embedding_length", required=True))
    n_layer = int(key("block_count", required=True))
    if not 0 < n_layer <= len(f.tensors):  # every block has tensors of its own
        raise EdgeMoEError(f"{f.path}: {arch}.block_count is {n_layer}, but the file has {len(f.tensors)} tensors")
    n_head = _scalar(key("attention.head_count", required=True), f, "attention.head_count")
    n_head_kv = _scalar(key("attention.head_count_kv", n_head), f, "attention.head_count_kv")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise EdgeMoEError(f"{f.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    head_dim = int(key("attention.key_length", n_embd // n_head))
    head_dim_v = int(key("attention.value_length", head_dim))
    if attention == "mla":
        head_dim, head_dim_v = deepseek2.mla_fields(key, f, extra)  # the true q/k and v head sizes
    n_expert = int(key("expert_count", 0))
    n_expert_used = int(key("expert_used_count", 0))
    if n_expert < 1 or not 1 <= n_expert_used <= n_expert:
        raise EdgeMoEError(
            f"{f.path}: not a Mixture-of-Experts model (expert_count={n_expert}, expert_used_count={n_expert_used})"
        )
    norm_eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
    tok = f.tensor("token_embd.weight")
    return dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        n_vocab=int(tok.shape[1]),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        norm_eps=norm_eps,
    )


def _ffn_fields(key, f: GGUFFile, arch: str, n_ff_exp: int | None, extra: dict) -> tuple[int, str]:
    """The expert width and deepseek2's leading dense layers (into extra); returns (n_ff_exp, the
    tensor name prefix of the first MoE layer)."""
    n_leading_dense = int(key("leading_dense_block_count", 0) or 0) if arch == "deepseek2" else 0
    first_moe = f"blk.{n_leading_dense}."
    if n_ff_exp is None:
        n_ff_exp = int(key("expert_feed_forward_length", 0) or 0) if arch in ("deepseek2", "gpt-oss") else 0
        n_ff_exp = n_ff_exp or int(f.tensor(first_moe + "ffn_gate_exps.weight").shape[1])
    if n_leading_dense:
        extra.update(n_leading_dense=n_leading_dense, n_ff=int(f.tensor("blk.0.ffn_gate.weight").shape[1]))
    return n_ff_exp, first_moe


def _rope_fields(key, f: GGUFFile, head_dim: int) -> dict:
    """Rope dimensions and scaling, and the training context."""
    n_rot = int(key("rope.dimension_count", head_dim))
    scaling = str(key("rope.scaling.type", "none") or "none")
    factor = float(key("rope.scaling.factor", 0.0) or 0.0)
    if scaling not in ("none", "linear", "yarn"):
        raise EdgeMoEError(f"{f.path}: rope scaling type {scaling!r} is not supported")
    freq_scale = 1.0 / factor if scaling != "none" and factor > 0 else 1.0
    n_ctx_train = int(key("context_length", 4096))
    return dict(n_rot=n_rot, rope_scaling=scaling, rope_freq_scale=freq_scale, n_ctx_train=n_ctx_train)


def _routing_fields(key, f: GGUFFile, arch: str, shape: dict, rope: dict, extra: dict) -> dict:
    """Top-k renormalisation and gating, with deepseek2's and gpt-oss's specifics (into extra);
    also the attention scale and the rope's attn_factor, which deepseek2's yarn settings change."""
    spec = ARCHS[arch]
    head_dim = shape["head_dim"]
    attn_scale = float(key("attention.scale", 0.0) or 0.0) or inv_sqrt(head_dim)
    rope_attn_factor = float(key("rope.scaling.attn_factor", 1.0))
    norm_topk = spec["norm_topk"]
    gating = spec.get("gating", "softmax")
    if gating == "deepseek":
        norm_topk, rope_attn_factor, attn_scale = deepseek2.routing_fields(
            key, f, extra, rope["rope_scaling"], rope["rope_freq_scale"], rope_attn_factor, head_dim
        )
    deepseek2.expert_groups(key, f, shape["n_expert"], extra)
    if arch == "gpt-oss":
        attn_scale = inv_sqrt(rope["n_rot"])
        gpt_oss.fields(key, shape["n_layer"], extra)
    if norm_topk is None:
        norm_topk = False
    return dict(norm_topk=norm_topk, gating=gating, attn_scale=attn_scale, rope_attn_factor=rope_attn_factor)


def _rope_base_and_multipliers(key, n_ctx_train: int) -> dict:
    """Rope base and yarn parameters, and granite's multipliers."""
    return dict(
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_n_ctx_orig=int(key("rope.scaling.original_context_length", n_ctx_train)),
        yarn_beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
        yarn_beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)),
        embedding_scale=float(key("embedding_scale", 1.0)),
        residual_scale=float(key("residual_scale", 1.0)),
        logit_scale=float(key("logit_scale", 1.0)),
    )


def inv_sqrt(n: int) -> float:
    """1 / sqrt(n) rounded as llama.cpp's `1.0f/sqrtf(float(n))` (float32 sqrt, then float32 divide:
    1 ulp off the correctly rounded value for some n, and the scale enters every attention logit)."""
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))


def _scalar(value, f: GGUFFile, name: str) -> int:
    """head counts may be per-layer arrays in GGUF; we need them uniform."""
    try:
        import numpy as np

        arr = np.atleast_1d(np.asarray(value))
        if arr.size == 0 or not (arr == arr[0]).all():
            raise EdgeMoEError(f"{f.path}: per-layer {name} values differ ({arr.tolist()}); not supported")
        return int(arr[0])
    except (TypeError, ValueError) as exc:
        if isinstance(exc, EdgeMoEError):
            raise
        raise EdgeMoEError(f"{f.path}: metadata {name} has a bad value {value!r}") from None
