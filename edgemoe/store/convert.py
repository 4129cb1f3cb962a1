"""GGUF -> expert store, streaming tensor by tensor (works for models larger than RAM).

Writes into a temporary directory beside the destination and renames it at the end, so an
interrupted conversion leaves no half-made store; a store being read is never rewritten in place
(a forced overwrite renames the old one away first: open readers keep their files).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

from ..errors import EdgeMoEError
from ..models.config import ModelArgs
from ..models.gguf_file import GGUFFile, embedding_on_disk
from ..quant import kernels, native, nested
from . import catalog
from . import reader as store

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
EXPERT_SUFFIXES = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}


def source_bits(gf: GGUFFile, args: ModelArgs) -> float:
    """Bits per weight of the source's expert tensors (the first MoE layer's)."""
    if getattr(gf, "expert_bits", None):  # an ONNX source's quantized experts (MatMulNBits, QMoE)
        return float(gf.expert_bits)
    first = next(i for i in range(args.n_layer) if not args.is_dense(i))
    t = gf.tensor(f"blk.{first}.{EXPERT_SUFFIXES['gate']}")
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return size * 8 / block


def expert_names(gf: GGUFFile) -> set[str]:
    """The routed experts' stacked tensors of a file (what a store keeps in its shards)."""
    return {n for n in gf.tensors if n.endswith(tuple(EXPERT_SUFFIXES.values()))}


def resident_dense_bytes(gf: GGUFFile) -> int:
    """What a store made from this file holds in memory of its other tensors: all but those left
    in the file (embedding_on_disk)."""
    skip = expert_names(gf) | set(embedding_on_disk(gf))
    return sum(t.nbytes for n, t in gf.tensors.items() if n not in skip)


def source_expert_bytes(gf: GGUFFile, args: ModelArgs) -> int:
    """One routed expert's bytes (gate, up, down) in the source, from the first MoE layer."""
    first = next(i for i in range(args.n_layer) if not args.is_dense(i))
    return sum(gf.tensor(f"blk.{first}.{s}").nbytes for s in EXPERT_SUFFIXES.values()) // args.n_expert


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise EdgeMoEError(f"--bits {text!r}: expected comma-separated widths such as 2,3,4") from None
    if not bits or list(bits) != sorted(set(bits)) or bits[0] < 1 or bits[-1] > 8:
        raise EdgeMoEError(f"--bits {text!r}: widths must be ascending, distinct, between 1 and 8")
    return bits


def _source_codes(t, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1 expert's own 4-bit codes [n_out, n_in] and per-32 block s, m [n_out, n_blocks]
    (Q4_0: w = d*(q - 8) -> s = d, m = -8d; Q4_1: w = d*q + m)."""
    raw = np.asarray(t.data[e])  # uint8 [n_out, row_bytes]
    n_out = raw.shape[0]
    bsize = gguf.GGML_QUANT_SIZES[t.qtype][1]
    blocks = raw.reshape(n_out, -1, bsize)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if t.qtype == Q.Q4_0:
        m = (d.astype(np.float32) * -8).astype(np.float16)
        qs = blocks[..., 2:]
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n_out, -1).astype(np.int64)
    return q, d, m


def _exact_from_source(sch, t) -> bool:
    return isinstance(sch, nested.MatQuant) and t.qtype in (Q.Q4_0, Q.Q4_1) and sch.widths[-1] == 4 and sch.group == 32


def _all_q4_0(gf, args: ModelArgs) -> bool:
    return all(
        gf.tensor(f"blk.{i}.{s}").qtype == Q.Q4_0
        for i in range(args.n_layer)
        if not args.is_dense(i)
        for s in EXPERT_SUFFIXES.values()
    )


def group_for(args: ModelArgs, scheme: str, qtype, bits: tuple[int, ...]) -> int:
    if scheme == "matquant" and qtype in (Q.Q4_0, Q.Q4_1) and bits[-1] == 4:
        return 32  # the source's own blocks: its codes come back exactly at the top width
    for g in (128, 64, 32):
        if args.n_embd % g == 0 and args.n_ff_exp % g == 0:
            return g
    raise EdgeMoEError(f"expert widths {args.n_embd}x{args.n_ff_exp} are not multiples of 32")


def _expert_matrix(t, e: int) -> np.ndarray:
    """One expert's [n_out, n_in] slice of a stacked tensor, dequantized to float32."""
    data = t.data[e]
    if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(data), t.qtype).astype(np.float32, copy=False)


