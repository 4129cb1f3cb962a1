"""SynthSpec: the shape and options of a synthetic MoE model (see synth.py), and what it checks
before a file is written."""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

ARCHES = ("llama", "olmoe", "qwen2moe", "qwen3moe", "granitemoe", "phimoe", "deepseek2", "gpt-oss")

# dtypes gguf-py can write directly (quants.py has numpy quantizers for these)
WRITE_DTYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
    "Q5_0": gguf.GGMLQuantizationType.Q5_0,
    "Q5_1": gguf.GGMLQuantizationType.Q5_1,
}

# arches whose loader accepts a missing output.weight (then token_embd is used: tied output)
_TIE_OK = {"llama", "qwen3moe", "granitemoe", "deepseek2"}

# <|bos|>, <|endoftext|> (eos), <|pad|>: appended after the byte-level tokens and merges
N_SPECIAL = 3


@dataclass(frozen=True)
class SynthSpec:
    """Shape and options of a synthetic MoE model.

    The vocabulary is byte-level GPT-2 BPE: `vocab` (>= 256) normal tokens, i.e. the 256 byte
    tokens plus `vocab - 256` merges learnt from a small built-in text, then N_SPECIAL control
    tokens; `n_vocab` is the total (= token_embd rows).
    """

    arch: str
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # default n_embd // n_head
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 32
    n_ff_shexp: int = 64  # qwen2moe shared expert width
    vocab: int = 288  # byte tokens + merges (special tokens come on top)
    n_ctx_train: int = 512
    rope_theta: float = 10000.0
    seed: int = 0
    dtype: str = "F32"  # one of WRITE_DTYPES
    logit_std: float = 3.0  # target std of the output logits over the vocabulary
    router_scale: float = 2.0  # std of the router logits (higher: peakier routing)
    tied_output: bool | None = None  # None: tied for granitemoe, separate output otherwise
    # granitemoe multipliers (non-trivial on purpose)
    attention_scale: float = 0.09
    embedding_scale: float = 12.0
    residual_scale: float = 0.22
    logit_scale: float = 6.0
    # phimoe longrope-style settings (llama.cpp uses rope_factors_short while n_ctx <= n_ctx_train)
    rope_attn_factor: float = 1.19
    # deepseek2: MLA in llama.cpp's absorbed form (attn_kv_a_mqa, attn_k_b, attn_v_b; head_count_kv 1)
    kv_lora_rank: int = 32
    q_lora_rank: int = 0  # 0: V2-Lite form (attn_q); > 0: attn_q_a + norm + attn_q_b
    qk_rope_dim: int = 16  # rope part of a q/k head (rope.dimension_count)
    qk_nope_dim: int = 32  # non-rope part of a q/k head
    v_head_dim: int = 32
    n_leading_dense: int = 0  # first layers with a dense SwiGLU FFN (ffn_gate/up/down)
    n_ff_dense: int = 96  # their width (feed_forward_length)
    n_shared_expert: int = 1  # ungated shared block of width n_shared_expert * n_ff_exp
    expert_gating_func: int = 1  # 1 softmax, 2 sigmoid (V3)
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0
    exp_probs_b: bool = False  # V3 selection bias exp_probs_b.bias
    n_expert_groups: int = 0  # > 1: group-limited selection (V3)
    n_group_used: int = 0
    # gpt-oss: sliding window on layers 0, 2, 4, ... (llama.cpp's default pattern 2)
    sliding_window: int = 8
    # rope scaling written by deepseek2/gpt-oss files: yarn when rope_scaling_factor > 0
    rope_scaling_factor: float = 0.0
    rope_orig_ctx: int = 128  # rope.scaling.original_context_length
    yarn_log_multiplier: float = 0.0  # deepseek2 file value (0.1 * mscale_all_dim)
    extra_kv: tuple[tuple[str, object], ...] = field(default=())

    # ---- derived -----------------------------------------------------------------------------
    @property
    def n_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def mla_k_dim(self) -> int:
        """deepseek2: true q/k head size (key_length_mla)."""
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def n_vocab(self) -> int:
        return self.vocab + N_SPECIAL

    @property
    def bos_id(self) -> int:
        return self.vocab

    @property
    def eos_id(self) -> int:
        return self.vocab + 1

    @property
    def is_tied(self) -> bool:
        return (self.arch == "granitemoe") if self.tied_output is None else self.tied_output

    def validate(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch {self.arch!r} not one of {ARCHES}")
        if self.dtype not in WRITE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not one of {sorted(WRITE_DTYPES)}")
        if self.vocab < 256:
            raise ValueError(f"vocab {self.vocab} < 256 byte tokens")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} not a multiple of n_head_kv {self.n_head_kv}")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError(f"n_expert_used {self.n_expert_used} not in 1..{self.n_expert}")
        if self.n_head_dim % 2:
            raise ValueError(f"head_dim {self.n_head_dim} must be even for rope")
        fixed_width = self.arch in ("olmoe", "qwen2moe", "phimoe")
        if fixed_width and self.n_head_dim * self.n_head != self.n_embd:
            raise ValueError(f"{self.arch}: llama.cpp requires head_dim * n_head == n_embd")
        if self.arch == "olmoe" and self.n_head_kv != self.n_head:
            # llama.cpp creates attn_k_norm with n_embd elements and applies it to the full K
            raise ValueError(
                "olmoe: llama.cpp's full-width k_norm requires n_head_kv == n_head (SynthSpec.tiny('olmoe') sets it)"
            )
        if self.is_tied and self.arch not in _TIE_OK:
            raise ValueError(f"{self.arch}: llama.cpp requires output.weight (no tied output)")
        if self.arch == "deepseek2":
            if self.n_head_kv != 1:
                raise ValueError("deepseek2: MLA files have head_count_kv 1 (SynthSpec.tiny sets it)")
            if self.qk_rope_dim % 2 or self.qk_nope_dim < 1:
                raise ValueError("deepseek2: qk_rope_dim must be even and qk_nope_dim >= 1")
            if not 0 <= self.n_leading_dense < self.n_layer:
                raise ValueError("deepseek2: n_leading_dense must leave at least one MoE layer")
        if self.n_expert_groups > 1:
            if self.arch != "deepseek2":
                raise ValueError("expert groups: deepseek2 only")
            if (
                self.n_expert % self.n_expert_groups
                or self.n_expert // self.n_expert_groups < 2
                or not 0 < self.n_group_used < self.n_expert_groups
            ):
                raise ValueError(
                    "expert groups: n_expert must split into groups of >= 2 and 0 < n_group_used < n_expert_groups"
                )

    @classmethod
    def tiny(cls, arch: str, **kw) -> "SynthSpec":
        """Small F32 model (< 1 MB) with valid shapes for `arch`."""
        base = dict(arch=arch)
        if arch == "olmoe":
            base["n_head_kv"] = 4
        base.update(_ARCH_DEFAULTS.get(arch, {}))
        base.update(kw)
        return cls(**base)

    @classmethod
    def for_quant(cls, arch: str, **kw) -> "SynthSpec":
        """F16 model whose rows are multiples of 256 (K-quants, MXFP4) and that stays < 5 MB."""
        base = dict(
            arch=arch,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            n_expert=4,
            n_expert_used=2,
            n_ff_exp=256,
            n_ff_shexp=256,
            n_layer=2,
            dtype="F16",
        )
        if arch == "olmoe":
            base["n_head_kv"] = 4
        base.update(_ARCH_DEFAULTS.get(arch, {}))
        if arch == "deepseek2":  # rows of 256 where llama.cpp's quantizer meets them
            base.update(kv_lora_rank=256, qk_rope_dim=32, qk_nope_dim=64, v_head_dim=64, n_ff_dense=256)
        base.update(kw)
        return cls(**base)


# per-arch defaults of SynthSpec.tiny / for_quant
_ARCH_DEFAULTS: dict[str, dict] = {
    "deepseek2": dict(n_head_kv=1),
    # yarn as in the released gpt-oss files (there: factor 32, original context 4096)
    "gpt-oss": dict(rope_scaling_factor=4.0, rope_orig_ctx=128, rope_theta=150000.0),
}
