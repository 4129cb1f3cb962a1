"""Experts streamed from an expert store through the budgeted cache, and the budget arithmetic."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..models.gguf_file import GGUFFile
from ..quant import kernels, nested
from ..store.reader import MATRICES, StoreReader
from . import policy
from .cache import ExpertCache, LayerStats, alloc
from .experts import expert_act, expert_biases, sum_slots
from .memory import format_size
from .pipeline import Pipeline
from .policy import PRESETS, Calibration, Quality

# Prompt tokens evaluated per forward pass: bounds the activation scratch under a budget.
N_BATCH = 64
SAFETY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LayerCacheStats:
    hits: int
    misses: int
    partial_hits: int
    bytes_read: int
    evictions: int
    upgrades: int
    downgrades: int
    io_stall_s: float

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses + self.partial_hits
        return self.hits / n if n else 0.0


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    partial_hits: int
    bytes_read: int
    evictions: int
    upgrades: int
    downgrades: int
    io_stall_s: float
    cache_bytes: int
    cache_capacity: int
    resident_bytes_by_bits: dict[int, int]
    layers: tuple[LayerCacheStats, ...]
    experts: dict[tuple[int, int], tuple[int, int, int]]  # (layer, expert) -> (hits, misses, partial)
    resident_bits: dict[tuple[int, int], int]  # (layer, expert) -> bits held now
    skipped: int  # token-expert pairs skipped by the quality policy
    chosen: int  # token-expert pairs the routers chose
    uses_by_bits: dict[int, int]  # expert computations by the width they ran at
    prefetch_issued: int
    prefetch_hits: int  # prefetched experts the real routing wanted
    prefetch_cancelled: int  # queued prefetches dropped: the routing did not want them
    prefetch_wasted_bytes: int  # prefetched planes dropped before any use
    # token-expert rows computed by each backend: edgemoe (numba nested planes), ggml (Q4_1),
    # onnxruntime (onnx_experts); onnx_sessions: sessions created
    backend_rows: dict[str, int] = field(default_factory=dict)
    onnx_sessions: int = 0
    onnx_bytes: int = 0  # what the live onnxruntime sessions are charged against the budget

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses + self.partial_hits
        return self.hits / n if n else 0.0


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
        self.scheme = nested.SCHEMES[reader.scheme_name](reader.bits, reader.group)
        if bits is not None and bits not in self.scheme.widths:
            raise EdgeMoEError(f"bits {bits} is not a width of this store ({', '.join(map(str, self.scheme.widths))})")
        self.n_planes = self.scheme.planes_for(bits if bits is not None else self.scheme.widths[-1])
        self.low_planes = self.scheme.planes_for(self.scheme.widths[0])
        self._bits_of_planes = {self.scheme.planes_for(b): b for b in self.scheme.widths}
        self.shapes = {
            "gate": (reader.n_ff_exp, reader.n_embd),
            "up": (reader.n_ff_exp, reader.n_embd),
            "down": (reader.n_embd, reader.n_ff_exp),
        }
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
        self.q41 = transcodes(self.scheme) and self.n_planes == self.scheme.n_planes

    def ffn(self, i: int, e: int, planes: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        fast = self._fast_form(i, e, planes)
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

            def mm(w, n_out, n_in, xx):
                return kernels.matmul(w, xx)

            per = fast
        else:
            per = {m: [] for m in MATRICES}
            for p, buf in enumerate(planes):
                for m, view in self.reader.split_plane(buf, p).items():
                    per[m].append(view)
            mm = self.scheme.matmul
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
        times its scale, as a Q4_0 source gives; Q4_1 otherwise), and its planes are freed: from
        then on it runs on ggml's kernels.
        Such an entry is evicted whole rather than downgraded."""
        cache = self.cache
        with cache.cond:
            ent = cache.entries.get((i, e))
            if ent is None or not self.q41:
                return None
            if ent.fast is not None:
                return ent.fast
            if len(ent.planes) < self.scheme.n_planes:
                return None
            planes = list(ent.planes)
        fast = {}
        for m in MATRICES:
            per = [self.reader.split_plane(buf, p)[m] for p, buf in enumerate(planes)]
            n_out, n_in = self.shapes[m]
            fast[m] = fast_weight(self.scheme, per, n_out, n_in, f"blk.{i}.exp.{e}.{m}")
        with cache.cond:
            if cache.entries.get((i, e)) is ent and ent.fast is None:
                ent.fast = fast
                ent.planes = [_EMPTY] * len(ent.planes)  # the bytes now live in `fast`
                size = sum(w.nbytes for w in fast.values())  # repacked Q4_0: 10% under the planes
                cache.nbytes -= ent.nbytes - size
                ent.nbytes = size
        return fast

    def _widths(self, i: int, top: np.ndarray, w: np.ndarray, skip: np.ndarray) -> dict[int, tuple[int, float]]:
        """{expert: (planes to use, hotness)} for the kept experts of one layer."""

        def resident(e: int) -> int:
            with self.cache.cond:
                ent = self.cache.entries.get((i, e))
                return len(ent.planes) if ent else 0

        return policy.plan_widths(top, w, skip, self.quality, self.n_planes, self.low_planes, resident)

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
        for n, _ in wants.values():
            b = self.bits_of(n)
            self.uses_by_bits[b] = self.uses_by_bits.get(b, 0) + 1
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
        size = self.reader.expert_bytes(self.n_planes)
        read = 0
        for i, layer in enumerate(self.reader.locations):
            for e in range(len(layer)):
                if c.nbytes + size > c.capacity:
                    break
                c.get(i, e, self.n_planes)
                read += size
        c.layers = [LayerStats() for _ in c.layers]
        for ent in c.entries.values():
            ent.uses = 0
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
        """One layer's chosen experts at the width they are read at (all planes unless bits= is lower)."""
        return n_expert_used * self.reader.expert_bytes(self.n_planes)

    def snapshot(self) -> CacheStats:
        with self.cache.cond:
            return self._snapshot()

    def _snapshot(self) -> CacheStats:
        c = self.cache
        pl = self.pipeline
        layers = tuple(
            LayerCacheStats(
                s.hits, s.misses, s.partial_hits, s.bytes_read, s.evictions, s.upgrades, s.downgrades, s.io_seconds
            )
            for s in c.layers
        )
        by_bits: dict[int, int] = {}
        resident_bits = {}
        for key, ent in c.entries.items():
            b = self.bits_of(len(ent.planes))
            resident_bits[key] = b
            by_bits[b] = by_bits.get(b, 0) + ent.nbytes
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