def calibrate_activations(src: Path, text: str, max_tokens: int = 512) -> dict:
    """Mean |x| per input column of every expert matrix, from running the source model on text:
    {(layer, "in"): [D] for gate/up, (layer, e): [F] for down of expert e} (the down projection's
    input is the expert's own activation, biases included: expert_hidden)."""
    from ..models.tokenizer import open_tokenizer
    from ..runtime.engine import N_SPAN, Engine
    from ..runtime.kvcache import KVCache

    gf = GGUFFile(src)
    args = ModelArgs.from_gguf(gf)
    eng = Engine(gf, args)
    ids = open_tokenizer(src, None, args.n_vocab, gf.metadata).tokenize(text)[:max_tokens]
    if len(ids) < 2:
        raise EdgeMoEError("calibration text is too short")
    stats: dict = {}

    def observe(i, h, top, w):
        s = stats.setdefault((i, "in"), [np.zeros(h.shape[1]), 0])
        s[0] += np.abs(h).sum(0)
        s[1] += h.shape[0]
        for e in np.unique(top):
            rows = np.nonzero((top == e).any(axis=1))[0]
            act = eng.expert_src.hidden(i, int(e), np.ascontiguousarray(h[rows]))
            s = stats.setdefault((i, int(e)), [np.zeros(act.shape[1]), 0])
            s[0] += np.abs(act).sum(0)
            s[1] += act.shape[0]

    eng.observe = observe
    cache = KVCache(args, len(ids))
    for i in range(0, len(ids), N_SPAN):
        eng.forward(np.asarray(ids[i : i + N_SPAN]), cache, all_logits=False)
    return {k: (v[0] / max(v[1], 1)).astype(np.float32) for k, v in stats.items()}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, **options) -> Path:
    """Write an expert store from a GGUF (or ONNX) model; returns its path. Options: see _convert."""
    if Path(src).suffix.lower() != ".onnx":
        return _convert(src, dst, **options)
    try:
        return _convert(src, dst, **options)
    except EdgeMoEError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        AttributeError,
        StopIteration,
        struct.error,
    ) as exc:
        # the ONNX graph and config.json are read field by field: a value of the wrong kind anywhere
        raise EdgeMoEError(
            f"{src}: the ONNX model or its config.json has a value edgemoe cannot use ({type(exc).__name__}: {exc})"
        ) from None


