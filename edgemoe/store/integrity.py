"""Every byte of a store that changes a result is checked (format 2; the expert planes' own
checksums are in the manifest's entries, read by StoreReader.read_planes):

    dense.gguf     its header (the metadata: tokenizer, hyperparameters; and the tensor table:
                   names, types, shapes, offsets), bytes 0 .. the first tensor, and each tensor's
                   bytes: manifest "dense" {header_bytes, header_xxh3, tensors {name: xxh3}}
    experts-L.gguf its header, bytes 0 .. the first expert: manifest "shard_headers" (per layer,
                   null for a layer without experts) {bytes, xxh3}
    manifest.json  every field but the experts' entries (the scheme, the source types of a native
                   store, the sizes, the checksums above): "manifest_xxh3" (format.check_manifest)

What is not covered changes nothing: the alignment padding between tensors and between experts.
`sealed` records them at conversion. The loader and `edgemoe verify` call the same functions, so
what one calls damage the other refuses: StoreReader checks the headers when it opens a store (a
few KiB to a few MiB read) and `check_dense` the dense tensors once dense.gguf is in memory (a
checksum pass at memory speed; a tensor left in the file, the token embedding, is streamed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from ..errors import EdgeMoEError
from .format import DENSE, manifest_checksum, shard_name

CHUNK = 4 << 20  # streamed checksums read this much at a time (no allocation sized by a file)


def stream_checksum(fd: int, start: int, n: int, buf: bytearray | None = None) -> int | None:
    """xxh3-64 of bytes start .. start+n of an open file, read CHUNK at a time and dropped from the
    page cache after; None if the file ends before."""
    buf = buf if buf is not None else bytearray(min(CHUNK, max(n, 1)))
    view = memoryview(buf)
    h = xxhash.xxh3_64()
    pos, end = start, start + n
    while pos < end:
        got = os.preadv(fd, [view[: min(len(view), end - pos)]], pos)
        if got <= 0:
            return None
        h.update(view[:got])
        pos += got
    os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
    return h.intdigest()


def header_damage(path: Path, fd: int, rec: dict, what: str) -> str | None:
    """What is wrong with a file's header (rec: {bytes, xxh3} as recorded), or None."""
    n = rec["bytes"]
    got = stream_checksum(fd, 0, n)
    if got is None:
        return f"{path}: truncated: shorter than its {n}-byte header"
    if got != rec["xxh3"]:
        return f"{path}: header checksum mismatch (bytes 0..{n}: {what})"
    return None


DENSE_HEADER = "the metadata (tokenizer, hyperparameters) and the tensor table"
SHARD_HEADER = "the GGUF metadata and the experts' tensor table"


def dense_header_damage(root: Path, manifest: dict) -> str | None:
    """dense.gguf's header against its checksum (before anything parses it)."""
    path = root / DENSE
    d = manifest["dense"]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"{path}: cannot open the dense weights ({exc.strerror})"
    try:
        return header_damage(path, fd, {"bytes": d["header_bytes"], "xxh3": d["header_xxh3"]}, DENSE_HEADER)
    finally:
        os.close(fd)


def shards_damage(root: Path, manifest: dict, lay) -> list[str]:
    """The loader's check of the shards when a store opens: each MoE layer's shard opens, holds
    its experts' bytes (lay: format.Layout) and has the header that was written."""
    out = []
    for layer, entries in enumerate(manifest["experts"]):
        if not entries:
            continue
        path = root / shard_name(layer)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            out.append(f"{path}: cannot open expert shard ({exc.strerror})")
            continue
        try:
            size = os.fstat(fd).st_size
            need = max(int(e["offset"]) for e in entries) + lay.expert_bytes(layer)
            if size < need:
                out.append(f"{path}: truncated shard: layer {layer}'s experts end at byte {need}, the file has {size}")
            else:
                bad = header_damage(path, fd, manifest["shard_headers"][layer], SHARD_HEADER)
                out += [bad] if bad else []
        finally:
            os.close(fd)
    return out