_EMPTY = np.empty(0, dtype=np.uint8)


def q41_blocks(scheme, planes: list[np.ndarray], n_out: int, n_in: int) -> np.ndarray:
    """Full-width matquant planes (4-bit codes, group 32, fp16 s and m) as ggml Q4_1 rows
    [n_out, n_in / 32 * 20]: per block d = s, m = m, and the codes as nibbles (element j in the
    low nibble of byte j, element j + 16 in its high nibble)."""
    if list(scheme.plane_bits) == [2, 1, 1] and _q4_211 is not None:
        (c0, sc), (c1, _), (c2, _) = (scheme._split_plane(pl, p, n_out, n_in) for p, pl in enumerate(planes))
        out = alloc(n_out * n_in // 32 * 20)
        _q4_211(
            c0, c1, c2, sc[0].view(np.uint16).reshape(-1), sc[1].view(np.uint16).reshape(-1), n_out, n_in, out, False
        )
        return out.reshape(n_out, n_in // 32 * 20)
    q, s, m = scheme.codes(planes, n_out, n_in)
    nb = n_in // 32
    q = q.reshape(n_out, nb, 32)
    out = alloc(n_out * nb * 20).reshape(n_out, nb, 20)
    out[..., 0:2] = s.reshape(n_out, nb).astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    out[..., 2:4] = m.reshape(n_out, nb).astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return out.reshape(n_out, nb * 20)


def transcodes(scheme) -> bool:
    """Whether full-width experts of a store in this scheme are transcoded into ggml blocks
    (4-bit group-32 matquant: the planes hold Q4_0/Q4_1 blocks' exact codes and scales)."""
    return isinstance(scheme, nested.MatQuant) and scheme.widths[-1] == 4 and scheme.group == 32


def transcoded_bytes(reader) -> int | None:
    """The bytes a full-width expert of this store is charged once StoreExperts._fast_form has
    transcoded it into ggml blocks (repacked Q4_0 for matquant-sym, else Q4_1), or None when the
    store's experts stay as planes."""
    scheme = nested.SCHEMES[reader.scheme_name](reader.bits, reader.group)
    if not transcodes(scheme):
        return None
    blocks = 3 * reader.n_ff_exp * reader.n_embd // 32
    return blocks * (18 if isinstance(scheme, nested.MatQuantSym) else 20)


def fast_weight(scheme, planes: list[np.ndarray], n_out: int, n_in: int, name: str) -> kernels.QWeight:
    """Full-width matquant planes of one matrix as the fastest ggml weight holding the same values.
    Where every group's offset is -8 times its scale (a Q4_0 source) these are Q4_0 blocks,
    (q - 8) d = q d + m, written straight into ggml's repacked block_q4_0x8 layout for its
    gemv/gemm (kernels.pack), 10% fewer bytes than Q4_1; otherwise ggml Q4_1 rows."""
    QT = gguf.GGMLQuantizationType
    if list(scheme.plane_bits) == [2, 1, 1] and _q4_211 is not None and kernels.can_pack_shape(QT.Q4_0, n_out):
        (c0, sc), (c1, _), (c2, _) = (scheme._split_plane(pl, p, n_out, n_in) for p, pl in enumerate(planes))
        d, m = sc[0].reshape(-1), sc[1].reshape(-1)
        if np.array_equal(m.astype(np.float32), np.float32(-8) * d.astype(np.float32)):
            out = alloc(n_out * n_in // 32 * 18)
            _q4_211(c0, c1, c2, d.view(np.uint16), m.view(np.uint16), n_out, n_in, out, True)
            return kernels.QWeight.packed_q4_0(out.reshape(n_out, n_in // 32 * 18), n_in, name)
    return kernels.QWeight(q41_blocks(scheme, planes, n_out, n_in), QT.Q4_1, n_in, name)


try:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _q4_211(p0, p1, p2, s, m, n_out, n_in, out, q40x8):  # pragma: no cover - compiled
        """Planes of 2, 1 and 1 bits (matquant 2,3,4) to 4-bit blocks, a row at a time: unpack the
        row-wide slots into 4-bit codes, then write Q4_1 blocks (d, m, 16 bytes of nibbles), or
        with q40x8 Q4_0 blocks in ggml's block_q4_0x8 layout (kernels.pack): per 8 rows and block
        column the 8 scales, then 16 pieces of 8 nibble bytes, piece i from row i % 8, bytes
        (i // 8) * 8 .. + 8, each XOR 0x88."""
        rb0 = n_in // 4
        rb1 = n_in // 8
        nb = n_in // 32
        q = np.empty(n_in, np.uint8)
        for o in range(n_out):
            for k in range(rb0):
                b = p0[o * rb0 + k]
                for j in range(4):
                    q[k + j * rb0] = ((b >> (2 * j)) & 3) << 2
            for k in range(rb1):
                b1 = p1[o * rb1 + k]
                b2 = p2[o * rb1 + k]
                for j in range(8):
                    q[k + j * rb1] |= (((b1 >> j) & 1) << 1) | ((b2 >> j) & 1)
            r = o % 8
            for blk in range(nb):
                g = o * nb + blk
                c = blk * 32
                if q40x8:
                    base = ((o // 8) * nb + blk) * 144
                    out[base + 2 * r] = s[g] & 0xFF
                    out[base + 2 * r + 1] = s[g] >> 8
                    for j in range(16):
                        out[base + 16 + ((j // 8) * 8 + r) * 8 + j % 8] = (q[c + j] | (q[c + j + 16] << 4)) ^ 0x88
                else:
                    base = g * 20
                    out[base] = s[g] & 0xFF
                    out[base + 1] = s[g] >> 8
                    out[base + 2] = m[g] & 0xFF
                    out[base + 3] = m[g] >> 8
                    for j in range(16):
                        out[base + 4 + j] = q[c + j] | (q[c + j + 16] << 4)
except ImportError:  # numba missing: the numpy path above
    _q4_211 = None


def embedding_on_disk(gf) -> tuple[str, ...]:
    """The token embedding stays in the file (a few rows read per token) unless the output layer
    shares it (tied embeddings: every row is used every token)."""
    return ("token_embd.weight",) if gf.maybe("output.weight") is not None else ()


def fixed_bytes(args, n_ctx: int, dense: int, kv: int) -> int:
    """What a model streaming its experts holds besides the runtime and the expert cache: resident
    dense weights, the KV cache, one batch's activation scratch and a safety margin."""
    return dense + kv + scratch_bytes(args.n_embd, args.n_ff_exp, args.n_head, n_ctx, args.n_vocab) + SAFETY_BYTES


def scratch_bytes(n_embd: int, n_ff: int, n_head: int, n_ctx: int, n_vocab: int) -> int:
    """Activation scratch of one forward pass of N_BATCH tokens (float32), generously counted."""
    per_tok = 4 * (8 * n_embd + 6 * n_ff + 2 * n_head * n_ctx + n_vocab)
    return N_BATCH * per_tok


def store_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe")) / "stores"


def workable_budget(need: int) -> int:
    """A budget stated in an error as one that works: what was measured to be needed, plus room for
    the runtime's growth from one load to the next (allocator pages, a few MiB), rounded up to a
    whole MiB so that the figure printed is the figure that passes."""
    mib = 1 << 20
    need += max(need // 25, 4 * mib)
    return -(-need // mib) * mib


def refuse(budget: int, fixed: int, min_cache: int, what: str) -> EdgeMoEError:
    works = workable_budget(fixed + min_cache)
    return EdgeMoEError(
        f"memory budget {format_size(budget)} is too small: {what} need {format_size(fixed)} and one layer's "
        f"chosen experts {format_size(min_cache)}; the minimum that works is {works >> 20} MiB "
        f"(--budget {works >> 20}MiB)"
    )