def _convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    bits: tuple[int, ...] | None = None,
    scheme: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    distinct_experts: int | None = None,
) -> Path:
    """Write an expert store from a GGUF file; returns its path.

    distinct_experts: for generated benchmark and test models only: encode this many experts per
    layer and store copies of them for the rest (a large store in seconds; results are not the
    source model's)."""
    src = Path(src)
    if src.suffix.lower() == ".onnx":  # ONNX MoE decoders: the same tensors, see onnx_import
        from .onnx_import import OnnxSource

        gf = OnnxSource(src)
    else:
        gf = GGUFFile(src)
    try:
        args = ModelArgs.from_gguf(gf)
        sbits = source_bits(gf, args)
        sch = plan_scheme(gf, args, src, sbits, bits, scheme)
        dst = Path(dst) if dst is not None else src.with_suffix(".edgemoe")
        _remove_stale_temps(dst)
        if dst.exists() and not force:
            raise EdgeMoEError(f"{dst}: already exists (use --force to replace it)")
        act = _calibration(src, calibration)
        catalog.ensure_writable_dir(dst.parent, "an expert store")
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            _write_store(gf, args, sch, tmp, act, progress, src, sbits, distinct_experts)
            for extra in getattr(gf, "extra_files", ()):  # an ONNX model's tokenizer.json
                shutil.copyfile(extra, tmp / extra.name)
            _fsync_dir(tmp)
            _move_into_place(tmp, dst)
        except OSError as exc:  # a full disk, a read-only or special file system (/proc)
            shutil.rmtree(tmp, ignore_errors=True)
            raise EdgeMoEError(f"{dst}: cannot write the expert store there ({exc.strerror or exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        catalog.record(dst, src)
        return dst
    finally:
        gf.close()


def scheme_name(gf, args: ModelArgs, bits: tuple[int, ...] | None = None, scheme: str | None = None) -> str:
    """The scheme a conversion uses unless told: "native" (the source's own blocks, so quality max
    is the source exactly) for quantized experts; "matquant" (re-fitted planes; it won
    tools/bench_nested.py over d2moe at the top widths) for float experts, which have no codes to
    nest, and wherever --bits asks for widths of one's choosing. Experts all Q4_0 or Q4_1 stay
    matquant: its planes hold those sources' own codes and scales (exact too), and its transcoding
    to ggml blocks costs less on a miss than native's merge of 32-weight blocks (tools/bench_kernels.py)."""
    if scheme is not None:
        return scheme
    if bits is not None:
        return "matquant"
    types = {
        gf.tensor(f"blk.{i}.{s}").qtype
        for i in range(args.n_layer)
        if not args.is_dense(i)
        for s in EXPERT_SUFFIXES.values()
    }
    if types & set(FLOAT_TYPES) or types <= {Q.Q4_0, Q.Q4_1}:
        return "matquant"
    return native.NativeScheme.name


def expert_bytes_by_width(sch, args: ModelArgs) -> dict[int, int]:
    """One expert's bytes at each width of a scheme (plan_scheme's), in the layer where they
    are largest."""
    shapes = store.expert_shapes(args.n_embd, args.n_ff_exp)
    layers = [s for s in sch if s is not None] if isinstance(sch, list) else [sch]
    out = {}
    for b in layers[0].widths:
        k = layers[0].planes_for(b)
        out[int(b)] = max(sum(sum(v[:k]) for v in store.matrix_plane_bytes(s, shapes).values()) for s in layers)
    return out


def plan_scheme(gf, args: ModelArgs, src: Path, sbits: float, bits: tuple[int, ...] | None, scheme: str | None):
    """The nested scheme to encode the experts with (scheme_name's unless given): its widths (the
    source's default ones if not given) and group; for "native", the source's own blocks, a
    NativeScheme per layer."""
    scheme = scheme_name(gf, args, bits, scheme)
    if scheme == native.NativeScheme.name:
        if bits is not None:
            raise EdgeMoEError("--bits: a native store's widths are its source types' own (see `edgemoe info`)")
        types = [
            None if args.is_dense(i) else {m: gf.tensor(f"blk.{i}.{s}").qtype for m, s in EXPERT_SUFFIXES.items()}
            for i in range(args.n_layer)
        ]
        try:
            return native.store_schemes(types)
        except ValueError as exc:
            raise EdgeMoEError(f"{src}: {exc}") from None
    bits = bits or nested.default_bits(sbits)
    if sbits < bits[-1]:
        warnings.warn(
            f"{src.name}: the source experts have {sbits:g} bits per weight, fewer than the top nested "
            f"width {bits[-1]}: the top width cannot be more accurate than the source",
            stacklevel=3,
        )
    if scheme not in nested.SCHEMES:
        names = ", ".join([*nested.SCHEMES, native.NativeScheme.name])
        raise EdgeMoEError(f"scheme {scheme!r} is not one of {names}")
    first = next(i for i in range(args.n_layer) if not args.is_dense(i))
    group = group_for(args, scheme, gf.tensor(f"blk.{first}.{EXPERT_SUFFIXES['gate']}").qtype, bits)
    if scheme == "matquant" and bits[-1] == 4 and group == 32 and _all_q4_0(gf, args):
        scheme = "matquant-sym"  # Q4_0 is symmetric: the offsets need not be stored
    return nested.SCHEMES[scheme](bits, group)


def _calibration(src: Path, calibration: str | os.PathLike[str] | None) -> dict | None:
    """calibrate_activations on the calibration text file, if one is given."""
    if calibration is None:
        return None
    if src.suffix.lower() == ".onnx":
        raise EdgeMoEError(f"{src}: --calibration is not supported for ONNX sources yet (convert without it)")
    try:
        text = Path(calibration).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeMoEError(f"{calibration}: cannot read calibration text ({exc})") from None
    return calibrate_activations(src, text)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished store to dst; an existing store is renamed away first (open readers keep
    their files), then removed."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)


def _write_store(
    gf: GGUFFile, args: ModelArgs, sch, tmp: Path, act, progress: bool, src: Path, sbits: float, distinct: int | None
) -> None:
    from tqdm import tqdm

    dense_bytes = _write_dense(gf, args, tmp)
    shapes = store.expert_shapes(args.n_embd, args.n_ff_exp)
    schemes = sch if isinstance(sch, list) else [None if args.is_dense(i) else sch for i in range(args.n_layer)]
    layer_bytes = [None if s is None else store.matrix_plane_bytes(s, shapes) for s in schemes]
    experts_manifest = []
    n_moe = sum(not args.is_dense(i) for i in range(args.n_layer))
    bar = tqdm(
        total=n_moe * args.n_expert, desc=f"converting {src.name}", unit="expert", disable=not progress, file=sys.stderr
    )
    for i in range(args.n_layer):
        if args.is_dense(i):  # deepseek2's leading dense layers: their FFN is in dense.gguf
            experts_manifest.append([])
            continue
        pb = layer_bytes[i]
        per_plane = [sum(pb[m][p] for m in store.MATRICES) for p in range(len(pb["gate"]))]
        experts_manifest.append(_write_shard(gf, args, schemes[i], tmp, i, per_plane, act, distinct, bar))
    bar.close()
    first = next(s for s in schemes if s is not None)
    scheme = dict(
        name=first.name,
        bits=list(first.widths),
        group=first.group,
        planes_for={str(b): first.planes_for(b) for b in first.widths},
        activation_aware=act is not None,
    )
    if isinstance(sch, list):  # native: the source's types per layer, and plane sizes per layer
        scheme["types"] = [None if s is None else {m: s.types[m].name for m in store.MATRICES} for s in schemes]
        plane_bytes = layer_bytes
    else:
        plane_bytes = next(pb for pb in layer_bytes if pb is not None)
    manifest = dict(
        format_version=store.FORMAT_VERSION,
        source=dict(
            file=src.name, bytes=src.stat().st_size, expert_bits_per_weight=sbits, fingerprint=catalog.fingerprint(src)
        ),
        arch=args.arch,
        n_layer=args.n_layer,
        n_expert=args.n_expert,
        n_embd=args.n_embd,
        n_ff_exp=args.n_ff_exp,
        scheme=scheme,
        plane_bytes=plane_bytes,
        dense_bytes=dense_bytes,
        experts=experts_manifest,
    )
    mtmp = tmp / (store.MANIFEST + ".tmp")
    mtmp.write_text(json.dumps(store.sealed(manifest, tmp)))  # with the checksums of integrity.py
    os.replace(mtmp, tmp / store.MANIFEST)


def _write_dense(gf: GGUFFile, args: ModelArgs, tmp: Path) -> int:
    """dense.gguf: every tensor but the routed experts' in its source type, all metadata; returns
    the bytes of its tensors."""
    experts = expert_names(gf)
    w = gguf.GGUFWriter(tmp / store.DENSE, args.arch)
    gf.copy_metadata(w)
    dense_bytes = 0
    for name, t in gf.tensors.items():
        if name in experts:
            continue
        quant = t.data.dtype == np.uint8
        w.add_tensor(name, t.data, raw_dtype=t.qtype if quant else None)
        dense_bytes += t.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, t in gf.tensors.items():  # read once: out of the process's memory (the budget)
        if name not in experts:
            gf.release(t.data)
    return dense_bytes


def _write_shard(
    gf: GGUFFile, args: ModelArgs, sch, tmp: Path, i: int, per_plane: list[int], act, distinct: int | None, bar
) -> list[dict]:
    """Layer i's shard: one int8 tensor per expert holding its planes; returns the layer's manifest
    entries."""
    expert_nbytes = sum(per_plane)
    path = tmp / store.shard_name(i)
    w = gguf.GGUFWriter(path, args.arch)
    w.add_custom_alignment(store.ALIGNMENT)
    w.add_uint32("edgemoe.layer", i)
    for e in range(args.n_expert):
        w.add_tensor_info(store.expert_tensor_name(i, e), [expert_nbytes], np.dtype(np.int8), expert_nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    tensors = {m: gf.tensor(f"blk.{i}.{s}") for m, s in EXPERT_SUFFIXES.items()}
    sums = []
    blobs: list[tuple[np.ndarray, list[int]]] = []
    n_encoded = min(distinct or args.n_expert, args.n_expert)
    encoded = _in_order(lambda e: _encode_expert(gf, args, sch, tensors, i, e, act, per_plane), n_encoded)
    for e in range(args.n_expert):
        if e < n_encoded:
            blob, cks = next(encoded)
            if distinct:
                blobs.append((blob, cks))
        else:
            blob, cks = blobs[e % n_encoded]
        sums.append(cks)
        w.write_tensor_data(blob.view(np.int8))
        bar.update(1)
    w.close()
    r = gguf.GGUFReader(path)
    offsets = {t.name: int(t.data_offset) for t in r.tensors}
    del r
    cum = [0, *np.cumsum(per_plane).tolist()]
    return [
        dict(offset=offsets[store.expert_tensor_name(i, e)], plane_offsets=cum, checksums=sums[e])
        for e in range(args.n_expert)
    ]


def _in_order(encode, n: int):
    """encode(0), encode(1), ... encode(n - 1), computed by kernels.THREADS threads (the kernels
    release the GIL), at most one more than that in flight (each a whole expert's planes)."""
    workers = max(1, kernels.THREADS)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for e in range(n):
            pending.append(pool.submit(encode, e))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _encode_expert(gf: GGUFFile, args: ModelArgs, sch, tensors: dict, i: int, e: int, act, per_plane: list[int]):
    """Expert e of layer i as one blob (plane 0 of gate, up, down, then plane 1 ...) and each
    plane's checksum."""
    planes = {}
    shapes = store.expert_shapes(args.n_embd, args.n_ff_exp)
    for m in store.MATRICES:
        if isinstance(sch, native.NativeScheme):  # the source's own blocks, split into planes
            planes[m] = sch.split(m, np.asarray(tensors[m].data[e]), *shapes[m])
            continue
        if _exact_from_source(sch, tensors[m]):
            planes[m] = sch.from_codes(*_source_codes(tensors[m], e))
            continue
        scale = None
        if act is not None:
            scale = act.get((i, "in")) if m != "down" else act.get((i, e))
        planes[m] = sch.encode(_expert_matrix(tensors[m], e), scale)
    for t in tensors.values():
        gf.release(t.data[e])
    blob = np.empty(sum(per_plane), dtype=np.uint8)
    pos = 0
    cks = []
    for p in range(len(per_plane)):
        start = pos
        for m in store.MATRICES:
            b = planes[m][p]
            blob[pos : pos + b.nbytes] = b.reshape(-1)
            pos += b.nbytes
        cks.append(store.checksum(blob[start:pos]))
    return blob, cks


def _remove_stale_temps(dst: Path) -> None:
    """Leftovers of conversions that were killed (their pid is gone): temp directories go; a
    previous store set aside by a --force conversion killed between its two renames comes back."""
    for p in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted(dst.parent.glob(f".{dst.name}.old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if not dst.exists() and (p / store.MANIFEST).is_file():
                os.rename(p, dst)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
