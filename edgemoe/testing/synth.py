"""Synthetic Mixture-of-Experts GGUF files that llama.cpp loads, for tests and benchmarks.

`write_model(SynthSpec(arch=...), path)` writes a small random model with llama.cpp's tensor
names and metadata keys for one of the MoE architectures below; `quantize_model` re-quantizes it
with llama.cpp's own quantizer (K-quants, MXFP4) and reports the types actually written.
docs/architectures.md describes what llama.cpp computes with each of these files.

This module writes the metadata and the file, and quantizes; its parts: spec.py (SynthSpec, the
model's shape and options), vocab.py (the tokenizer), weights.py (the random tensors and their
encoding). Their public names are importable from here.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from ..models.gguf_file import add_scalar_kv
from .spec import ARCHES, N_SPECIAL, WRITE_DTYPES, SynthSpec
from .vocab import add_tokenizer, build_vocab
from .weights import _encode, _tensors

__all__ = [
    "ARCHES",
    "N_SPECIAL",
    "QUANT_FTYPES",
    "WRITE_DTYPES",
    "SynthSpec",
    "add_tokenizer",
    "build_vocab",
    "quantize_model",
    "summarize_types",
    "tensor_types",
    "write_model",
]

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
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "Q2_K_S": 21,
    "IQ3_XS": 22,
    "IQ3_XXS": 23,
    "IQ1_S": 24,
    "IQ4_NL": 25,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ4_XS": 30,
    "IQ1_M": 31,
    "BF16": 32,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "MXFP4_MOE": 38,
}


def quantize_model(
    src_path: str | os.PathLike, dst_path: str | os.PathLike, ftype: str, nthread: int = 2, requantize: bool = False
) -> dict[str, str]:
    """Quantize a GGUF file with llama.cpp (llama_model_quantize) and return the tensor types
    actually written, {tensor_name: type_name}, read back with gguf.GGUFReader.

    llama.cpp chooses per-tensor types itself (routers and norms stay F32, attn_k/attn_v and
    output get higher-precision types, shapes that do not fit a K-quant fall back), so callers
    should look at the returned map rather than assume `ftype` everywhere. requantize: the source
    may itself be quantized (llama.cpp's allow_requantize; it dequantizes first).
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
        params.allow_requantize = requantize
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
