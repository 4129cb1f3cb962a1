"""The expert store's format, defined once: a directory holding a model with its experts as nested bit planes.

    STORE/
      manifest.json      format version, model config, scheme, per-expert per-plane offsets,
                         lengths and xxh3-64 checksums; xxh3-64 of dense.gguf's header and of each
                         of its tensors, of each shard's header, and of its own fields
                         (store/integrity.py: what is checked where)
      dense.gguf         every non-expert tensor in its source type, with all source metadata
                         (so llama.cpp reads the vocabulary from it): resident at run time
      experts-LLL.gguf   one GGUF per layer; tensor `blk.L.exp.E` (I8, 4 KiB aligned) holds expert
                         E's planes plane-major: [gate p0 | up p0 | down p0 | gate p1 | up p1 | ...]

Plane-major means reading an expert at k planes is ONE contiguous read, and upgrading it from k to
k' planes is one more contiguous read. Standard GGUF tools can list both kinds of file.

The manifest's scheme is a nested.Scheme (name, bits, group; plane_bytes {matrix: [bytes per
plane]}, the same in every layer) or "native" (the source's blocks, quant/native.py: scheme.types
lists per layer the ggml type of gate, up and down, null for a layer without experts, and
plane_bytes is a list of such dicts per layer, as the types' sizes differ from layer to layer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import xxhash

from ..errors import EdgeMoEError
from ..quant import native, nested

FORMAT_VERSION = 2  # 2: checksums of dense.gguf, the shard headers and the manifest
MANIFEST = "manifest.json"
DENSE = "dense.gguf"
ALIGNMENT = 4096
MATRICES = ("gate", "up", "down")


def shard_name(layer: int) -> str:
    return f"experts-{layer:03d}.gguf"


def expert_tensor_name(layer: int, expert: int) -> str:
    return f"blk.{layer}.exp.{expert}"


def checksum(buf) -> int:
    return xxhash.xxh3_64_intdigest(buf)


def is_store(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_current(path: str | os.PathLike[str]) -> bool:
    """Whether a directory is a store of this format version (a store of another one is
    converted again when it is the cache's, refused when it is named)."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format_version") == FORMAT_VERSION


LIMITS = dict(n_layer=4096, n_expert=1 << 16, n_embd=1 << 20, n_ff_exp=1 << 20)


def _int(v, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {json.dumps(v)[:60]}")
    return v


@dataclass(frozen=True)
class Layout:
    """What a valid manifest says about the experts' bytes: per layer (None: no experts) and
    matrix, the bytes of each plane."""

    n_layer: int
    n_expert: int
    n_planes: int
    plane_bytes: tuple[dict[str, tuple[int, ...]] | None, ...]

    def plane_offsets(self, layer: int) -> tuple[int, ...]:
        """An expert's cumulative plane offsets in this layer (n_planes + 1)."""
        pb = self.plane_bytes[layer]
        cum = [0]
        for p in range(self.n_planes):
            cum.append(cum[-1] + sum(pb[m][p] for m in MATRICES))
        return tuple(cum)

    def expert_bytes(self, layer: int) -> int:
        return self.plane_offsets(layer)[-1]


def scheme_of(sch: dict):
    """The scheme object a manifest's "scheme" names: a nested.Scheme (re-fitted planes, one
    layout for every layer) or a native.NativeScheme per layer (the source's blocks: a list, None
    for layers without experts). Raises ValueError."""
    if not isinstance(sch, dict):
        raise ValueError("scheme must be an object")
    name = sch.get("name")
    if name == native.NativeScheme.name:
        types = sch.get("types")
        if not isinstance(types, list) or not types:
            raise ValueError("scheme.types must be a list with one entry per layer")
        given = []
        for layer, t in enumerate(types):
            if t is None:
                given.append(None)
                continue
            if not isinstance(t, dict) or set(t) != set(MATRICES):
                raise ValueError(f"scheme.types[{layer}] must name the type of {', '.join(MATRICES)}")
            try:
                given.append({m: gguf.GGMLQuantizationType[t[m]] for m in MATRICES})
            except (KeyError, TypeError):
                raise ValueError(f"scheme.types[{layer}] {json.dumps(t)[:80]} names an unknown GGML type") from None
        return native.store_schemes(given)
    if not isinstance(name, str) or name not in nested.SCHEMES:
        names = ", ".join([*nested.SCHEMES, native.NativeScheme.name])
        raise ValueError(f"scheme.name {json.dumps(name)[:40]} is not one of {names}")
    bits = sch.get("bits")
    if not isinstance(bits, list) or not bits:
        raise ValueError("scheme.bits must be a non-empty list")
    bits = tuple(_int(b, "scheme.bits[]", 1, 8) for b in bits)
    group = _int(sch.get("group"), "scheme.group", 1, 1 << 16)
    try:
        return nested.SCHEMES[name](bits, group)
    except ValueError as exc:
        raise ValueError(f"scheme {name} {bits} group {group}: {exc}") from None


def matrix_plane_bytes(scheme, shapes: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Per matrix, the bytes of each of its planes under this scheme (one layer's, for native)."""
    if isinstance(scheme, native.NativeScheme):
        return {m: [int(x) for x in scheme.plane_nbytes(m, *shapes[m])] for m in MATRICES}
    return {m: [int(x) for x in scheme.plane_nbytes(*shapes[m])] for m in MATRICES}


def expert_shapes(n_embd: int, n_ff_exp: int) -> dict[str, tuple[int, int]]:
    return {"gate": (n_ff_exp, n_embd), "up": (n_ff_exp, n_embd), "down": (n_embd, n_ff_exp)}


def check_entry(ent, lay: Layout, layer: int) -> str | None:
    """What is wrong with one expert's manifest entry in this layer, or None."""
    try:
        if not isinstance(ent, dict):
            raise ValueError("the entry is not an object")
        off = _int(ent.get("offset"), "offset", 0, 2**62)
        if off % ALIGNMENT:
            raise ValueError(f"offset {off} is not a multiple of {ALIGNMENT}")
        cum = ent.get("plane_offsets")
        want = lay.plane_offsets(layer)
        if not isinstance(cum, list) or tuple(cum) != want or any(isinstance(c, bool) for c in cum):
            raise ValueError(f"plane_offsets {json.dumps(cum)[:80]} do not match the plane sizes {list(want)}")
        cks = ent.get("checksums")
        if not isinstance(cks, list) or len(cks) != lay.n_planes:
            raise ValueError(f"{len(cks) if isinstance(cks, list) else 'no'} checksums for {lay.n_planes} planes")
        for c in cks:
            _int(c, "checksums[]")
    except ValueError as exc:
        return str(exc)
    return None


def version_error(mpath: Path | str, version) -> str:
    """The refusal of a store of another format version."""
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < FORMAT_VERSION:
        return (
            f"{mpath}: store format version {version} has no checksums of dense.gguf and the shard "
            f"headers (a damaged byte there would go unnoticed); this edgemoe reads version "
            f"{FORMAT_VERSION}: convert the model again (edgemoe convert MODEL.gguf -o {Path(mpath).parent} --force)"
        )
    return (
        f"{mpath}: store format version {version!r}, this edgemoe reads version {FORMAT_VERSION}; "
        f"convert the model again"
    )


def manifest_checksum(m: dict) -> int:
    """xxh3-64 of every field of a manifest but the experts' entries (each plane has its own
    checksum) and this checksum itself, as canonical JSON."""
    fields = {k: v for k, v in m.items() if k not in ("experts", "manifest_xxh3")}
    return checksum(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def _integrity_fields(m: dict, experts: list) -> None:
    """The types of the checksums integrity.py reads: dense, shard_headers, manifest_xxh3."""
    d = m.get("dense")
    if not isinstance(d, dict):
        raise ValueError("dense must be an object")
    _int(d.get("header_bytes"), "dense.header_bytes", 1, 2**62)
    _int(d.get("header_xxh3"), "dense.header_xxh3")
    tensors = d.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("dense.tensors must map each tensor name to its checksum")
    for v in tensors.values():
        _int(v, "dense.tensors[]")
    sh = m.get("shard_headers")
    if not isinstance(sh, list) or len(sh) != len(experts):
        raise ValueError("shard_headers must have one entry per layer")
    for layer, (h, lst) in enumerate(zip(sh, experts)):
        if not lst:
            if h is not None:
                raise ValueError(f"shard_headers[{layer}] must be null: layer {layer} has no experts")
            continue
        if not isinstance(h, dict):
            raise ValueError(f"shard_headers[{layer}] must be an object for a layer with experts (null without)")
        _int(h.get("bytes"), f"shard_headers[{layer}].bytes", 1, 2**62)
        _int(h.get("xxh3"), f"shard_headers[{layer}].xxh3")
    _int(m.get("manifest_xxh3"), "manifest_xxh3")


def check_manifest(m, mpath: Path | str, *, entries: bool = True) -> Layout:
    """Validate a parsed manifest.json: every field StoreReader and the runtime use, with its type and
    range; the scheme must exist and produce exactly the plane sizes listed (so no size in the file
    is trusted for an allocation); entries: every expert entry too. Raises EdgeMoEError."""

    def bad(what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{mpath}: manifest is missing or has a bad field: {what}")

    if not isinstance(m, dict):
        raise EdgeMoEError(f"{mpath}: manifest is not a JSON object")
    if m.get("format_version") != FORMAT_VERSION:
        raise EdgeMoEError(version_error(mpath, m.get("format_version")))
    try:
        dims = {k: _int(m.get(k), k, 1, hi) for k, hi in LIMITS.items()}
        sch = m.get("scheme")
        scheme = scheme_of(sch)
        shapes = expert_shapes(dims["n_embd"], dims["n_ff_exp"])
        experts = m.get("experts")
        if not isinstance(experts, list) or len(experts) != dims["n_layer"]:
            raise ValueError(f"experts must be a list of n_layer={dims['n_layer']} layers")
        for layer, lst in enumerate(experts):
            if not isinstance(lst, list) or len(lst) not in (0, dims["n_expert"]):
                raise ValueError(f"experts[{layer}] must list n_expert={dims['n_expert']} experts (or none)")
        if not any(experts):
            raise ValueError("no layer has experts")
        layers, n_planes = _plane_bytes(m, sch, scheme, shapes, experts)
        _integrity_fields(m, experts)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if manifest_checksum(m) != m["manifest_xxh3"]:
        raise EdgeMoEError(
            f"{mpath}: checksum mismatch: a field of the manifest (scheme, sizes, checksums) is not "
            f"what was written; convert the model again"
        )
    lay = Layout(dims["n_layer"], dims["n_expert"], n_planes, tuple(layers))
    if entries:
        for layer, lst in enumerate(experts):
            for e, ent in enumerate(lst):
                err = check_entry(ent, lay, layer)
                if err:
                    raise bad(f"layer {layer} expert {e}: {err}")
    return lay


def _plane_bytes(m: dict, sch: dict, scheme, shapes, experts) -> tuple[list, int]:
    """Per layer the plane bytes the scheme gives (checked against the manifest's), and n_planes."""
    pb = m.get("plane_bytes")
    if isinstance(scheme, list):  # native: per layer
        if len(scheme) != len(experts) or not isinstance(pb, list) or len(pb) != len(experts):
            raise ValueError("scheme.types and plane_bytes must have one entry per layer")
        layers = []
        for layer, (s, lst) in enumerate(zip(scheme, experts)):
            if (s is None) != (not lst):
                raise ValueError(f"scheme.types[{layer}] must be given exactly for the layers with experts")
            want = None
            if s is not None:
                try:
                    want = matrix_plane_bytes(s, shapes)
                except ValueError as exc:
                    raise ValueError(f"layer {layer}: {exc}") from None
            if pb[layer] != want:
                raise ValueError(f"plane_bytes[{layer}] {json.dumps(pb[layer])[:120]} differ from the scheme's {want}")
            layers.append(None if want is None else {k: tuple(v) for k, v in want.items()})
        n_planes = {len(x["gate"]) for x in layers if x is not None}
        if len(n_planes) != 1:
            raise ValueError("the layers' experts have different numbers of planes")
        return layers, n_planes.pop()
    try:
        want = matrix_plane_bytes(scheme, shapes)
        planes_for = {str(b): scheme.planes_for(b) for b in scheme.widths}
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"scheme {scheme!r} for experts {shapes['down'][0]}x{shapes['down'][1]}: {exc}") from None
    if not isinstance(pb, dict) or any(pb.get(mat) != want[mat] for mat in MATRICES):
        raise ValueError(f"plane_bytes {json.dumps(pb)[:120]} differ from the scheme's {want}")
    if "planes_for" in sch and sch["planes_for"] != planes_for:
        raise ValueError(f"scheme.planes_for {json.dumps(sch['planes_for'])[:80]} differ from {planes_for}")
    per = {k: tuple(v) for k, v in want.items()}
    return [per if lst else None for lst in experts], len(want["gate"])
