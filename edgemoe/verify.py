"""`edgemoe verify STORE`: check an expert store end to end without loading the model.

Checks the manifest (format version, fields and their types), that dense.gguf opens as a GGUF,
that every shard exists and is a GGUF whose expert tensors are where the manifest says, and every
expert's planes: lengths and offsets against the scheme's plane sizes and the shard's size, and
each plane's xxh3-64 checksum. Every damaged file, layer, expert and plane is named (one line
each); the exit status is 0 for a clean store and 2 for a damaged one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import store
from .errors import EdgeMoEError

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
        return (f"{self.root}: {state} ({self.shards} shards, {self.experts_checked} experts, "
                f"{self.planes_checked} planes, {self.bytes_checked} bytes checked)")


LIMITS = dict(n_layer=4096, n_expert=1 << 16, n_embd=1 << 20, n_ff_exp=1 << 20)


def _int(v, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {json.dumps(v)[:60]}")
    return v


@dataclass(frozen=True)
class Layout:
    """What a valid manifest says about the experts' bytes."""

    n_layer: int
    n_expert: int
    n_planes: int
    plane_offsets: tuple[int, ...]  # cumulative, n_planes + 1

    @property
    def expert_bytes(self) -> int:
        return self.plane_offsets[-1]


def check_entry(ent, lay: Layout) -> str | None:
    """What is wrong with one expert's manifest entry, or None."""
    try:
        if not isinstance(ent, dict):
            raise ValueError("the entry is not an object")
        off = _int(ent.get("offset"), "offset", 0, 2**62)
        if off % store.ALIGNMENT:
            raise ValueError(f"offset {off} is not a multiple of {store.ALIGNMENT}")
        cum = ent.get("plane_offsets")
        if not isinstance(cum, list) or tuple(cum) != lay.plane_offsets or any(isinstance(c, bool) for c in cum):
            raise ValueError(f"plane_offsets {json.dumps(cum)[:80]} do not match the plane sizes "
                             f"{list(lay.plane_offsets)}")
        cks = ent.get("checksums")
        if not isinstance(cks, list) or len(cks) != lay.n_planes:
            raise ValueError(f"{len(cks) if isinstance(cks, list) else 'no'} checksums for {lay.n_planes} planes")
        for c in cks:
            _int(c, "checksums[]")
    except ValueError as exc:
        return str(exc)
    return None


def check_manifest(m, mpath: Path | str, *, entries: bool = True) -> Layout:
    """Validate a parsed manifest.json: every field StoreReader and the runtime use, with its type and
    range; the scheme must exist and produce exactly the plane sizes listed (so no size in the file
    is trusted for an allocation); entries: every expert entry too. Raises EdgeMoEError."""
    from . import nested

    def bad(what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{mpath}: manifest is missing or has a bad field: {what}")

    if not isinstance(m, dict):
        raise EdgeMoEError(f"{mpath}: manifest is not a JSON object")
    if m.get("format_version") != store.FORMAT_VERSION:
        raise EdgeMoEError(f"{mpath}: store format version {m.get('format_version')!r}, this edgemoe reads "
                           f"version {store.FORMAT_VERSION}; convert the model again")
    try:
        sch = m.get("scheme")
        if not isinstance(sch, dict):
            raise ValueError("scheme must be an object")
        name = sch.get("name")
        if not isinstance(name, str) or name not in nested.SCHEMES:
            raise ValueError(f"scheme.name {json.dumps(name)[:40]} is not one of {', '.join(nested.SCHEMES)}")
        bits = sch.get("bits")
        if not isinstance(bits, list) or not bits:
            raise ValueError("scheme.bits must be a non-empty list")
        bits = tuple(_int(b, "scheme.bits[]", 1, 8) for b in bits)
        group = _int(sch.get("group"), "scheme.group", 1, 1 << 16)
        dims = {k: _int(m.get(k), k, 1, hi) for k, hi in LIMITS.items()}
        try:
            scheme = nested.SCHEMES[name](bits, group)
            shapes = {"gate": (dims["n_ff_exp"], dims["n_embd"]), "up": (dims["n_ff_exp"], dims["n_embd"]),
                      "down": (dims["n_embd"], dims["n_ff_exp"])}
            want = {mat: [int(x) for x in scheme.plane_nbytes(*shapes[mat])] for mat in store.MATRICES}
            planes_for = {str(b): scheme.planes_for(b) for b in scheme.widths}
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"scheme {name} {bits} group {group} for experts {dims['n_embd']}x"
                             f"{dims['n_ff_exp']}: {exc}") from None
        pb = m.get("plane_bytes")
        if not isinstance(pb, dict) or any(pb.get(mat) != want[mat] for mat in store.MATRICES):
            raise ValueError(f"plane_bytes {json.dumps(pb)[:120]} differ from the scheme's {want}")
        if "planes_for" in sch and sch["planes_for"] != planes_for:
            raise ValueError(f"scheme.planes_for {json.dumps(sch['planes_for'])[:80]} differ from {planes_for}")
        experts = m.get("experts")
        if not isinstance(experts, list) or len(experts) != dims["n_layer"]:
            raise ValueError(f"experts must be a list of n_layer={dims['n_layer']} layers")
        for layer, lst in enumerate(experts):
            if not isinstance(lst, list) or len(lst) not in (0, dims["n_expert"]):
                raise ValueError(f"experts[{layer}] must list n_expert={dims['n_expert']} experts (or none)")
        if not any(experts):
            raise ValueError("no layer has experts")
    except ValueError as exc:
        raise bad(str(exc)) from None
    n_planes = len(want["gate"])
    cum = [0]
    for p in range(n_planes):
        cum.append(cum[-1] + sum(want[mat][p] for mat in store.MATRICES))
    lay = Layout(dims["n_layer"], dims["n_expert"], n_planes, tuple(cum))
    if entries:
        for layer, lst in enumerate(experts):
            for e, ent in enumerate(lst):
                err = check_entry(ent, lay)
                if err:
                    raise bad(f"layer {layer} expert {e}: {err}")
    return lay


