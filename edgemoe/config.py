"""ModelArgs: the model's configuration, built once from GGUF metadata and tensor shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import EdgeMoEError
from .gguf_file import GGUFFile

# Architectures the engine runs, with what differs between them (see docs/architectures.md).
# rope: "norm" = adjacent pairs (llama, granite: the converter permuted q/k), "neox" = split halves.
# norm_topk: whether the top-k gate weights are renormalised to sum to 1 (llama.cpp's choice).
ARCHS: dict[str, dict] = {
    "llama": dict(rope="norm", norm_topk=True),
    "granitemoe": dict(rope="norm", norm_topk=True),
    "olmoe": dict(rope="neox", norm_topk=False),
    "qwen2moe": dict(rope="neox", norm_topk=False),
    "qwen3moe": dict(rope="neox", norm_topk=True),
    "phimoe": dict(rope="neox", norm_topk=True),
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

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelArgs:
        arch = f.architecture
        if arch not in ARCHS:
            raise EdgeMoEError(
                f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        spec = ARCHS[arch]

        def key(name: str, default=None, required: bool = False):
            full = f"{arch}.{name}"
            if required:
                return f.require(full)
            return f.get(full, default)

        n_embd = int(key("embedding_length", required=True))
        n_layer = int(key("block_count", required=True))
        n_head = _scalar(key("attention.head_count", required=True), f, "attention.head_count")
        n_head_kv = _scalar(key("attention.head_count_kv", n_head), f, "attention.head_count_kv")
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise EdgeMoEError(f"{f.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        head_dim = int(key("attention.key_length", n_embd // n_head))
        head_dim_v = int(key("attention.value_length", head_dim))
        n_expert = int(key("expert_count", 0))
        n_expert_used = int(key("expert_used_count", 0))
        if n_expert < 1 or not 1 <= n_expert_used <= n_expert:
            raise EdgeMoEError(
                f"{f.path}: not a Mixture-of-Experts model (expert_count={n_expert}, "
                f"expert_used_count={n_expert_used})"
            )
        norm_eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
        tok = f.tensor("token_embd.weight")
        n_vocab = int(tok.shape[1])
        gate = f.tensor("blk.0.ffn_gate_exps.weight")
        n_ff_exp = int(gate.shape[1])

        n_rot = int(key("rope.dimension_count", head_dim))
        scaling = str(key("rope.scaling.type", "none") or "none")
        factor = float(key("rope.scaling.factor", 0.0) or 0.0)
        if scaling not in ("none", "linear", "yarn"):
            raise EdgeMoEError(f"{f.path}: rope scaling type {scaling!r} is not supported")
        freq_scale = 1.0 / factor if scaling != "none" and factor > 0 else 1.0
        n_ctx_train = int(key("context_length", 4096))
        attn_scale = float(key("attention.scale", 0.0) or 0.0) or 1.0 / math.sqrt(head_dim)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx_train,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=n_ff_exp,
            norm_eps=norm_eps,
            rope_type=spec["rope"],
            n_rot=n_rot,
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_freq_scale=freq_scale,
            rope_scaling=scaling,
            rope_n_ctx_orig=int(key("rope.scaling.original_context_length", n_ctx_train)),
            rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0)),
            yarn_beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)),
            norm_topk=spec["norm_topk"],
            attn_scale=attn_scale,
            embedding_scale=float(key("embedding_scale", 1.0)),
            residual_scale=float(key("residual_scale", 1.0)),
            logit_scale=float(key("logit_scale", 1.0)),
            has_shared_expert=f.maybe("blk.0.ffn_gate_shexp.weight") is not None,
        )


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
