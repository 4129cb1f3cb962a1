"""GGUF tensors as the engine's weights: small vectors as float32, matrices as zero-copy quantized
views (repacked for ggml's faster kernels where the bytes are ours), stacked experts as one view
each."""

from __future__ import annotations

import numpy as np

from ..models.gguf_file import GGUFFile, Tensor
from ..quant import buffers, kernels


def vec(t: Tensor | None) -> np.ndarray | None:
    """Small 1-D tensors (norm weights, biases) as float32 arrays."""
    if t is None:
        return None
    if t.qtype.name == "F32":
        return np.asarray(t.data, dtype=np.float32).reshape(-1)
    if t.qtype.name == "F16":
        return np.asarray(t.data, dtype=np.float32).reshape(-1)
    w = kernels.QWeight(t.data.reshape(1, -1), t.qtype, int(np.prod(t.shape)), t.name)
    return kernels.dequantize_rows(w, np.array([0]))[0]


def mat(t: Tensor | None, gf: GGUFFile | None = None) -> kernels.QWeight | None:
    """A 2-D weight [n_out, n_in] as a zero-copy quantized view. With gf (weights used for
    matmul only), repacked for ggml's faster kernels where gf's bytes are in memory we own."""
    if t is None:
        return None
    n_in = t.shape[0]
    data = t.data.reshape(-1, t.data.shape[-1])
    return _packed(gf, t, [kernels.QWeight(data, t.qtype, n_in, t.name)])[0]


def stacked_experts(t: Tensor, gf: GGUFFile | None = None) -> list[kernels.QWeight]:
    """A stacked 3-D expert tensor (GGUF shape [n_in, n_out, E]) as one view per expert."""
    n_in = t.shape[0]
    return _packed(gf, t, [kernels.QWeight(t.data[e], t.qtype, n_in, f"{t.name}[{e}]") for e in range(t.shape[2])])


def _packed(gf: GGUFFile | None, t: Tensor, ws: list[kernels.QWeight]) -> list[kernels.QWeight]:
    """kernels.pack each weight of tensor t, once per file: the bytes are rewritten in place, so
    a second Engine over the same GGUFFile only marks its views as packed."""
    done = getattr(gf, "packed", None)
    if done is None:
        return ws
    if t.name in done:
        for w in ws:
            w.packed = True
    elif all(kernels.can_pack(w) for w in ws):
        for w in ws:
            kernels.pack(w)
        done.add(t.name)
    return ws


def rows(t: Tensor) -> np.ndarray:
    """A small 2-D tensor (stacked per-expert biases) as float32 [GGUF ne1, ne0]."""
    n_in = t.shape[0]
    if t.qtype.name in ("F32", "F16"):
        return np.asarray(t.data, dtype=np.float32).reshape(-1, n_in)
    w = kernels.QWeight(t.data.reshape(-1, t.data.shape[-1]), t.qtype, n_in, t.name)
    return kernels.dequantize_rows(w, np.arange(w.shape[0]))


def router_matrix(t: Tensor) -> np.ndarray:
    w = mat(t)
    return buffers.aligned(kernels.dequantize_rows(w, np.arange(w.shape[0])))
