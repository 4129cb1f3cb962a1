"""Export a Hugging Face Qwen3MoeForCausalLM checkpoint + byte-level BPE tokenizer to GGUF (arch qwen3moe).

Written with gguf-py's GGUFWriter.  Layout follows what llama.cpp's qwen3moe loader expects:
  token_embd, output_norm, [output], blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
  attn_q_norm, attn_k_norm, ffn_norm, ffn_gate_inp, ffn_gate_exps, ffn_up_exps, ffn_down_exps}.
Shapes (numpy order, outermost first; GGUF lists them reversed):
  ffn_gate_exps / ffn_up_exps  [E, n_ff_exp, n_embd]   (GGUF [n_embd, n_ff_exp, E])
  ffn_down_exps                [E, n_embd, n_ff_exp]   (GGUF [n_ff_exp, n_embd, E])
qwen3moe uses NeoX (split-half) RoPE like HF Qwen3, so q/k rows are NOT permuted.
Norms and the router stay F32; the other matrices are F16, or Q8_0 when F16 would exceed max_bytes;
q4_k_m hands an F16 export to llama.cpp's quantizer (llama-cpp-python's llama_model_quantize).

Usage: python tools/export_qwen3moe_gguf.py HF_DIR OUT.gguf [--qtype auto|f32|f16|q8_0|q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import gguf
import numpy as np

ARCH = "qwen3moe"
# HF (transformers >= 5, fused experts) per-layer name -> GGUF per-layer name
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight")
# qtypes written by llama.cpp's quantizer (llama-cpp-python) from an F16 export: --qtype -> llama.cpp ftype
LLAMA_QUANTIZED = {"q4_k_m": "Q4_K_M"}
QTYPES = ["auto", "f32", "f16", "q8_0", *LLAMA_QUANTIZED]


def gguf_tensors(state: dict, cfg) -> list[tuple[str, np.ndarray]]:
    """HF state dict (torch tensors) -> [(gguf name, float32 array in numpy order)]."""

    def f32(t):
        return t.detach().to("cpu").float().numpy()

    out = [
        ("token_embd.weight", f32(state["model.embed_tokens.weight"])),
        ("output_norm.weight", f32(state["model.norm.weight"])),
    ]
    if not cfg.tie_word_embeddings and "lm_head.weight" in state:
        out.append(("output.weight", f32(state["lm_head.weight"])))
    n_ff = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, g_name in LAYER_MAP.items():
            out.append((f"blk.{i}.{g_name}", f32(state[p + hf_name])))
        gate_up = f32(state[p + "mlp.experts.gate_up_proj"])  # [E, 2*n_ff, n_embd]: gate rows, then up rows
        assert gate_up.shape == (cfg.num_experts, 2 * n_ff, cfg.hidden_size), gate_up.shape
        out.append((f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :n_ff])))
        out.append((f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, n_ff:])))
        out.append((f"blk.{i}.ffn_down_exps.weight", f32(state[p + "mlp.experts.down_proj"])))  # [E, n_embd, n_ff]
    return out


def tensor_type(name: str, arr: np.ndarray, qtype: str) -> gguf.GGMLQuantizationType:
    if arr.ndim < 2 or name.endswith(KEEP_F32) or qtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def encode(name: str, arr: np.ndarray, t: gguf.GGMLQuantizationType) -> np.ndarray:
    if t == gguf.GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), t)


def dequantized_state(hf_dir: Path, gguf_path: Path):
    """The HF model with the weights a GGUF file holds (dequantized), for like-for-like comparisons."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    n_ff = cfg.moe_intermediate_size
    dq = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        dq[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    inv = {v: k for k, v in LAYER_MAP.items()}
    for n, a in dq.items():
        if n == "token_embd.weight":
            state["model.embed_tokens.weight"] = torch.from_numpy(a)
        elif n == "output_norm.weight":
            state["model.norm.weight"] = torch.from_numpy(a)
        elif n == "output.weight":
            state["lm_head.weight"] = torch.from_numpy(a)
        else:
            _, i, rest = n.split(".", 2)
            p = f"model.layers.{i}."
            if rest in inv:
                state[p + inv[rest]] = torch.from_numpy(a)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        state[p + "gate_up_proj"] = torch.from_numpy(
            np.concatenate([dq[f"blk.{i}.ffn_gate_exps.weight"], dq[f"blk.{i}.ffn_up_exps.weight"]], axis=1)
        )
        state[p + "down_proj"] = torch.from_numpy(dq[f"blk.{i}.ffn_down_exps.weight"])
        assert state[p + "gate_up_proj"].shape[1] == 2 * n_ff
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model


def add_tokenizer(w: gguf.GGUFWriter, hf_dir: Path, n_vocab: int, add_bos: bool) -> None:
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = tj["model"]
    assert model["type"] == "BPE", model["type"]
    pre = tj["pre_tokenizer"]
    assert pre["type"] == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"), pre
    vocab = dict(model["vocab"])
    special = {}
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special[a["content"]] = a["id"]
    id2tok = {i: t for t, i in vocab.items()}
    assert len(id2tok) == n_vocab and set(id2tok) == set(range(n_vocab)), (len(id2tok), n_vocab)
    tokens = [id2tok[i] for i in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos, eos = vocab[tc["bos_token"]], vocab[tc["eos_token"]]
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if tc.get("pad_token") in vocab:
        w.add_pad_token_id(vocab[tc["pad_token"]])
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)


def export(
    hf_dir: Path,
    out_path: Path,
    qtype: str = "auto",
    max_bytes: int = 20 * 1024 * 1024,
    add_bos: bool = True,
    name: str = "shakespeare-moe",
) -> dict:
    import torch
    from transformers import Qwen3MoeForCausalLM

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    model = Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers, "only all-sparse qwen3moe is supported"
    assert cfg.norm_topk_prob, "llama.cpp renormalizes qwen3moe top-k weights; norm_topk_prob must be True"
    tensors = gguf_tensors(model.state_dict(), cfg)
    if qtype == "auto":
        f16_bytes = sum(
            a.size * (4 if tensor_type(n, a, "f16") == gguf.GGMLQuantizationType.F32 else 2) for n, a in tensors
        )
        qtype = "f16" if f16_bytes + 1_000_000 <= max_bytes else "q8_0"
    if qtype in LLAMA_QUANTIZED:
        # llama.cpp's own quantizer makes the file, with its per-tensor mix (Q4_K_M: Q4_K, with Q6_K for
        # some down projections, attn_v and the embedding), from an F16 export of the same checkpoint.
        from edgemoe.testing.synth import quantize_model

        f16 = out_path.with_name(out_path.name + ".f16.tmp")
        try:
            export(hf_dir, f16, "f16", max_bytes=1 << 62, add_bos=add_bos, name=name)
            quantize_model(f16, out_path, LLAMA_QUANTIZED[qtype])
        finally:
            f16.unlink(missing_ok=True)
        size = out_path.stat().st_size
        if size > max_bytes:
            out_path.unlink()
            raise ValueError(f"{out_path}: {size} bytes exceeds the {max_bytes}-byte limit with qtype {qtype}")
        types: dict[str, int] = {}
        for t in gguf.GGUFReader(str(out_path)).tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        info = {"path": str(out_path), "bytes": size, "qtype": qtype, "tensor_types": types}
        print(json.dumps(info))
        return info
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]

    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)  # unused when every layer is sparse
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    add_tokenizer(w, hf_dir, cfg.vocab_size, add_bos)

    types = {}
    for n, a in tensors:
        t = tensor_type(n, a, qtype)
        types[t.name] = types.get(t.name, 0) + 1
        w.add_tensor(n, encode(n, a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = tmp.stat().st_size
    if size > max_bytes:
        tmp.unlink()
        raise ValueError(f"{out_path}: {size} bytes exceeds the {max_bytes}-byte limit with qtype {qtype}")
    os.replace(tmp, out_path)
    info = {"path": str(out_path), "bytes": size, "qtype": qtype, "tensor_types": types, "n_tensors": len(tensors)}
    print(json.dumps(info))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--qtype", default="auto", choices=QTYPES)
    ap.add_argument("--max-mb", type=float, default=20.0, help="size limit in MiB (0 = none)")
    ap.add_argument("--no-add-bos", action="store_true")
    args = ap.parse_args(argv)
    export(
        args.hf_dir,
        args.out,
        args.qtype,
        int(args.max_mb * 1024 * 1024) if args.max_mb else 1 << 62,
        add_bos=not args.no_add_bos,
    )


if __name__ == "__main__":
    main()
