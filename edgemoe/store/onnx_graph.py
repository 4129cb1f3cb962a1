"""Reading weights out of an ONNX graph, for onnx_import.

`OnnxGraph(path)` loads the graph (weights inside the file or in external data files beside it,
those memory-mapped), indexes its initializers (Constant nodes included), which nodes use each one
and which node produces each value, and decodes a weight by the node that consumes it: MatMul
([in, out], transposed here), Gemm (transB), Gather (the embedding), MatMulNBits (dequantized
here: `dequant_nbits`), norm weights. `LazyStack` is a stacked expert tensor read one expert at a
time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeMoEError

_NORM_OPS = (
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "Mul",
    "LayerNormalization",
)


class LazyStack:
    """A stacked [E, n_out, n_in] float32 expert tensor computed one expert at a time."""

    def __init__(self, shape: tuple[int, int, int], get):
        self.shape = shape
        self._get = get
        self.dtype = np.dtype(np.float32)
        self.nbytes = int(np.prod(shape)) * 4

    def __getitem__(self, e):
        return self._get(int(e))


@dataclass
class Use:
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


def as_float(a: np.ndarray) -> np.ndarray:
    """float16 stays float16 (F16 in dense.gguf, as a GGUF converter keeps it); others -> float32."""
    return a if a.dtype == np.float16 else np.asarray(a, dtype=np.float32)


class OnnxGraph:
    """An ONNX model's graph with its weights: `inits` (name -> TensorProto), `uses` (value name ->
    the nodes consuming it), `producer` (value name -> the node computing it)."""

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
        self._nh = numpy_helper
        self._attr_value = onnx.helper.get_attribute_value
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise EdgeMoEError(f"{self.path}: not a readable ONNX model ({exc})") from None
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self._consts: dict[str, Any] = {}
        for node in g.node:  # Constant nodes holding weights count as initializers
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.inits[node.output[0]] = a.t
        self.uses: dict[str, list[Use]] = {}
        self.producer: dict[str, Any] = {}
        for node in g.node:
            attrs = self.attrs(node)
            for j, x in enumerate(node.input):
                if x:
                    self.uses.setdefault(x, []).append(Use(node.op_type, node.name, j, attrs))
            for o in node.output:
                self.producer[o] = node

    def err(self, what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{self.path}: {what}")

    def attrs(self, node) -> dict:
        return {a.name: self._attr_value(a) for a in node.attribute}

    def array(self, name: str) -> np.ndarray:
        t = self.inits.get(name)
        if t is None:
            raise self.err(f"input {name!r} is not an initializer (weights computed at run time are not supported)")
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
            raise self.err(f"cannot read weight {name!r} ({exc})") from None

    def node(self, name: str):
        for node in self.model.graph.node:
            if node.name == name:
                return node
        raise self.err(f"node {name!r} not found")

    def weight(self, name: str, use: Use) -> np.ndarray:
        """A 2-D weight as numpy [n_out, n_in] (or a 1-D norm weight), from its consuming node."""
        if use.op == "MatMul" and use.index == 1:
            return np.ascontiguousarray(as_float(self.array(name)).T)
        if use.op == "Gemm" and use.index == 1:
            w = as_float(self.array(name))
            return np.ascontiguousarray(w if use.attrs.get("transB", 0) else w.T)
        if use.op == "MatMulNBits" and use.index == 1:
            node = self.node(use.node)
            a = use.attrs
            scales = self.array(node.input[2])
            zp = self.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            return dequant_nbits(
                self.array(name), scales, zp, int(a["N"]), int(a["K"]), int(a.get("bits", 4)), int(a["block_size"])
            )
        if use.op == "Gather" and use.index == 0:
            return np.ascontiguousarray(as_float(self.array(name)))
        if use.op in _NORM_OPS and use.index >= 1:
            return self.array(name).astype(np.float32).reshape(-1)
        raise self.err(
            f"weight {name!r} is used as input {use.index} of a {use.op} node {use.node!r}: "
            "this layout is not understood"
        )

    def router_weight(self, node) -> str | None:
        """The initializer of the MatMul / MatMulNBits / Gemm computing router logits (through
        Reshape, Cast and the like)."""
        for _ in range(4):
            if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
                return node.input[1] if node.input[1] in self.inits else None
            prev = self.producer.get(node.input[0]) if node.input else None
            if prev is None:
                return None
            node = prev
        return None

    def init_dims(self, name: str) -> tuple[int, ...]:
        t = self.inits.get(name)
        if t is None:
            raise self.err(f"MoE weight {name!r} is not an initializer")
        return tuple(int(d) for d in t.dims)

    def expert_slice(self, name: str, e: int) -> np.ndarray:
        if name not in self._consts:
            while len(self._consts) >= 9:  # one layer's fc1/fc2/fc3 weights, scales, zero points
                self._consts.pop(next(iter(self._consts)))
            self._consts[name] = self.array(name)
        return self._consts[name][e]

    def close(self) -> None:
        self._consts = {}
        self.inits = {}