def _shard_offsets(path: Path, rep: Report) -> dict[str, tuple[int, int]] | None:
    """{tensor name: (absolute data offset, bytes)} of a shard, or None if it does not open."""
    from .gguf_file import GGUFFile

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

    from .gguf_file import GGUFFile

    dense = root / store.DENSE
    try:
        gf = GGUFFile(dense)
    except EdgeMoEError as exc:
        rep.damage(f"{dense}: dense weights do not open ({exc})")
    else:
        try:
            arch = gf.architecture
            for key, want in (("block_count", lay and lay.n_layer), ("expert_count", lay and lay.n_expert),
                              ("embedding_length", raw.get("n_embd") if lay else None)):
                got = gf.get(f"{arch}.{key}")
                if want is not None and got != want:
                    rep.damage(f"{dense}: {arch}.{key} is {got!r}, the manifest says {want}")
            if lay is not None:  # which layers have experts: the model's configuration decides
                from .config import ModelArgs

                args = ModelArgs.from_gguf(gf, n_ff_exp=int(raw.get("n_ff_exp") or 1))
                for i, entries in enumerate(raw["experts"][: args.n_layer]):
                    want_n = 0 if args.is_dense(i) else args.n_expert
                    if len(entries) != want_n:
                        rep.damage(f"{root / store.MANIFEST}: layer {i} has {len(entries)} experts, "
                                   f"the model's configuration has {want_n}")
        except EdgeMoEError as exc:
            rep.damage(str(exc))
        finally:
            gf.close()
    if lay is None:
        return rep

    expected_cum, n_planes, expert_bytes = list(lay.plane_offsets), lay.n_planes, lay.expert_bytes
    for layer, entries in enumerate(raw["experts"]):
        if not entries:
            continue  # a leading dense layer: no shard
        spath = root / store.shard_name(layer)
        if not spath.is_file():
            rep.damage(f"{spath}: missing shard (layer {layer})")
            continue
        rep.shards += 1
        tensors = _shard_offsets(spath, rep)
        size = spath.stat().st_size
        try:
            fd = os.open(spath, os.O_RDONLY)
        except OSError as exc:
            rep.damage(f"{spath}: cannot open shard ({exc.strerror})")
            continue
        try:
            for e, ent in enumerate(entries):
                where = f"{spath}: layer {layer} expert {e}"
                err = check_entry(ent, lay)
                if err:
                    rep.damage(f"{where}: bad manifest entry ({err})")
                    continue
                off, cks = ent["offset"], ent["checksums"]
                if tensors is not None:
                    t = tensors.get(store.expert_tensor_name(layer, e))
                    if t is None:
                        rep.damage(f"{where}: tensor {store.expert_tensor_name(layer, e)} is not in the shard")
                    elif t[0] != off or t[1] < expert_bytes:
                        rep.damage(f"{where}: manifest offset {off} / {expert_bytes} bytes, the shard's tensor "
                                   f"is at {t[0]} with {t[1]} bytes")
                if off + expert_bytes > size:
                    rep.damage(f"{where}: truncated shard: needs bytes {off}..{off + expert_bytes}, "
                               f"file has {size}")
                    continue
                rep.experts_checked += 1
                if not checksums:
                    continue
                try:
                    blob = os.pread(fd, expert_bytes, off)
                except OSError as exc:
                    rep.damage(f"{where}: read failed ({exc.strerror})")
                    continue
                os.posix_fadvise(fd, off, expert_bytes, os.POSIX_FADV_DONTNEED)
                rep.bytes_checked += len(blob)
                for p in range(n_planes):
                    rep.planes_checked += 1
                    if store.checksum(blob[expected_cum[p] : expected_cum[p + 1]]) != cks[p]:
                        rep.damage(f"{where} plane {p}: checksum mismatch (bytes {off + expected_cum[p]}.."
                                   f"{off + expected_cum[p + 1]})")
        finally:
            os.close(fd)
    return rep


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
