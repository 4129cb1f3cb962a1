"""An ONNX graph's weights -> llama.cpp tensor names, for onnx_import.

A weight's role comes from its name and its consuming node's name (onnxruntime-genai model-builder
style: `layers.N`, HF module names; see onnx_import's docstring); `TensorMap` puts every weight
under its llama.cpp name (numpy shapes = reversed GGUF shapes), splits the model builder's packed
Q|K|V projection, permutes llama's q/k rows, stacks per-expert weights and maps each MoE / QMoE
node (onnx_moe). A weight of unknown role is an error naming it.
"""

from __future__ import annotations

import re

import gguf
import numpy as np

from ..models.gguf_file import Tensor
from .onnx_graph import LazyStack, OnnxGraph, Use, as_float
from .onnx_moe import map_moe_node

Q = gguf.GGMLQuantizationType

_BIASED = ("attn_q", "attn_k", "attn_v", "attn_output")  # projections whose Add bias is imported
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


class TensorMap:
    """The llama.cpp tensors of an ONNX graph: `tensors` (name -> Tensor), `expert_bits` (bits per
    weight of quantized source experts; None: float), `moe_attrs` (the last MoE / QMoE node's
    attributes; empty without one)."""

    def __init__(self, graph: OnnxGraph, cfg: dict, arch: str):
        self.g = graph
        self.cfg = cfg
        self.arch = arch
        self.tensors: dict[str, Tensor] = {}
        self.expert_bits: float | None = None
        self.moe_attrs: dict = {}
        self._map()

    def _put(self, name: str, arr) -> None:
        if name in self.tensors:
            raise self.g.err(f"two weights map to {name} (the second: {arr!r:.60})")
        shape = tuple(int(d) for d in reversed(arr.shape))
        if arr.dtype == np.float16 and arr.ndim == 1:  # norms and biases: F32 as llama.cpp has them
            arr = arr.astype(np.float32)
        self.tensors[name] = Tensor(name, Q.F16 if arr.dtype == np.float16 else Q.F32, shape, arr)

    def _map(self) -> None:
        moe_inputs, router_for = self._map_moe_nodes()
        experts: dict[tuple[int, str], dict[int, tuple[str, Use]]] = {}
        skipped = []
        for name in self.g.inits:
            if name in moe_inputs or self._map_bias(name):
                continue
            found = self._weight_use(name)
            if found is None:
                continue
            use, key = found
            if name in router_for:
                self._put(f"blk.{router_for[name]}.ffn_gate_inp.weight", self.g.weight(name, use))
                continue
            role = _role(key)
            if role is None:
                skipped.append(f"{name} ({use.op} {use.node!r})")
                continue
            layer, what = role
            if what.startswith("exp."):
                _, e, m = what.split(".")
                experts.setdefault((layer, m), {})[int(e)] = (name, use)
                continue
            self._put_weight(name, use, layer, what)
        if skipped:
            raise self.g.err(
                "weights of unknown role (not an embedding, attention, norm, router, expert or "
                f"output weight by name): {', '.join(skipped[:6])}"
                + (f" and {len(skipped) - 6} more" if len(skipped) > 6 else "")
            )
        self._stack_experts(experts)
        if "output.weight" not in self.tensors and "token_embd.weight" not in self.tensors:
            raise self.g.err("no embedding (embed_tokens) found")

    def _map_moe_nodes(self) -> tuple[set[str], dict[str, int]]:
        """Map every MoE / QMoE node; returns their expert inputs (mapped here) and {router weight:
        layer} (the MatMul feeding each node's router_probs)."""
        moe_nodes = [n for n in self.g.model.graph.node if n.op_type in ("MoE", "QMoE")]
        moe_inputs = {x for n in moe_nodes for x in n.input[2:] if x}
        router_for: dict[str, int] = {}
        for node in moe_nodes:
            layer = self._layer_of(node.name + "|" + "|".join(node.output))
            rp = self.g.producer.get(node.input[1])
            w = self.g.router_weight(rp) if rp is not None else None
            if w is None:
                raise self.g.err(
                    f"{node.op_type} node {node.name!r}: its router_probs do not come from a MatMul "
                    "with a weight initializer"
                )
            router_for[w] = layer
            self.moe_attrs, bits = map_moe_node(self.g, node, layer, self._put)
            if bits is not None:
                self.expert_bits = bits
        return moe_inputs, router_for

    def _map_bias(self, name: str) -> bool:
        """Put a q/k/v/o projection's bias (a 1-D initializer added to its output: qwen2's q/k/v
        biases); False if `name` is not one."""
        bias = next((u for u in self.g.uses.get(name, []) if u.op == "Add"), None)
        if bias is None or len(self.g.inits[name].dims) != 1 or int(self.g.inits[name].dims[0]) <= 1:
            return False
        role = _role((bias.node + "|" + name).lower())
        if role is None or role[1] not in _BIASED or role[0] < 0:
            return False
        self._put(f"blk.{role[0]}.{role[1]}.bias", as_float(self.g.array(name)))
        return True

    def _weight_use(self, name: str) -> tuple[Use, str] | None:
        """The node use that says what a weight is, and the name key its role is read from; None for
        initializers that are not weights to map."""
        uses = [u for u in self.g.uses.get(name, []) if u.op in _WEIGHT_OPS]
        if not uses:
            return None
        use = next((u for u in uses if u.op == "Gather"), uses[0])
        if use.op == "MatMulNBits" and use.index != 1:
            return None  # scales / zero points: read with their B
        if use.op in ("Mul", "Add", "Div") and int(np.prod(self.g.inits[name].dims)) <= 1:
            return None  # scalar constants
        key = (use.node + "|" + name).lower()
        if any(s in key for s in _IGNORED_NAMES):
            return None
        return use, key

    def _put_weight(self, name: str, use: Use, layer: int, what: str) -> None:
        """A non-expert weight of role `what` (layer -1: a whole-model tensor, `what` its name)."""
        cfg = self.cfg
        w = self.g.weight(name, use)
        if what == "attn_qkv":  # the model builder's packed Q|K|V projection
            self._put_qkv(name, layer, w)
            return
        if what in ("attn_q", "attn_k") and self.arch == "llama":
            w = permute_rope(w, int(cfg["num_attention_heads"]) if what == "attn_q" else _n_kv_head(cfg))
        self._put(what if layer < 0 else f"blk.{layer}.{what}.weight", w)

    def _put_qkv(self, name: str, layer: int, w: np.ndarray) -> None:
        cfg = self.cfg
        hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
        nq = int(cfg["num_attention_heads"]) * hd
        nkv = _n_kv_head(cfg) * hd
        if w.shape[0] != nq + 2 * nkv:
            raise self.g.err(f"packed qkv weight {name!r} has {w.shape[0]} rows, expected {nq}+2x{nkv}")
        parts = {"attn_q": w[:nq], "attn_k": w[nq : nq + nkv], "attn_v": w[nq + nkv :]}
        for part, pw in parts.items():
            if part in ("attn_q", "attn_k") and self.arch == "llama":
                pw = permute_rope(pw, nq // hd if part == "attn_q" else nkv // hd)
            self._put(f"blk.{layer}.{part}.weight", np.ascontiguousarray(pw))

    def _stack_experts(self, experts: dict[tuple[int, str], dict[int, tuple[str, Use]]]) -> None:
        """Experts as separate weights (experts.E.*_proj) -> one lazily read stack per layer and
        matrix."""
        for (layer, m), by_e in sorted(experts.items()):
            n_e = len(by_e)
            if sorted(by_e) != list(range(n_e)):
                raise self.g.err(f"layer {layer} {m} experts are numbered {sorted(by_e)}, expected 0..{n_e - 1}")
            first = self.g.weight(*by_e[0])
            self._put(
                f"blk.{layer}.ffn_{m}_exps.weight",
                LazyStack((n_e, *first.shape), lambda e, d=by_e: self.g.weight(*d[e])),
            )
            uses = by_e[0][1]
            if uses.op == "MatMulNBits":
                self.expert_bits = float(uses.attrs.get("bits", 4))

    def _layer_of(self, key: str) -> int:
        m = _LAYER_RE.search(key)
        if m is None:
            raise self.g.err(f"cannot tell the layer of {key!r} (no layers.N in its name)")
        return int(m.group(1))


def _n_kv_head(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))


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


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate_half) q/k rows -> llama.cpp's interleaved order (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
