"""The KV cache: per-layer K and V as llama.cpp lays them out."""

from __future__ import annotations

import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..quant import buffers, ggml_graph


class KVCache:
    """Per-layer K and V for up to n_ctx positions. np.zeros is lazily backed: untouched pages
    cost no memory, so RSS grows with the context actually used."""

    def __init__(self, args: ModelArgs, n_ctx: int, dtype: str = "f16"):
        if dtype not in ("f16", "f32"):
            raise EdgeMoEError(f"kv cache type {dtype!r} is not one of f16, f32")
        npdt = np.float16 if dtype == "f16" else np.float32
        self.n_ctx = n_ctx
        n_kv, dk, dv = args.cache_dims  # MLA: one latent row per position, V = its first kv_lora
        # rows up to llama.cpp's padded context: its attention reads whole blocks of cells
        # (ggml_graph.kv_len); the cells past the ones in use are masked
        rows = ggml_graph.kv_len(n_ctx, n_ctx)
        self.k = buffers.zeros((args.n_layer, rows, n_kv, dk), npdt)
        # V transposed, as llama.cpp stores it without flash attention: [layer, head, dim, cell]
        self.v = buffers.zeros((args.n_layer, n_kv, dv, rows), npdt)
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def reset(self) -> None:
        self.n_past = 0
