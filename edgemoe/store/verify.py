"""`edgemoe verify STORE`: check an expert store end to end without loading the model.

Checks the manifest (format version, fields and their types, its checksum), dense.gguf (its
header and each tensor against their checksums, its configuration against the manifest), that
every shard exists, has the header that was written and is a GGUF whose expert tensors are where
the manifest says, and every expert's planes: lengths and offsets against the scheme's plane sizes
and the shard's size, and each plane's xxh3-64 checksum. Every byte that changes a result is
covered, with the loader's own checks (integrity.py): what verify calls damage, loading refuses.
Every damaged file, tensor, layer, expert and plane is named (one line each); the exit status is
0 for a clean store and 2 for a damaged one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeMoEError
from . import format as store
from . import integrity
from .format import Layout, check_entry, check_manifest

MAX_LISTED = 200
_UNREADABLE = object()  # damage lines printed in full; the summary counts all of them


@dataclass
class Report:
    root: Path
    damages: list[str] = field(default_factory=list)
    experts_checked: int = 0
    planes_checked: int = 0
    bytes_checked: int = 0
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.damages

    def damage(self, what: str) -> None:
        self.damages.append(what)

    def summary(self) -> str:
        state = "OK" if self.ok else f"DAMAGED: {len(self.damages)} problem{'s' * (len(self.damages) != 1)}"
        return (
            f"{self.root}: {state} ({self.shards} shards, {self.experts_checked} experts, "
            f"{self.planes_checked} planes, {self.bytes_checked} bytes checked)"
        )


def _shard_offsets(path: Path, rep: Report) -> dict[str, tuple[int, int]] | None:
    """{tensor name: (absolute data offset, bytes)} of a shard, or None if it does not open."""
    from ..models.gguf_file import GGUFFile

    try:
        gf = GGUFFile(path)
    except EdgeMoEError as exc:
        rep.damage(str(exc))
        return None
    try:
        base = gf._reader.data.__array_interface__["data"][0]
        return {n: (t.data.__array_interface__["data"][0] - base, t.nbytes) for n, t in gf.tensors.items()}
    finally:
        gf.close()


def verify(root: str | os.PathLike[str], *, checksums: bool = True) -> Report:
    root = Path(root)
    rep = Report(root)
    if not root.is_dir():
        raise EdgeMoEError(f"{root}: not a directory (an expert store is a directory)")
    raw, lay = _read_manifest(root, rep)
    _check_dense(root, raw, lay, rep)
    if lay is None:
        return rep
    for layer, entries in enumerate(raw["experts"]):
        if not entries:
            continue  # a leading dense layer: no shard
        _check_shard(root, layer, entries, lay, raw["shard_headers"], rep, checksums)
    return rep


def _read_manifest(root: Path, rep: Report) -> tuple[Any, Layout | None]:
    """The manifest as read (_UNREADABLE if it does not parse) and its layout (None if damaged)."""
    mpath = root / store.MANIFEST
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeMoEError(f"{root}: not an expert store (no {store.MANIFEST})") from None
    except (OSError, ValueError) as exc:
        rep.damage(f"{mpath}: unreadable manifest ({exc})")
        raw = _UNREADABLE
    lay = None
    if raw is not _UNREADABLE:
        try:
            lay = check_manifest(raw, mpath, entries=False)
        except EdgeMoEError as exc:
            rep.damage(str(exc))
    return raw, lay


def _check_dense(root: Path, raw, lay: Layout | None, rep: Report) -> None:
    """dense.gguf's header and every tensor against their checksums, its configuration against the
    manifest's (integrity.py: the loader's checks); without a valid manifest, only that it opens."""
    dense = root / store.DENSE
    if lay is not None:
        bad = integrity.dense_header_damage(root, raw)
        if bad:
            rep.damage(bad)
    try:
        gf = integrity.open_dense(dense)
    except EdgeMoEError as exc:
        rep.damage(f"{dense}: dense weights do not open ({exc})")
        return
    try:
        if lay is not None:
            for d in integrity.dense_damage(root, raw, gf):
                rep.damage(d)
            rep.bytes_checked += raw["dense"]["header_bytes"] + sum(t.nbytes for t in gf.tensors.values())
    except EdgeMoEError as exc:
        rep.damage(str(exc))
    finally:
        gf.close()


@dataclass
class _Shard:
    path: Path
    layer: int
    fd: int
    size: int
    tensors: dict[str, tuple[int, int]] | None  # None: the shard does not open as a GGUF


def _check_shard(
    root: Path, layer: int, entries: list, lay: Layout, raw_headers: list, rep: Report, checksums: bool
) -> None:
    spath = root / store.shard_name(layer)
    if not spath.is_file():
        rep.damage(f"{spath}: missing shard (layer {layer})")
        return
    rep.shards += 1
    tensors = _shard_offsets(spath, rep)
    size = spath.stat().st_size
    try:
        fd = os.open(spath, os.O_RDONLY)
    except OSError as exc:
        rep.damage(f"{spath}: cannot open shard ({exc.strerror})")
        return
    try:
        bad = integrity.header_damage(spath, fd, raw_headers[layer], integrity.SHARD_HEADER)
        if bad:
            rep.damage(bad)
        shard = _Shard(spath, layer, fd, size, tensors)
        for e, ent in enumerate(entries):
            _check_expert(shard, e, ent, lay, rep, checksums)
    finally:
        os.close(fd)


def _check_expert(shard: _Shard, e: int, ent, lay: Layout, rep: Report, checksums: bool) -> None:
    """An expert's manifest entry against the shard's tensor and size, then its planes' checksums."""
    where = f"{shard.path}: layer {shard.layer} expert {e}"
    err = check_entry(ent, lay, shard.layer)
    if err:
        rep.damage(f"{where}: bad manifest entry ({err})")
        return
    off, expert_bytes = ent["offset"], lay.expert_bytes(shard.layer)
    if shard.tensors is not None:
        t = shard.tensors.get(store.expert_tensor_name(shard.layer, e))
        if t is None:
            rep.damage(f"{where}: tensor {store.expert_tensor_name(shard.layer, e)} is not in the shard")
        elif t[0] != off or t[1] < expert_bytes:
            rep.damage(
                f"{where}: manifest offset {off} / {expert_bytes} bytes, the shard's tensor "
                f"is at {t[0]} with {t[1]} bytes"
            )
    if off + expert_bytes > shard.size:
        rep.damage(f"{where}: truncated shard: needs bytes {off}..{off + expert_bytes}, file has {shard.size}")
        return
    rep.experts_checked += 1
    if checksums:
        _check_planes(shard.fd, where, off, ent["checksums"], lay.plane_offsets(shard.layer), rep)


def _check_planes(fd: int, where: str, off: int, cks: list[int], cum: tuple[int, ...], rep: Report) -> None:
    expert_bytes = cum[-1]
    try:
        blob = os.pread(fd, expert_bytes, off)
    except OSError as exc:
        rep.damage(f"{where}: read failed ({exc.strerror})")
        return
    os.posix_fadvise(fd, off, expert_bytes, os.POSIX_FADV_DONTNEED)
    rep.bytes_checked += len(blob)
    for p in range(len(cum) - 1):
        rep.planes_checked += 1
        if store.checksum(blob[cum[p] : cum[p + 1]]) != cks[p]:
            rep.damage(f"{where} plane {p}: checksum mismatch (bytes {off + cum[p]}..{off + cum[p + 1]})")


def main(root: str, *, quiet: bool = False, out=None) -> int:
    """Print one line per damage, then the summary; 0 if clean, 2 if damaged."""
    out = out or sys.stdout
    rep = verify(root)
    for i, d in enumerate(rep.damages):
        if i == MAX_LISTED:
            print(f"... and {len(rep.damages) - MAX_LISTED} more", file=out)
            break
        print(d, file=out)
    if not quiet or not rep.ok:
        print(rep.summary(), file=out)
    return 0 if rep.ok else 2
