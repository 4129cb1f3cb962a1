"""Synthetic Mixture-of-Experts GGUF files that llama.cpp loads, for tests and benchmarks.

`write_model(SynthSpec(arch=...), path)` writes a small random model with llama.cpp's tensor
names and metadata keys for one of the MoE architectures below; `quantize_model` re-quantizes it
with llama.cpp's own quantizer (K-quants, MXFP4) and reports the types actually written.
docs/architectures.md describes what llama.cpp computes with each of these files.

Weights are random but not trivial: norm weights ~ 1 +- 0.2, biases where the architecture has
them, distinct experts, routers with a clear preference per token, and an output layer scaled so
the logits have a standard deviation of ~3 over the vocabulary (so argmax and KL comparisons
against llama.cpp are meaningful).

Shapes: GGUF lists dimensions innermost first; numpy arrays here are the reverse, e.g.
ffn_gate_exps is GGUF [n_embd, n_ff_exp, n_expert] = numpy (n_expert, n_ff_exp, n_embd).
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..models.gguf_file import add_scalar_kv
from ..models.tokenizer import bytes_to_unicode  # GPT-2's byte map, as llama.cpp's BPE vocab uses it

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
# llama_ftype values (include/llama.h) for general.file_type
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}

# RMS-norm epsilon the real converters write per arch
_RMS_EPS = {
    "llama": 1e-5,
    "olmoe": 1e-5,
    "qwen2moe": 1e-6,
    "qwen3moe": 1e-6,
    "granitemoe": 1e-6,
    "phimoe": 1e-5,
    "deepseek2": 1e-6,
    "gpt-oss": 1e-5,
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


# ---- tokenizer ---------------------------------------------------------------------------------

_SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. Mixture of experts models route every token to a
few experts; the router picks the top experts and the others are skipped. In the beginning there
was the word, and the word was with the model. Whitespace    matters:   tabs\tand\nnewlines too.
Café, naïve, résumé, jalapeño, Ångström, Zürich, São Paulo, déjà vu, coöperate, façade.
def main(argv):\n    return 0\n\nfor i in range(10):\n    print(i, i * i)\n
Numbers 0123456789 and 3.14159, 2.71828; emails like user@example.com and URLs https://x.org.
"""

