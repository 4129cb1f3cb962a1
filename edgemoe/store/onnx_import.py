"""ONNX MoE decoder models -> the same tensors and metadata as a llama.cpp GGUF, for `convert`.

`OnnxSource(path)` opens an ONNX decoder (weights inside the file or in external data files beside
it) and presents it with the interface `convert` reads from a `GGUFFile`: `metadata`,
`tensors` (llama.cpp names, numpy shapes = reversed GGUF shapes), `tensor`, `maybe`, `get`,
`require`, `architecture`, `copy_metadata`, `close`. The store written from it is the store of the
corresponding GGUF: dense.gguf with llama.cpp tensor names and metadata, nested expert planes.

Recognised layouts (docs/onnx.md):
- onnxruntime-genai model-builder style names: a layer index from `layers.N` / `layers_N` in the
  node or initializer name, and the HF module names `embed_tokens`, `input_layernorm`,
  `post_attention_layernorm`, `q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`,
  `gate` / `router` (the router), `experts.E.{gate_proj,up_proj,down_proj}` (or w1, w3, w2),
  qwen2_moe's `shared_expert.{gate_proj,up_proj,down_proj}` and `shared_expert_gate`, the q/k/v/o
  projection biases (a 1-D initializer added to the projection's output), `norm` / `final_norm`,
  `lm_head`;
- weights as MatMul initializers ([in, out], transposed here), Gemm (transB), Gather (the
  embedding), MatMulNBits (2/4/8 bits, block-wise, with or without zero points: dequantized here),
  norm weights of (Skip)SimplifiedLayerNormalization / RMSNormalization / Mul;
- experts packed in one com.microsoft MoE (float, fc1 = gate, fc3 = up, fc2 = down, or fc1 = fused
  interleaved / concatenated gate|up for SwiGLU) or QMoE (int 4/8 bits, per-row or block-wise scales)
  node per layer; the router is the MatMul feeding its router_probs.
Everything else (a weight of unknown role, an unsupported op holding weights, an activation other
than SiLU-gated) is one EdgeMoEError naming the file and what was not understood.

Hyperparameters come from config.json (HF) beside the model, completed by genai_config.json.

The graph and its weights are read by onnx_graph, weights are named by onnx_map, MoE / QMoE nodes
are mapped by onnx_moe; this module reads the configuration, writes the metadata and is the
GGUFFile face.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeMoEError
from ..models.gguf_file import Tensor, add_scalar_kv
from .onnx_graph import OnnxGraph
from .onnx_map import TensorMap

# HF model_type / genai "type" -> llama.cpp architecture
MODEL_TYPES = {
    "qwen3_moe": "qwen3moe",
    "qwen3moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "qwen2moe": "qwen2moe",
    "mixtral": "llama",
    "olmoe": "olmoe",
}
# llama.cpp's per-architecture RMS epsilon default when the config has none
_EPS_DEFAULT = {"qwen3moe": 1e-6, "qwen2moe": 1e-6, "llama": 1e-5, "olmoe": 1e-5}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_onnx(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() == ".onnx"


class OnnxSource:
    """An ONNX MoE decoder seen as a llama.cpp GGUF (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.graph = OnnxGraph(path)
        self.path = self.graph.path
        self.file_size = self.path.stat().st_size
        self.in_memory = False
        self.extra_files = [self.path.parent / f for f in TOKENIZER_FILES if (self.path.parent / f).is_file()]
        cfg = self._config()
        mapped = TensorMap(self.graph, cfg, self.arch)
        self.tensors: dict[str, Tensor] = mapped.tensors
        self._expert_bits = mapped.expert_bits
        self._moe_attrs = mapped.moe_attrs
        self.metadata = self._metadata(cfg)

    # ---- configuration ------------------------------------------------------------------------

    def _err(self, what: str) -> EdgeMoEError:
        return self.graph.err(what)

    def _config(self) -> dict:
        cfg: dict = {}
        genai: dict = {}
        for name in ("config.json", "genai_config.json"):
            p = self.path.parent / name
            if p.is_file():
                try:
                    data = json.loads(p.read_text())
                except (OSError, ValueError) as exc:
                    raise EdgeMoEError(f"{p}: unreadable ({exc})") from None
                if name == "config.json":
                    cfg = data
                else:
                    genai = data.get("model", {})
        dec = genai.get("decoder", {})
        for k_hf, v in (
            ("hidden_size", dec.get("hidden_size")),
            ("num_attention_heads", dec.get("num_attention_heads")),
            ("num_key_value_heads", dec.get("num_key_value_heads")),
            ("head_dim", dec.get("head_size")),
            ("num_hidden_layers", dec.get("num_hidden_layers")),
            ("vocab_size", genai.get("vocab_size")),
            ("max_position_embeddings", genai.get("context_length")),
            ("bos_token_id", genai.get("bos_token_id")),
            ("eos_token_id", genai.get("eos_token_id")),
            ("model_type", genai.get("type")),
        ):
            if v is not None and k_hf not in cfg:
                cfg[k_hf] = v
        if not cfg:
            raise self._err(
                "no config.json or genai_config.json beside the model: the hyperparameters "
                "(heads, rope, experts) are not in the ONNX graph"
            )
        mt = cfg.get("model_type")
        if mt not in MODEL_TYPES:
            raise self._err(
                f"model_type {mt!r} is not supported for ONNX import; supported: {', '.join(sorted(set(MODEL_TYPES)))}"
            )
        self.arch = MODEL_TYPES[mt]
        return cfg

    # ---- metadata -----------------------------------------------------------------------------

    def _metadata(self, cfg: dict) -> dict[str, Any]:
        a = self.arch
        n_layer = int(cfg["num_hidden_layers"])
        n_embd = int(cfg["hidden_size"])
        n_head = int(cfg["num_attention_heads"])
        first = (
            f"blk.{min(int(k.split('.')[1]) for k in self.tensors if k.endswith('ffn_gate_exps.weight'))}."
            if any(k.endswith("ffn_gate_exps.weight") for k in self.tensors)
            else None
        )
        if first is None:
            raise self._err("no experts found (no MoE/QMoE node and no experts.N.*_proj weights)")
        n_expert = int(
            cfg.get("num_experts", cfg.get("num_local_experts", 0))
            or self.tensors[first + "ffn_gate_exps.weight"].shape[2]
        )
        k = int(cfg.get("num_experts_per_tok", 0) or self._moe_attrs.get("k", 0))
        if not k:
            raise self._err("the number of experts per token (num_experts_per_tok) is not in config.json")
        if "output.weight" not in self.tensors and cfg.get("tie_word_embeddings") is False:
            raise self._err("no lm_head weight found and tie_word_embeddings is false")
        head_dim = int(cfg.get("head_dim") or n_embd // n_head)
        md: dict[str, Any] = {
            "general.architecture": a,
            "general.name": self.path.stem,
            f"{a}.block_count": n_layer,
            f"{a}.context_length": int(cfg.get("max_position_embeddings", 4096)),
            f"{a}.embedding_length": n_embd,
            f"{a}.attention.head_count": n_head,
            f"{a}.attention.head_count_kv": int(cfg.get("num_key_value_heads", n_head)),
            f"{a}.attention.key_length": head_dim,
            f"{a}.attention.value_length": head_dim,
            f"{a}.rope.dimension_count": head_dim,
            f"{a}.rope.freq_base": float(cfg.get("rope_theta", 10000.0)),
            f"{a}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", _EPS_DEFAULT[a])),
            f"{a}.expert_count": n_expert,
            f"{a}.expert_used_count": k,
            f"{a}.expert_feed_forward_length": int(self.tensors[first + "ffn_gate_exps.weight"].shape[1]),
            "edgemoe.source_format": "onnx",
        }
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            v = cfg.get(hf)
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                md[f"tokenizer.ggml.{key}"] = int(v)
        rs = cfg.get("rope_scaling")
        if rs and rs.get("type", rs.get("rope_type")) not in (None, "default"):
            raise self._err(f"rope_scaling {rs!r} is not supported for ONNX import")
        if a == "qwen3moe" and cfg.get("norm_topk_prob") is False:
            raise self._err("qwen3_moe with norm_topk_prob false is not what llama.cpp's qwen3moe computes")
        if a == "qwen2moe":
            if cfg.get("norm_topk_prob") is True:
                raise self._err("qwen2_moe with norm_topk_prob true is not what llama.cpp's qwen2moe computes")
            sh = self.tensors.get(first + "ffn_gate_shexp.weight")
            if sh is None:
                raise self._err("qwen2_moe without shared_expert weights")
            md[f"{a}.expert_shared_feed_forward_length"] = int(sh.shape[1])
        return md

    # ---- the GGUFFile interface ---------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return self.arch

    @property
    def expert_bits(self) -> float | None:
        """Bits per weight of quantized source experts (None: float)."""
        return self._expert_bits

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise self._err(f"metadata {key} is missing (not in config.json)")
        return self.metadata[key]

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._err(f"no weight maps to {name}") from None

    def maybe(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def copy_metadata(self, writer, skip: tuple[str, ...] = ("general.architecture", "general.alignment")) -> None:
        for k, v in self.metadata.items():
            if k not in skip:
                add_scalar_kv(writer, k, v)

    def release(self, arr: np.ndarray) -> None:
        """GGUFFile.release's counterpart: nothing to hand back (weights inside the .onnx file are
        parsed into memory with the graph; external data is mapped by each expert's reads)."""

    def close(self) -> None:
        self.tensors = {}
        self.graph.close()
