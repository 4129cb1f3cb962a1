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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import EdgeMoEError
from ..models.gguf_file import Tensor, add_scalar_kv

Q = gguf.GGMLQuantizationType

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
_BIASED = ("attn_q", "attn_k", "attn_v", "attn_output")  # projections whose Add bias is imported
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_LAYER_RE = re.compile(r"layers?[./_](\d+)(?:[./_]|$)")
_EXPERT_RE = re.compile(r"experts?[./_](\d+)(?:[./_]|$)")
_WEIGHT_OPS = {
    "MatMul",
    "Gemm",
    "Gather",
    "MatMulNBits",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "Mul",
    "MoE",
    "QMoE",
    "LayerNormalization",
    "SkipLayerNormalization",
    "GatherBlockQuantized",
}
_IGNORED_NAMES = ("cos_cache", "sin_cache", "inv_freq", "rotary", "causal_mask", "position")


def is_onnx(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() == ".onnx"


class _LazyStack:
    """A stacked [E, n_out, n_in] float32 expert tensor computed one expert at a time."""

    def __init__(self, shape: tuple[int, int, int], get):
        self.shape = shape
        self._get = get
        self.dtype = np.dtype(np.float32)
        self.nbytes = int(np.prod(shape)) * 4

    def __getitem__(self, e):
        return self._get(int(e))


@dataclass
class _Use:
    op: str
    node: str
    index: int  # input slot
    attrs: dict


def dequant_nbits(
    b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, bits: int, block: int
) -> np.ndarray:
    """MatMulNBits / QMoE block-wise weights -> float32 [n, k]: w = (q - zp) * scale, codes packed
    low bits first; zp packed like B (uint8) or unpacked floats; default zp 2^(bits-1)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit weights")
    per = 8 // bits
    raw = np.asarray(b, dtype=np.uint8).reshape(n, -1)
    q = np.stack([(raw >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1).reshape(n, -1)
    nb = -(-k // block)
    q = q[:, : nb * block].astype(np.float32).reshape(n, nb, block)
    s = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zp is None:
        z = np.full((n, nb), float(1 << (bits - 1)), np.float32)
    elif zp.dtype == np.uint8:
        zr = zp.reshape(n, -1)
        z = np.stack([(zr >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1).reshape(n, -1)
        z = z[:, :nb].astype(np.float32)
    else:
        z = np.asarray(zp, dtype=np.float32).reshape(n, nb)
    w = (q - z[..., None]) * s[..., None]
    return w.reshape(n, nb * block)[:, :k]


class OnnxSource:
    """An ONNX MoE decoder seen as a llama.cpp GGUF (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise EdgeMoEError(
                f"{path}: reading ONNX models needs the onnx package (pip install 'edgemoe[onnx]')"
            ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeMoEError(f"{self.path}: no such file")
        self.file_size = self.path.stat().st_size
        self.in_memory = False
        self._nh = numpy_helper
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise EdgeMoEError(f"{self.path}: not a readable ONNX model ({exc})") from None
        self._model = model
        g = model.graph
        self._inits = {t.name: t for t in g.initializer}
        self._consts: dict[str, Any] = {}
        for node in g.node:  # Constant nodes holding weights count as initializers
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self._inits[node.output[0]] = a.t
        self._uses: dict[str, list[_Use]] = {}
        self._producer: dict[str, Any] = {}
        for node in g.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for j, x in enumerate(node.input):
                if x:
                    self._uses.setdefault(x, []).append(_Use(node.op_type, node.name, j, attrs))
            for o in node.output:
                self._producer[o] = node
        self.extra_files = [self.path.parent / f for f in TOKENIZER_FILES if (self.path.parent / f).is_file()]
        cfg = self._config()
        self.tensors: dict[str, Tensor] = {}
        self._expert_bits: float | None = None
        self._map(cfg)
        self.metadata = self._metadata(cfg)

    # ---- reading ------------------------------------------------------------------------------

    def _err(self, what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{self.path}: {what}")

    def _array(self, name: str) -> np.ndarray:
        t = self._inits.get(name)
        if t is None:
            raise self._err(f"input {name!r} is not an initializer (weights computed at run time are not supported)")
        try:
            if t.data_location == 1:  # EXTERNAL: a read-only memory map of the data file
                from onnx.helper import tensor_dtype_to_np_dtype

                info = {e.key: e.value for e in t.external_data}
                loc = (self.path.parent / info["location"]).resolve()
                dtype = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
                count = int(np.prod(t.dims))
                size = loc.stat().st_size
                off = int(info.get("offset", 0))
                if off + count * dtype.itemsize > size:
                    raise ValueError(
                        f"{loc.name} is truncated: {name} needs bytes {off}..{off + count * dtype.itemsize}, "
                        f"the file has {size}"
                    )
                return np.memmap(loc, dtype=dtype, mode="r", offset=off, shape=tuple(int(d) for d in t.dims))
            return self._nh.to_array(t)
        except (OSError, ValueError, KeyError) as exc:
            raise self._err(f"cannot read weight {name!r} ({exc})") from None

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

    # ---- mapping ------------------------------------------------------------------------------

    def _weight(self, name: str, use: _Use) -> np.ndarray:
        """A 2-D weight as numpy [n_out, n_in] (or a 1-D norm weight), from its consuming node."""
        if use.op == "MatMul" and use.index == 1:
            return np.ascontiguousarray(_float(self._array(name)).T)
        if use.op == "Gemm" and use.index == 1:
            w = _float(self._array(name))
            return np.ascontiguousarray(w if use.attrs.get("transB", 0) else w.T)
        if use.op == "MatMulNBits" and use.index == 1:
            node = self._node(use.node)
            a = use.attrs
            scales = self._array(node.input[2])
            zp = self._array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            return dequant_nbits(
                self._array(name), scales, zp, int(a["N"]), int(a["K"]), int(a.get("bits", 4)), int(a["block_size"])
            )
        if use.op == "Gather" and use.index == 0:
            return np.ascontiguousarray(_float(self._array(name)))
        if (
            use.op
            in (
                "SimplifiedLayerNormalization",
                "SkipSimplifiedLayerNormalization",
                "RMSNormalization",
                "Mul",
                "LayerNormalization",
            )
            and use.index >= 1
        ):
            return self._array(name).astype(np.float32).reshape(-1)
        raise self._err(
            f"weight {name!r} is used as input {use.index} of a {use.op} node {use.node!r}: "
            "this layout is not understood"
        )

    def _node(self, name: str):
        for node in self._model.graph.node:
            if node.name == name:
                return node
        raise self._err(f"node {name!r} not found")

    def _put(self, name: str, arr) -> None:
        if name in self.tensors:
            raise self._err(f"two weights map to {name} (the second: {arr!r:.60})")
        shape = tuple(int(d) for d in reversed(arr.shape))
        if arr.dtype == np.float16 and arr.ndim == 1:  # norms and biases: F32 as llama.cpp has them
            arr = arr.astype(np.float32)
        self.tensors[name] = Tensor(name, Q.F16 if arr.dtype == np.float16 else Q.F32, shape, arr)

    def _map(self, cfg: dict) -> None:
        experts: dict[tuple[int, str], dict[int, tuple[str, _Use]]] = {}
        moe_nodes = [n for n in self._model.graph.node if n.op_type in ("MoE", "QMoE")]
        moe_inputs = {x for n in moe_nodes for x in n.input[2:] if x}
        router_for: dict[str, int] = {}
        for node in moe_nodes:
            layer = self._layer_of(node.name + "|" + "|".join(node.output))
            rp = self._producer.get(node.input[1])
            w = self._router_weight(rp) if rp is not None else None
            if w is None:
                raise self._err(
                    f"{node.op_type} node {node.name!r}: its router_probs do not come from a MatMul "
                    "with a weight initializer"
                )
            router_for[w] = layer
            self._map_moe_node(node, layer)
        skipped = []
        for name in self._inits:
            if name in moe_inputs:
                continue
            bias = next((u for u in self._uses.get(name, []) if u.op == "Add"), None)
            if bias is not None and len(self._inits[name].dims) == 1 and int(self._inits[name].dims[0]) > 1:
                role = self._role((bias.node + "|" + name).lower())
                if role is not None and role[1] in _BIASED and role[0] >= 0:  # qwen2's q/k/v biases
                    self._put(f"blk.{role[0]}.{role[1]}.bias", _float(self._array(name)))
                    continue
            uses = [u for u in self._uses.get(name, []) if u.op in _WEIGHT_OPS]
            if not uses:
                continue
            use = next((u for u in uses if u.op == "Gather"), uses[0])
            if use.op == "MatMulNBits" and use.index != 1:
                continue  # scales / zero points: read with their B
            if use.op in ("Mul", "Add", "Div") and int(np.prod(self._inits[name].dims)) <= 1:
                continue  # scalar constants
            key = (use.node + "|" + name).lower()
            if any(s in key for s in _IGNORED_NAMES):
                continue
            if name in router_for:
                self._put(f"blk.{router_for[name]}.ffn_gate_inp.weight", self._weight(name, use))
                continue
            role = self._role(key)
            if role is None:
                skipped.append(f"{name} ({use.op} {use.node!r})")
                continue
            layer, what = role
            if what.startswith("exp."):
                _, e, m = what.split(".")
                experts.setdefault((layer, m), {})[int(e)] = (name, use)
                continue
            w = self._weight(name, use)
            if what == "attn_qkv":  # the model builder's packed Q|K|V projection
                hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
                nq = int(cfg["num_attention_heads"]) * hd
                nkv = int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])) * hd
                if w.shape[0] != nq + 2 * nkv:
                    raise self._err(f"packed qkv weight {name!r} has {w.shape[0]} rows, expected {nq}+2x{nkv}")
                parts = {"attn_q": w[:nq], "attn_k": w[nq : nq + nkv], "attn_v": w[nq + nkv :]}
                for part, pw in parts.items():
                    if part in ("attn_q", "attn_k") and self.arch == "llama":
                        pw = _permute_rope(pw, nq // hd if part == "attn_q" else nkv // hd)
                    self._put(f"blk.{layer}.{part}.weight", np.ascontiguousarray(pw))
                continue
            if what in ("attn_q", "attn_k") and self.arch == "llama":
                w = _permute_rope(
                    w,
                    int(cfg["num_attention_heads"])
                    if what == "attn_q"
                    else int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
                )
            self._put(what if layer < 0 else f"blk.{layer}.{what}.weight", w)
        if skipped:
            raise self._err(
                "weights of unknown role (not an embedding, attention, norm, router, expert or "
                f"output weight by name): {', '.join(skipped[:6])}"
                + (f" and {len(skipped) - 6} more" if len(skipped) > 6 else "")
            )
        for (layer, m), by_e in sorted(experts.items()):
            n_e = len(by_e)
            if sorted(by_e) != list(range(n_e)):
                raise self._err(f"layer {layer} {m} experts are numbered {sorted(by_e)}, expected 0..{n_e - 1}")
            first = self._weight(*by_e[0])
            self._put(
                f"blk.{layer}.ffn_{m}_exps.weight",
                _LazyStack((n_e, *first.shape), lambda e, d=by_e: self._weight(*d[e])),
            )
            uses = by_e[0][1]
            if uses.op == "MatMulNBits":
                self._expert_bits = float(uses.attrs.get("bits", 4))
        if "output.weight" not in self.tensors and "token_embd.weight" not in self.tensors:
            raise self._err("no embedding (embed_tokens) found")

    def _router_weight(self, node) -> str | None:
        """The initializer of the MatMul / MatMulNBits / Gemm computing router logits (through
        Reshape, Cast and the like)."""
        for _ in range(4):
            if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
                return node.input[1] if node.input[1] in self._inits else None
            prev = self._producer.get(node.input[0]) if node.input else None
            if prev is None:
                return None
            node = prev
        return None

    def _layer_of(self, key: str) -> int:
        m = _LAYER_RE.search(key)
        if m is None:
            raise self._err(f"cannot tell the layer of {key!r} (no layers.N in its name)")
        return int(m.group(1))

    @staticmethod
    def _role(key: str) -> tuple[int, str] | None:
        if "embed_tokens" in key or "wte" in key:
            return -1, "token_embd.weight"
        if "lm_head" in key:
            return -1, "output.weight"
        m = _LAYER_RE.search(key)
        if m is None:
            return (-1, "output_norm.weight") if re.search(r"(^|[./_|])(final_)?norm", key) else None
        layer = int(m.group(1))
        if "shared_expert_gate" in key:  # qwen2moe: sigmoid gate of the shared expert
            return layer, "ffn_gate_inp_shexp"
        if "shared_expert" in key:
            for mat in ("gate", "up", "down"):
                if re.search(rf"[./_]{mat}_proj([./_]|$)", key):
                    return layer, f"ffn_{mat}_shexp"
            return None
        ex = _EXPERT_RE.search(key)
        if ex is not None:
            for mat, names in (("gate", ("gate_proj", "w1")), ("up", ("up_proj", "w3")), ("down", ("down_proj", "w2"))):
                if any(re.search(rf"[./_]{n}([./_]|$)", key) for n in names):
                    return layer, f"exp.{ex.group(1)}.{mat}"
            return None
        for pat, what in (
            ("post_attention_layernorm", "ffn_norm"),
            ("input_layernorm", "attn_norm"),
            ("q_norm", "attn_q_norm"),
            ("k_norm", "attn_k_norm"),
            ("qkv_proj", "attn_qkv"),
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        ):
            if pat in key:
                return layer, what
        if "final_norm" in key:
            return -1, "output_norm.weight"
        if re.search(r"[./_](gate|router)([./_]|$)", key) and "shared" not in key:
            return layer, "ffn_gate_inp"
        return None

    def _map_moe_node(self, node, layer: int) -> None:
        a = {x.name: __import__("onnx").helper.get_attribute_value(x) for x in node.attribute}
        act = a.get("activation_type", b"relu")
        act = act.decode() if isinstance(act, bytes) else act
        ins = list(node.input) + [""] * 20
        quant = node.op_type == "QMoE"
        if quant:
            fc = {"fc1": (ins[2], ins[3], ins[11]), "fc2": (ins[5], ins[6], ins[12]), "fc3": (ins[8], ins[9], ins[13])}
            if any(ins[i] for i in (4, 7, 10)):
                raise self._err(f"QMoE node {node.name!r}: expert biases are not supported")
            qt = a.get("quant_type", b"int")
            qt = qt.decode() if isinstance(qt, bytes) else qt
            if qt != "int":
                raise self._err(f"QMoE node {node.name!r}: quant_type {qt!r} is not supported (only 'int')")
            bits = int(a.get("expert_weight_bits", 4))
            block = int(a.get("block_size", 0) or 0)
            self._expert_bits = float(bits)
        else:
            fc = {"fc1": (ins[2], "", ""), "fc2": (ins[4], "", ""), "fc3": (ins[6], "", "")}
            if any(ins[i] for i in (3, 5, 7)):
                raise self._err(f"MoE node {node.name!r}: expert biases are not supported")
        fusion = int(a.get("swiglu_fusion", 0))
        if act == "silu" and fc["fc3"][0] and fusion == 0:
            fused = 0
        elif (
            act == "swiglu"
            and fusion in (1, 2)
            and not fc["fc3"][0]
            and float(a.get("activation_alpha", 1.0)) == 1.0
            and float(a.get("activation_beta", 0.0)) == 0.0
            and "swiglu_limit" not in a
        ):
            fused = fusion
        else:
            raise self._err(
                f"{node.op_type} node {node.name!r}: activation {act!r} (swiglu_fusion={fusion}, "
                f"fc3 {'given' if fc['fc3'][0] else 'absent'}) is not understood; supported: "
                "silu with fc1 = gate, fc3 = up; swiglu with swiglu_fusion 1 or 2, alpha 1, beta 0"
            )
        cache: dict[tuple[str, int], np.ndarray] = {}

        def get(which: str, e: int) -> np.ndarray:
            w, s, z = fc[which]
            key = (which, e)
            if key in cache:
                return cache[key]
            if not quant:
                arr = self._expert_slice(w, e).astype(np.float32)
            else:
                raw = self._expert_slice(w, e)
                n = raw.shape[0]
                k = raw.shape[1] * 8 // bits
                sc = self._expert_slice(s, e)
                zp = self._expert_slice(z, e) if z else None
                arr = dequant_nbits(raw, sc, zp, n, k, bits, block or k)
            cache.clear()
            cache[key] = arr
            return arr

        E = int(self._init_dims(fc["fc1"][0])[0])
        f1 = get("fc1", 0)
        down0 = get("fc2", 0)
        if fused:
            F = f1.shape[0] // 2

            def split(e: int, half: int) -> np.ndarray:
                w = get("fc1", e)
                return np.ascontiguousarray(w[half::2] if fused == 1 else w[half * F : (half + 1) * F])

            gate = _LazyStack((E, F, f1.shape[1]), lambda e: split(e, 0))
            up = _LazyStack((E, F, f1.shape[1]), lambda e: split(e, 1))
        else:
            gate = _LazyStack((E, *f1.shape), lambda e: get("fc1", e))
            up = _LazyStack((E, *f1.shape), lambda e: get("fc3", e))
        self._put(f"blk.{layer}.ffn_gate_exps.weight", gate)
        self._put(f"blk.{layer}.ffn_up_exps.weight", up)
        self._put(f"blk.{layer}.ffn_down_exps.weight", _LazyStack((E, *down0.shape), lambda e: get("fc2", e)))
        self._moe_attrs = a

    def _init_dims(self, name: str) -> tuple[int, ...]:
        t = self._inits.get(name)
        if t is None:
            raise self._err(f"MoE weight {name!r} is not an initializer")
        return tuple(int(d) for d in t.dims)

    def _expert_slice(self, name: str, e: int) -> np.ndarray:
        if name not in self._consts:
            while len(self._consts) >= 9:  # one layer's fc1/fc2/fc3 weights, scales, zero points
                self._consts.pop(next(iter(self._consts)))
            self._consts[name] = self._array(name)
        return self._consts[name][e]

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
        k = int(cfg.get("num_experts_per_tok", 0) or getattr(self, "_moe_attrs", {}).get("k", 0))
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
        self._consts = {}
        self._inits = {}


def _float(a: np.ndarray) -> np.ndarray:
    """float16 stays float16 (F16 in dense.gguf, as a GGUF converter keeps it); others -> float32."""
    return a if a.dtype == np.float16 else np.asarray(a, dtype=np.float32)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate_half) q/k rows -> llama.cpp's interleaved order (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
