"""Experts streamed from an expert store through the budgeted cache (StoreExperts): the runtime's
ExpertSource for stores. Per MoE layer: plan widths (policy), fetch planes (cache, pipeline),
compute (ggml's kernels on transcoded experts, nested planes otherwise), combine."""

from __future__ import annotations

import threading

import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..models.gguf_file import GGUFFile
from ..quant import kernels
from ..quant.buffers import alloc
from ..quant.transcode import fast_weight, transcodes
from ..store.reader import StoreReader, expert_shapes
from . import policy
from .cache import ExpertCache
from .experts import expert_act, expert_biases, sum_slots
from .pipeline import Pipeline
from .policy import PRESETS, Calibration, Quality
from .stats import CacheStats, LayerCacheStats

PACK_ROWS = 32  # a lower width merged for one use is repacked (kernels.pack) for this many rows or more


class StoreExperts:
    """Expert FFNs computed on nested planes fetched through the cache: dual routing picks each
    chosen expert's width, skipping drops the least important, and the HEBF pipeline (when on)
    overlaps the reads with the compute and prefetches the next layer."""

    def __init__(
        self,
        reader: StoreReader,
        cache: ExpertCache,
        args: ModelArgs,
        dense: GGUFFile,
        bits: int | None = None,
        quality: Quality | None = None,
        pipeline: bool = True,
        prefetch: bool = True,
    ):
        self.reader = reader
        self.args = args
        # expert biases (gpt-oss) stay in the dense file
        self.bias = [None if args.is_dense(i) else expert_biases(dense, i) for i in range(args.n_layer)]
        self.cache = cache
        # one scheme for every layer (matquant, d2moe) or, for a native store, one per layer; the
        # widths (by plane count) are the same in every layer
        self.scheme = next(s for s in reader.schemes if s is not None)
        self.native = reader.native
        if bits is not None and bits not in self.scheme.widths:
            raise EdgeMoEError(f"bits {bits} is not a width of this store ({', '.join(map(str, self.scheme.widths))})")
        self.n_planes = self.scheme.planes_for(bits if bits is not None else self.scheme.widths[-1])
        self.low_planes = self.scheme.planes_for(self.scheme.widths[0])
        self._bits_of_planes = {self.scheme.planes_for(b): b for b in self.scheme.widths}
        self.shapes = expert_shapes(reader.n_embd, reader.n_ff_exp)
        self.quality = quality or PRESETS["max"]
        self.calibration = Calibration.load(reader.root, args.n_layer)
        self.pipeline = Pipeline(cache) if pipeline else None
        self.prefetch_enabled = prefetch and pipeline
        self.skipped = 0  # token-expert pairs skipped
        self.chosen = 0  # token-expert pairs routed
        self.uses_by_bits: dict[int, int] = {}  # expert computations by width
        self.ratios: list[list[float]] | None = None  # set by calibrate: w_k / w_1 per layer
        self.onnx = None  # an onnx_experts.OnnxExperts: experts run by onnxruntime (Model(onnx_experts=True))
        self.backend_rows = {"edgemoe": 0, "ggml": 0, "onnxruntime": 0}  # token rows computed by each
        self.q41 = not self.native and transcodes(self.scheme) and self.n_planes == self.scheme.n_planes
        self._scratch = threading.local()  # _merge_scratch

    def _ran_at(self, n_planes: int) -> None:
        """Count one expert computation at the width of n_planes (the width it ran at: an expert
        held at full width runs at full width whatever was asked)."""
        b = self.bits_of(n_planes)
        self.uses_by_bits[b] = self.uses_by_bits.get(b, 0) + 1

    def ffn(self, i: int, e: int, planes: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        if self.native:
            return self._native_ffn(i, e, planes, x)
        fast = self._fast_form(i, e, planes)
        self._ran_at(self.reader.n_planes if fast is not None else len(planes))
        # onnxruntime (edgemoe.store.onnx_experts) by its rule, except for experts in ggml's repacked
        # Q4_0 form, which is faster at every batch size (docs/onnx.md)
        if (
            self.onnx is not None
            and self.bias[i] is None
            and self.args.expert_act == "silu"
            and not (fast is not None and fast["gate"].packed)
        ):
            from ..store.onnx_experts import codes_for

            y = self.onnx.ffn((i, e), lambda: codes_for(self, i, e, planes), x)
            if y is not None:
                self.backend_rows["onnxruntime"] += x.shape[0]
                return y
        self.backend_rows["ggml" if fast is not None else "edgemoe"] += x.shape[0]
        if fast is not None:  # ggml's kernels on the same weights
            return self._swiglu(i, e, _ggml_matmul, fast, x)
        return self._swiglu(i, e, self.scheme.matmul, self.reader.matrix_planes(planes, i), x)

    def _swiglu(self, i: int, e: int, mm, per: dict, x: np.ndarray) -> np.ndarray:
        b = self.bias[i][e] if self.bias[i] is not None else None
        g = mm(per["gate"], *self.shapes["gate"], x)  # [T, F]
        u = mm(per["up"], *self.shapes["up"], x)  # [T, F]
        if b is not None:
            g += b.gate
            u += b.up
        hdn = np.ascontiguousarray(expert_act(self.args, g, u), dtype=np.float32)
        y = mm(per["down"], *self.shapes["down"], hdn)  # [T, D]
        return y + b.down if b is not None else y

    def _fast_form(self, i: int, e: int, planes: list[np.ndarray]) -> dict | None:
        """An expert held at the full width of a 4-bit, group-32 matquant store (Q4_0/Q4_1
        sources) is transcoded once into ggml blocks holding exactly the same weights in no more
        bytes (fast_weight: Q4_0 repacked for ggml's gemv/gemm where every group's offset is -8
        times its scale, as a Q4_0 source gives; Q4_1 otherwise), and its planes are freed
        (ExpertCache.fast_form): from then on it runs on ggml's kernels."""
        if not self.q41:
            return None

        def build(planes: list[np.ndarray]) -> tuple[dict, int]:
            fast = {
                m: fast_weight(self.scheme, per, *self.shapes[m], f"blk.{i}.exp.{e}.{m}")
                for m, per in self.reader.matrix_planes(planes, i).items()
            }
            return fast, sum(w.nbytes for w in fast.values())  # repacked Q4_0: 10% under the planes

        return self.cache.fast_form(i, e, build)

    def _native_ffn(self, i: int, e: int, planes: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        """A native store's expert: its planes merged back into blocks of the source's types
        (native.NativeScheme.blocks) run on ggml's kernels for those types. At full width these are
        the source's own bytes, built once and held instead of the planes (the same size); a lower
        width is merged for this use only, every code's missing bits filled from its bin."""
        sch = self.reader.schemes[i]

        def build(planes: list[np.ndarray], scratch: np.ndarray | None = None) -> tuple[dict, int]:
            out, off = {}, 0
            for m, per in self.reader.matrix_planes(planes, i).items():
                n_out, n_in = self.shapes[m]
                size = sch.blocks_nbytes(m, n_out, n_in)
                buf = None if scratch is None else scratch[off : off + size]
                off += -(-size // 64) * 64
                name = f"blk.{i}.exp.{e}.{m}"
                # Q4_0, Q4_K: ggml's repacked layout, as the GGUF in place gets, for a form held
                # for many uses or a batch of rows; rewriting the blocks costs more than one
                # decode step's product gains from it (tools/bench_kernels.py --native). Q4_K is
                # merged into that layout in the same pass.
                pack = scratch is None or x.shape[0] >= PACK_ROWS
                if pack and sch.merges_packed(m) and kernels.can_pack_shape(sch.types[m], n_out):
                    blocks = sch.blocks(m, per, n_out, n_in, buf, packed=True)
                    out[m] = kernels.QWeight.prepacked(blocks, sch.types[m], n_in, name)
                    continue
                w = kernels.QWeight(sch.blocks(m, per, n_out, n_in, buf), sch.types[m], n_in, name)
                out[m] = kernels.pack(w) if pack else w
            return out, sum(w.nbytes for w in out.values())

        # held at full width already (then its planes are gone): that form, whatever width was asked
        weights = self.cache.fast_form(i, e, build)
        self._ran_at(self.reader.n_planes if weights is not None else len(planes))
        if weights is None:  # a lower width, merged for this use into a buffer kept for that
            weights, _ = build(planes, self._merge_scratch(i))
        self.backend_rows["ggml"] += x.shape[0]
        return self._swiglu(i, e, _ggml_matmul, weights, x)

    def _merge_scratch(self, i: int) -> np.ndarray:
        """The buffer a lower width of layer i's experts is merged into for one use (one expert's
        blocks at full size, the largest layer's; per thread): fresh pages for every use cost as
        much as the merge itself. The same bytes as the transient buffer it replaces."""
        sch = self.reader.schemes[i]
        need = sum(-(-sch.blocks_nbytes(m, *self.shapes[m]) // 64) * 64 for m in sch.types)
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.size < need:
            buf = self._scratch.buf = alloc(need)
        return buf

    def _widths(self, i: int, top: np.ndarray, w: np.ndarray, skip: np.ndarray) -> dict[int, tuple[int, float]]:
        """{expert: (planes to use, hotness)} for the kept experts of one layer."""

        return policy.plan_widths(
            top, w, skip, self.quality, self.n_planes, self.low_planes, lambda e: self.cache.resident(i, e)
        )

    def moe_layer(self, i: int, h: np.ndarray, top: np.ndarray, w: np.ndarray, predict=None) -> np.ndarray:
        q = self.quality
        if self.ratios is not None:  # calibrating NAEE: record w_k / w_1 of the non-first experts
            ws = np.sort(w, axis=1)[:, ::-1]
            self.ratios[i].extend((ws[:, 1:] / ws[:, :1]).ravel().tolist())
        beta = self.calibration.betas[i] if self.calibration is not None else None
        skip = policy.skip_mask(w, q, beta) if q.name != "max" else np.zeros(top.shape, dtype=bool)
        self.chosen += top.size
        if skip.any():
            self.skipped += int(skip.sum())
            w = policy.renormalise(w, skip)
        wants = self._widths(i, top, w, skip)
        # one row per (token, slot), summed over slots in slot order at the end: the result does
        # not depend on the order the experts were computed in (reads land in any order)
        slots = np.zeros((top.shape[0], top.shape[1], h.shape[1]), dtype=np.float32)  # [T, K, D]

        def compute(e: int, planes: list[np.ndarray]) -> None:
            rows, slot = np.nonzero((top == e) & (w != 0))
            slots[rows, slot] = self.ffn(i, e, planes, np.ascontiguousarray(h[rows])) * w[rows, slot][:, None]

        if self.pipeline is None:
            self.cache.visit(i)
            for e in sorted(wants, key=lambda e: (-wants[e][1], e)):
                compute(e, self.cache.get(i, e, wants[e][0]))
            return sum_slots(slots)

        def after_submit() -> None:
            nxt = predict() if (predict is not None and self.prefetch_enabled) else None
            if nxt is not None:
                j, ptop, pw = nxt
                pskip = policy.skip_mask(pw, q, None) if q.name != "max" else np.zeros(ptop.shape, dtype=bool)
                self.pipeline.prefetch(j, self._widths(j, ptop, pw, pskip))

        self.pipeline.run_layer(i, wants, compute, after_submit)
        return sum_slots(slots)

    def preload(self) -> int:
        """Fill the cache at load, layer by layer, with experts at the width they are read at,
        until it is full (as llama.cpp's mmap load reads the file); the counters start after.
        Returns the bytes read."""
        c = self.cache
        read = 0
        for i, layer in enumerate(self.reader.locations):
            size = self.reader.expert_bytes(self.n_planes, i) if layer else 0
            for e in range(len(layer)):
                if c.nbytes + size > c.capacity:
                    break
                c.get(i, e, self.n_planes)
                read += size
        c.reset_counters()
        return read

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    def bits_of(self, n_planes: int) -> int:
        """The width n planes give (the largest width whose planes are all there)."""
        best = 0
        for planes, b in sorted(self._bits_of_planes.items()):
            if planes <= n_planes:
                best = b
        return best

    def min_layer_bytes(self, n_expert_used: int) -> int:
        """One layer's chosen experts at the width they are read at (all planes unless bits= is
        lower), in the layer where experts are largest."""
        return n_expert_used * self.reader.expert_bytes(self.n_planes)

    def snapshot(self) -> CacheStats:
        c = self.cache.state()
        pl = self.pipeline
        layers = tuple(
            LayerCacheStats(
                s.hits, s.misses, s.partial_hits, s.bytes_read, s.evictions, s.upgrades, s.downgrades, s.stall_s
            )
            for s in c.layers
        )
        by_bits: dict[int, int] = {}
        resident_bits = {}
        for key, held in c.held.items():
            b = self.bits_of(held.n_planes)
            resident_bits[key] = b
            by_bits[b] = by_bits.get(b, 0) + held.nbytes
        experts = {(i, e): tuple(v) for i, s in enumerate(c.layers) for e, v in s.per_expert.items()}
        return CacheStats(
            hits=sum(s.hits for s in layers),
            misses=sum(s.misses for s in layers),
            partial_hits=sum(s.partial_hits for s in layers),
            bytes_read=sum(s.bytes_read for s in layers),
            evictions=sum(s.evictions for s in layers),
            upgrades=sum(s.upgrades for s in layers),
            downgrades=sum(s.downgrades for s in layers),
            io_stall_s=sum(s.io_stall_s for s in layers),
            cache_bytes=c.nbytes,
            cache_capacity=c.capacity,
            resident_bytes_by_bits=by_bits,
            layers=layers,
            experts=experts,
            resident_bits=resident_bits,
            skipped=self.skipped,
            chosen=self.chosen,
            uses_by_bits=dict(self.uses_by_bits),
            prefetch_issued=pl.prefetch_issued if pl else 0,
            prefetch_hits=pl.prefetch_hits if pl else 0,
            prefetch_cancelled=pl.prefetch_cancelled if pl else 0,
            prefetch_wasted_bytes=c.prefetch_wasted_bytes,
            backend_rows=dict(self.backend_rows),
            onnx_sessions=self.onnx.created if self.onnx is not None else 0,
            onnx_bytes=self.onnx.held_bytes if self.onnx is not None else 0,
        )


def _ggml_matmul(w: kernels.QWeight, n_out: int, n_in: int, x: np.ndarray) -> np.ndarray:
    """The plane kernels' signature (planes, n_out, n_in, x) over a ggml weight."""
    return kernels.matmul(w, x)
