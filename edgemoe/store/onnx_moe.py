"""Experts packed in one com.microsoft MoE or QMoE node per layer -> llama.cpp's stacked expert
tensors, for onnx_import.

MoE: float weights, fc1 = gate, fc3 = up, fc2 = down, or fc1 = fused interleaved
(swiglu_fusion 1) / concatenated (swiglu_fusion 2) gate|up for SwiGLU. QMoE: the same with int
4/8-bit weights, per-row or block-wise scales (dequantized here). Each stacked tensor is a
`LazyStack`: one expert is read (and dequantized) when it is indexed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .onnx_graph import LazyStack, OnnxGraph, dequant_nbits


@dataclass
class _ExpertInputs:
    """One MoE / QMoE node's expert weights: fc1/fc2/fc3 -> (weights, scales, zero points) input
    names ("" when absent); bits and block for QMoE."""

    fc: dict[str, tuple[str, str, str]]
    quant: bool
    bits: int = 0
    block: int = 0


def map_moe_node(
    graph: OnnxGraph, node, layer: int, put: Callable[[str, LazyStack], None]
) -> tuple[dict, float | None]:
    """put() the layer's ffn_{gate,up,down}_exps.weight stacks of a MoE / QMoE node; returns the
    node's attributes and the bits per weight of its experts (None: float)."""
    a = graph.attrs(node)
    act = a.get("activation_type", b"relu")
    act = act.decode() if isinstance(act, bytes) else act
    ex = _expert_inputs(graph, node, a)
    fused = _fusion(graph, node, a, act, ex.fc)
    get = _expert_reader(graph, ex)
    fc = ex.fc
    E = int(graph.init_dims(fc["fc1"][0])[0])
    f1 = get("fc1", 0)
    down0 = get("fc2", 0)
    if fused:
        F = f1.shape[0] // 2

        def split(e: int, half: int) -> np.ndarray:
            w = get("fc1", e)
            return np.ascontiguousarray(w[half::2] if fused == 1 else w[half * F : (half + 1) * F])

        gate = LazyStack((E, F, f1.shape[1]), lambda e: split(e, 0))
        up = LazyStack((E, F, f1.shape[1]), lambda e: split(e, 1))
    else:
        gate = LazyStack((E, *f1.shape), lambda e: get("fc1", e))
        up = LazyStack((E, *f1.shape), lambda e: get("fc3", e))
    put(f"blk.{layer}.ffn_gate_exps.weight", gate)
    put(f"blk.{layer}.ffn_up_exps.weight", up)
    put(f"blk.{layer}.ffn_down_exps.weight", LazyStack((E, *down0.shape), lambda e: get("fc2", e)))
    return a, float(ex.bits) if ex.quant else None


def _expert_inputs(graph: OnnxGraph, node, a: dict) -> _ExpertInputs:
    """The node's fc1/fc2/fc3 inputs (and QMoE's quantization); expert biases and quant types other
    than int are errors."""
    ins = list(node.input) + [""] * 20
    if node.op_type != "QMoE":
        if any(ins[i] for i in (3, 5, 7)):
            raise graph.err(f"MoE node {node.name!r}: expert biases are not supported")
        return _ExpertInputs({"fc1": (ins[2], "", ""), "fc2": (ins[4], "", ""), "fc3": (ins[6], "", "")}, False)
    fc = {"fc1": (ins[2], ins[3], ins[11]), "fc2": (ins[5], ins[6], ins[12]), "fc3": (ins[8], ins[9], ins[13])}
    if any(ins[i] for i in (4, 7, 10)):
        raise graph.err(f"QMoE node {node.name!r}: expert biases are not supported")
    qt = a.get("quant_type", b"int")
    qt = qt.decode() if isinstance(qt, bytes) else qt
    if qt != "int":
        raise graph.err(f"QMoE node {node.name!r}: quant_type {qt!r} is not supported (only 'int')")
    return _ExpertInputs(fc, True, int(a.get("expert_weight_bits", 4)), int(a.get("block_size", 0) or 0))


def _fusion(graph: OnnxGraph, node, a: dict, act: str, fc: dict[str, tuple[str, str, str]]) -> int:
    """0: silu with fc1 = gate, fc3 = up; 1 / 2: swiglu with fc1 = gate|up interleaved /
    concatenated. Any other activation is an error."""
    fusion = int(a.get("swiglu_fusion", 0))
    if act == "silu" and fc["fc3"][0] and fusion == 0:
        return 0
    if (
        act == "swiglu"
        and fusion in (1, 2)
        and not fc["fc3"][0]
        and float(a.get("activation_alpha", 1.0)) == 1.0
        and float(a.get("activation_beta", 0.0)) == 0.0
        and "swiglu_limit" not in a
    ):
        return fusion
    raise graph.err(
        f"{node.op_type} node {node.name!r}: activation {act!r} (swiglu_fusion={fusion}, "
        f"fc3 {'given' if fc['fc3'][0] else 'absent'}) is not understood; supported: "
        "silu with fc1 = gate, fc3 = up; swiglu with swiglu_fusion 1 or 2, alpha 1, beta 0"
    )


def _expert_reader(graph: OnnxGraph, ex: _ExpertInputs) -> Callable[[str, int], np.ndarray]:
    """get(which, e): expert e's fc weight as float32 [n_out, n_in]; the last one read is kept."""
    cache: dict[tuple[str, int], np.ndarray] = {}

    def get(which: str, e: int) -> np.ndarray:
        w, s, z = ex.fc[which]
        key = (which, e)
        if key in cache:
            return cache[key]
        if not ex.quant:
            arr = graph.expert_slice(w, e).astype(np.float32)
        else:
            raw = graph.expert_slice(w, e)
            n = raw.shape[0]
            k = raw.shape[1] * 8 // ex.bits
            sc = graph.expert_slice(s, e)
            zp = graph.expert_slice(z, e) if z else None
            arr = dequant_nbits(raw, sc, zp, n, k, ex.bits, ex.block or k)
        cache.clear()
        cache[key] = arr
        return arr

    return get
