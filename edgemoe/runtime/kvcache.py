"""The KV cache: per-layer K and V as llama.cpp lays them out."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..quant import buffers, ggml_graph


class KVCache:
    """Per-layer K and V for up to n_ctx positions, in paged buffers: untouched pages cost no
    memory, so RSS grows with the context actually used, and reset() gives the pages back.

    What the positions written so far hold is known exactly (held_bytes): K is position-major
    per layer, V is transposed (a row of cells per layer, head and dim), so the first position
    touches one page of every V row. on_write() is called before each forward pass writes its
    positions (high already counts them) and after reset gives the pages back: the expert cache
    borrows what the KV cache does not hold yet (edgemoe.api, Budget.lend)."""

    def __init__(self, args: ModelArgs, n_ctx: int, dtype: str = "f16"):
        if dtype not in ("f16", "f32"):
            raise EdgeMoEError(f"kv cache type {dtype!r} is not one of f16, f32")
        npdt = np.float16 if dtype == "f16" else np.float32
        self.n_ctx = n_ctx
        n_kv, dk, dv = args.cache_dims  # MLA: one latent row per position, V = its first kv_lora
        # rows up to llama.cpp's padded context: its attention reads whole blocks of cells
        # (ggml_graph.kv_len); the cells past the ones in use are masked
        rows = ggml_graph.kv_len(n_ctx, n_ctx)
        self.k, self._k_map = buffers.paged((args.n_layer, rows, n_kv, dk), npdt)
        # V transposed, as llama.cpp stores it without flash attention: [layer, head, dim, cell]
        self.v, self._v_map = buffers.paged((args.n_layer, n_kv, dv, rows), npdt)
        # where each K layer and each V row (layer, head, dim) starts: position n's bytes follow
        self._k_rows = buffers.addr(self.k) + np.arange(self.k.shape[0], dtype=np.int64) * self.k.strides[0]
        n_v_rows = self.v.size // self.v.shape[-1]
        self._v_rows = buffers.addr(self.v) + np.arange(n_v_rows, dtype=np.int64) * self.v.strides[-2]
        self.n_past = 0
        self.high = 0  # positions written since the pages were last given back
        self._held = (0, 0)  # (high, held_bytes) last computed
        self.on_write: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def touched_bytes(self, n: int) -> int:
        """Bytes of the pages that positions [0, n) occupy."""
        if n <= 0:
            return 0
        k_pages = buffers.pages_of(self._k_rows, n * self.k.strides[1])
        pages = k_pages + buffers.pages_of(self._v_rows, n * self.v.itemsize)
        return pages * mmap.PAGESIZE

    def held_bytes(self) -> int:
        """Bytes of the pages that the positions written since the last reset occupy."""
        if self._held[0] != self.high:
            self._held = (self.high, self.touched_bytes(self.high))
        return self._held[1]

    def will_write(self, T: int) -> None:
        """T positions after n_past are about to be written."""
        self.high = max(self.high, self.n_past + T)
        if self.on_write is not None:
            self.on_write()

    def reset(self) -> None:
        """An empty context; its pages go back to the OS."""
        self.n_past = 0
        if self.high:
            for m in (self._k_map, self._v_map):
                m.madvise(mmap.MADV_DONTNEED)
            self.high = 0
            if self.on_write is not None:
                self.on_write()