def dense_damage(root: Path, manifest: dict, gf) -> list[str]:
    """dense.gguf's tensors against their checksums, and its configuration against the manifest.
    gf: the file as GGUFFile after load_into_memory (each tensor in memory or left in the file,
    gf.on_disk: those are streamed)."""
    want: dict[str, int] = manifest["dense"]["tensors"]
    out = [f"{gf.path}: tensor {n} is not one the store was written with" for n in gf.tensors if n not in want]
    buf = bytearray(CHUNK)
    fd = os.open(gf.path, os.O_RDONLY) if gf.on_disk else None
    try:
        for name, ck in want.items():
            t = gf.tensors.get(name)
            if t is None:
                out.append(f"{gf.path}: tensor {name} is missing")
                continue
            if name in gf.on_disk:
                got = stream_checksum(fd, gf.on_disk[name], t.nbytes, buf)
            else:
                got = xxhash.xxh3_64_intdigest(t.data)
            if got != ck:
                out.append(f"{gf.path}: tensor {name}: checksum mismatch")
    finally:
        if fd is not None:
            os.close(fd)
    return out + _config_damage(root, manifest, gf)


def _config_damage(root: Path, manifest: dict, gf) -> list[str]:
    """dense.gguf's dimensions and which layers have experts (the model's configuration decides)
    against the manifest's."""
    from ..models.config import ModelArgs

    out = []
    arch = gf.architecture
    for key, want in (
        ("block_count", manifest["n_layer"]),
        ("expert_count", manifest["n_expert"]),
        ("embedding_length", manifest["n_embd"]),
    ):
        got = gf.get(f"{arch}.{key}")
        if got != want:
            out.append(f"{gf.path}: {arch}.{key} is {got!r}, the manifest says {want}")
    try:
        args = ModelArgs.from_gguf(gf, n_ff_exp=manifest["n_ff_exp"])
    except EdgeMoEError as exc:
        return [*out, str(exc)]
    for i, entries in enumerate(manifest["experts"][: args.n_layer]):
        want_n = 0 if args.is_dense(i) else args.n_expert
        if len(entries) != want_n:
            out.append(
                f"{root / 'manifest.json'}: layer {i} has {len(entries)} experts, "
                f"the model's configuration has {want_n}"
            )
    return out


def open_dense(path: Path):
    """dense.gguf as GGUFFile with every tensor left in the file (located, nothing copied): for
    dense_damage outside a model (verify, the conversion's record)."""
    from ..models.gguf_file import GGUFFile

    gf = GGUFFile(path)
    try:
        gf.load_into_memory(tuple(gf.tensors))
    except BaseException:
        gf.close()
        raise
    return gf


def sealed(manifest: dict[str, Any], root: Path) -> dict[str, Any]:
    """The manifest of the store written in root with the checksums above added (conversion)."""
    m = json.loads(json.dumps(manifest))
    gf = open_dense(root / DENSE)
    try:
        buf = bytearray(CHUNK)
        fd = os.open(gf.path, os.O_RDONLY)
        try:
            first = min(gf.on_disk.values())
            tensors = {n: stream_checksum(fd, off, gf.tensors[n].nbytes, buf) for n, off in gf.on_disk.items()}
            m["dense"] = dict(header_bytes=first, header_xxh3=stream_checksum(fd, 0, first, buf), tensors=tensors)
        finally:
            os.close(fd)
    finally:
        gf.close()
    m["shard_headers"] = [_shard_record(root / shard_name(i), e) if e else None for i, e in enumerate(m["experts"])]
    m["manifest_xxh3"] = manifest_checksum(m)
    return m


def _shard_record(path: Path, entries: list[dict]) -> dict:
    first = min(e["offset"] for e in entries)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"bytes": first, "xxh3": stream_checksum(fd, 0, first)}
    finally:
        os.close(fd)


def raise_first(damages: list[str]) -> None:
    """The loader's refusal: the first damage as one EdgeMoEError line."""
    if damages:
        more = f" (and {len(damages) - 1} more: edgemoe verify lists them)" if len(damages) > 1 else ""
        raise EdgeMoEError(f"{damages[0]}: the store is damaged; convert the model again{more}")