_PRE_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def build_vocab(n_normal: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token_types) for a byte-level BPE vocab with n_normal normal tokens.

    The 256 byte tokens come in GPT-2's order (printable ASCII first, as in real GPT-2 vocabs;
    this also keeps llama.cpp's truncated log line of the first tokens valid UTF-8).
    Merges are learnt greedily on _SAMPLE_TEXT; if the text runs
    out of pairs, the remaining ids are filled with unused placeholder tokens.
    """
    enc = bytes_to_unicode()
    tokens = list(enc.values())
    words = Counter(tuple(enc[b] for b in w.encode("utf-8")) for w in _PRE_RE.findall(_SAMPLE_TEXT))
    merges: list[str] = []
    known = set(tokens)
    while len(tokens) < n_normal:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        merges.append(f"{a} {b}")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    types = [gguf.TokenType.NORMAL] * len(tokens)
    while len(tokens) < n_normal:  # filler, never produced by the tokenizer
        tokens.append(f"<unused{len(tokens)}>")
        types.append(gguf.TokenType.UNUSED)
    tokens += ["<|bos|>", "<|endoftext|>", "<|pad|>"]  # llama.cpp knows <|endoftext|> as EOG
    types += [gguf.TokenType.CONTROL] * N_SPECIAL
    return tokens, merges, [int(t) for t in types]


def add_tokenizer(w: gguf.GGUFWriter, n_normal: int) -> None:
    tokens, merges, types = build_vocab(n_normal)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_normal)
    w.add_eos_token_id(n_normal + 1)
    w.add_pad_token_id(n_normal + 2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# ---- weights -----------------------------------------------------------------------------------


def _tensors(spec: SynthSpec) -> dict[str, np.ndarray]:
    """All tensors of the model as float32 numpy arrays (numpy shape = reversed GGUF shape)."""
    rng = np.random.default_rng(spec.seed)
    a = spec.arch
    D, H, KV, hd = spec.n_embd, spec.n_head, spec.n_head_kv, spec.n_head_dim
    E, F, V = spec.n_expert, spec.n_ff_exp, spec.n_vocab
    q_dim, kv_dim = H * hd, KV * hd

    def randn(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_w(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

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

    for i in range(spec.n_layer):
        p = f"blk.{i}."
        if a == "deepseek2":
            _deepseek2_layer(t, p, i, spec, randn, norm_w, lambda: _router(rng, spec))
            continue
        if a == "gpt-oss":
            _gpt_oss_layer(t, p, spec, randn, norm_w, lambda: _router(rng, spec))
            continue
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
        t[p + "ffn_gate_inp.weight"] = _router(rng, spec)
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
    return t


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


def _add_hparams(w: gguf.GGUFWriter, spec: SynthSpec) -> None:
    a = spec.arch
    w.add_name(f"edgemoe-synth-{a}")
    w.add_file_type(_FILE_TYPE[spec.dtype])
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_freq_base(spec.rope_theta)
    if a == "deepseek2":
        # llama.cpp's absorbed MLA form: the cached K row is [kv_lora | rope], V its kv_lora part
        w.add_rope_dimension_count(spec.qk_rope_dim)
        w.add_key_length(spec.kv_lora_rank + spec.qk_rope_dim)
        w.add_value_length(spec.kv_lora_rank)
        w.add_uint32(f"{a}.attention.key_length_mla", spec.mla_k_dim)
        w.add_uint32(f"{a}.attention.value_length_mla", spec.v_head_dim)
        # required by llama.cpp unless the layer count says "Lite" (26/27 layers): 0 = no q lora
        w.add_uint32(f"{a}.attention.q_lora_rank", spec.q_lora_rank)
        w.add_uint32(f"{a}.attention.kv_lora_rank", spec.kv_lora_rank)
    else:
        w.add_rope_dimension_count(spec.n_head_dim)
        if spec.n_head_dim * spec.n_head != spec.n_embd:
            w.add_key_length(spec.n_head_dim)
            w.add_value_length(spec.n_head_dim)
    if spec.rope_scaling_factor > 0:
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        w.add_float32(f"{a}.rope.scaling.factor", spec.rope_scaling_factor)
        w.add_uint32(f"{a}.rope.scaling.original_context_length", spec.rope_orig_ctx)
        if spec.yarn_log_multiplier:
            w.add_float32(f"{a}.rope.scaling.yarn_log_multiplier", spec.yarn_log_multiplier)
    w.add_layer_norm_rms_eps(_RMS_EPS[a])
    w.add_expert_count(spec.n_expert)
    w.add_expert_used_count(spec.n_expert_used)
    if a == "deepseek2":
        w.add_expert_feed_forward_length(spec.n_ff_exp)
        w.add_feed_forward_length(spec.n_ff_dense)
        w.add_uint32(f"{a}.leading_dense_block_count", spec.n_leading_dense)
        w.add_uint32(f"{a}.expert_shared_count", spec.n_shared_expert)
        w.add_float32(f"{a}.expert_weights_scale", spec.expert_weights_scale)
        w.add_bool(f"{a}.expert_weights_norm", spec.expert_weights_norm)
        w.add_uint32(f"{a}.expert_gating_func", spec.expert_gating_func)
        if spec.n_expert_groups > 1:
            w.add_uint32(f"{a}.expert_group_count", spec.n_expert_groups)
            w.add_uint32(f"{a}.expert_group_used_count", spec.n_group_used)
    elif a == "gpt-oss":
        w.add_expert_feed_forward_length(spec.n_ff_exp)
        w.add_feed_forward_length(spec.n_ff_exp)
        w.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    elif a in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(spec.n_ff_exp)
        # converters write the dense intermediate size here; llama.cpp ignores it for these arches
        w.add_feed_forward_length(spec.n_ff_exp * spec.n_expert_used)
    else:
        w.add_feed_forward_length(spec.n_ff_exp)
    if a == "qwen2moe":
        w.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    if a == "granitemoe":
        w.add_attention_scale(spec.attention_scale)
        w.add_embedding_scale(spec.embedding_scale)
        w.add_residual_scale(spec.residual_scale)
        w.add_logit_scale(spec.logit_scale)
    if a == "phimoe":
        w.add_rope_scaling_attn_factors(spec.rope_attn_factor)
        w.add_rope_scaling_orig_ctx_len(spec.n_ctx_train)
    for k, v in spec.extra_kv:
        add_scalar_kv(w, k, v)


def write_model(spec: SynthSpec, path: str | os.PathLike) -> Path:
    """Write `spec` as a GGUF file at `path` (through a temp file and an atomic rename)."""
    spec.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, spec.arch)
        _add_hparams(w, spec)
        add_tokenizer(w, spec.vocab)
        for name, x in _tensors(spec).items():
            data, qt = _encode(name, x, spec.dtype)
            w.add_tensor(name, data, raw_dtype=qt if data.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---- llama.cpp quantization --------------------------------------------------------------------

# llama_ftype names accepted by quantize_model (values from include/llama.h)
QUANT_FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "BF16": 32,
    "MXFP4_MOE": 38,
}


def quantize_model(
    src_path: str | os.PathLike, dst_path: str | os.PathLike, ftype: str, nthread: int = 2
) -> dict[str, str]:
    """Quantize a GGUF file with llama.cpp (llama_model_quantize) and return the tensor types
    actually written, {tensor_name: type_name}, read back with gguf.GGUFReader.

    llama.cpp chooses per-tensor types itself (routers and norms stay F32, attn_k/attn_v and
    output get higher-precision types, shapes that do not fit a K-quant fall back), so callers
    should look at the returned map rather than assume `ftype` everywhere.
    """
    import llama_cpp

    if ftype not in QUANT_FTYPES:
        raise ValueError(f"ftype {ftype!r} not one of {sorted(QUANT_FTYPES)}")
    dst_path = Path(dst_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst_path.name + ".", suffix=".tmp", dir=dst_path.parent)
    os.close(fd)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_FTYPES[ftype]
        params.nthread = nthread
        rc = llama_cpp.llama_model_quantize(str(src_path).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src_path}, {ftype}) failed with {rc}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tensor_types(dst_path)


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """{tensor_name: ggml type name} of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors}


def summarize_types(types: dict[str, str]) -> dict[str, str]:
    """Collapse per-layer names (blk.N.x -> x) to one type per role; '|'-joins differing ones."""
    out: dict[str, set[str]] = {}
    for name, ty in types.items():
        out.setdefault(re.sub(r"^blk\.\d+\.", "", name), set()).add(ty)
    return {k: "|".join(sorted(v)) for k, v in sorted(out.items())}
