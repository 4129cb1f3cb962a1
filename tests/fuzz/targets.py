"""The fuzz targets, shared by the bounded hypothesis tests (tests/fuzz/test_fuzz_*.py) and the long
fork-isolated runs (tools/fuzz_long.py). Each check_* returns "ok" or "rejected" and raises
anything else (an AssertionError for a broken property, or the unexpected exception itself)."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np

import edgemoe
from edgemoe.models.gguf_file import GGUFFile
from edgemoe.store import reader as store_mod

from .gguf_layout import SCALAR, layout, put_u32, put_u64

ALLOC_LIMIT = 64 << 20  # traced Python/numpy allocations per input
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    31,
    32,
    33,
    255,
    256,
    4095,
    4096,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
KINDS = ("u64", "u32", "byte", "any_byte", "truncate")


class Seed:
    """A seed file's bytes and header layout (a short repr for hypothesis' reports)."""

    def __init__(self, data: bytes):
        self.data, self.layout = data, layout(data)

    def __repr__(self) -> str:
        return f"Seed({len(self.data)} bytes)"


def value_ranges(seed: Seed) -> list[tuple[int, int]]:
    """Byte ranges of the architecture's numeric metadata values (head counts, lengths, ...)."""
    out = []
    for key, _klen, _tpos, vpos, vtype in seed.layout.kvs:
        if vtype in SCALAR and not key.startswith(("general.", "tokenizer.")):
            out.append((vpos, vpos + SCALAR[vtype]))
    return out


def mutate(seed: Seed, muts, structure_only: bool = False) -> bytes:
    """muts: (kind, where, value) with kind in KINDS: overwrite a u64/u32 header field (counts,
    lengths, dimensions, offsets, types), a header byte, any byte, or truncate. structure_only:
    leave the architecture's numeric metadata values alone (what they mean is config.py's to check,
    see docs/reliability.md)."""
    lay = seed.layout
    buf = bytearray(seed.data)
    protected = value_ranges(seed) if structure_only else []
    u64, u32 = lay.u64_fields(), lay.u32_fields()
    for kind, where, value in muts:
        if kind == "u64":
            pos, fn, n = u64[where % len(u64)], put_u64, 8
        elif kind == "u32":
            pos, fn, n = u32[where % len(u32)], put_u32, 4
        elif kind in ("byte", "any_byte"):
            pos = where % (lay.data_start if kind == "byte" else len(seed.data))
            if pos < len(buf) and not any(a <= pos < b for a, b in protected):
                buf[pos] = value % 256
            continue
        else:
            del buf[where % (len(buf) + 1) :]
            continue
        if pos + n <= len(buf):
            fn(buf, pos, value)
    return bytes(buf)


class _AllocGuard:
    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if exc[0] is None:
            assert peak < ALLOC_LIMIT, f"{peak} bytes allocated for one input"
        return False


def check_gguf(path: Path, run_model: bool = True, generate: bool = True) -> str:
    """GGUFFile, then edgemoe.load, then (generate) logits of two tokens."""
    with _AllocGuard():
        try:
            gf = GGUFFile(path)
        except edgemoe.EdgeMoEError as exc:
            assert str(path) in str(exc), f"the error does not name the file: {exc}"
            return "rejected"
        size = path.stat().st_size
        for t in gf.tensors.values():
            assert t.nbytes <= size
        gf.close()
        if not run_model:
            return "ok"
        try:
            with edgemoe.load(path, n_ctx=16) as m:
                if generate:
                    m.logits([1, 2])
        except edgemoe.EdgeMoEError:
            return "rejected"
        return "ok"


# ---- the store: manifest.json and shards -----------------------------------------------------------


def manifest_paths(obj, prefix=()):
    """Every JSON path in the manifest (lists of experts sampled: they repeat)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from manifest_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        idx = range(len(obj)) if len(obj) <= 4 else (0, 1, len(obj) - 1)
        for i in idx:
            yield from manifest_paths(obj[i], prefix + (i,))


DELETE = object()


def set_path(obj, path, value):
    if not path:
        return {} if value is DELETE else value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    if value is DELETE:
        if isinstance(cur, dict):
            cur.pop(path[-1], None)
        else:
            del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def validated_reader(root: Path) -> store_mod.StoreReader:
    """StoreReader behind edgemoe.store.format.check_manifest: the check this report asks StoreReader to
    make itself (see docs/reliability.md, "Findings" 2); with it, no manifest reaches the reader's
    arithmetic or an allocation unchecked."""
    from edgemoe.store.format import check_manifest

    mpath = root / store_mod.MANIFEST
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError):
        raw = None  # StoreReader words this error itself
    if raw is not None:
        check_manifest(raw, mpath)
    return store_mod.StoreReader(root)


def read_all(root: Path, validate: bool = True) -> None:
    """Open the store and read every plane of every expert (raises on damage)."""
    r = validated_reader(root) if validate else store_mod.StoreReader(root)
    try:
        r.check_dense()  # dense.gguf's tensors and configuration, as a load checks them
        for layer, entries in enumerate(r.locations):
            for e in range(len(entries)):
                bufs = [np.empty(n, dtype=np.uint8) for n in r.plane_sizes(layer)]
                r.read_planes(layer, e, 0, bufs)
    finally:
        r.close()


def check_store(root: Path, load_model: bool = False, validate: bool = True) -> str:
    """verify() and the reader agree: a store verify passes reads cleanly (and loads and runs, with
    load_model), a store the reader cannot read is reported damaged. Nothing but EdgeMoEError
    escapes either. validate=False: StoreReader on the raw manifest, as store.py does today."""
    from edgemoe.store.verify import verify

    with _AllocGuard():
        try:
            damages = verify(root).damages
        except edgemoe.EdgeMoEError as exc:
            damages = [str(exc)]
        clean = not damages
        try:
            read_all(root, validate)
            refused = None
        except edgemoe.EdgeMoEError as exc:
            refused = str(exc)
        # both ways: what verify calls damage the loader refuses, and the other way round
        assert clean or refused, f"verify reports damage the loader accepts: {damages[:3]}"
        assert not (clean and refused), f"verify passed a store that the loader refuses: {refused}"
    if load_model and clean:  # outside the guard: a first load compiles kernels (tens of MB, not the input's doing)
        with edgemoe.load(root, n_ctx=16) as m:
            m.logits([1, 2])
    return "ok" if clean else "rejected"


def checked_ranges(root: Path, name: str) -> list[tuple[int, int]]:
    """The byte ranges of a store's file that change a result (and are checked): dense.gguf's
    header and tensors, a shard's header and its experts' planes; not the padding between them."""
    import gguf

    m = json.loads((root / store_mod.MANIFEST).read_text())
    if name == store_mod.DENSE:
        r = gguf.GGUFReader(root / name)
        return [(0, m["dense"]["header_bytes"])] + [
            (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in r.tensors
        ]
    layer = int(name[8:11])
    head = (0, m["shard_headers"][layer]["bytes"])
    return [head] + [(a, b) for (lay, _e, _p, a, b) in expert_ranges(root) if lay == layer]


def expert_ranges(root: Path) -> list[tuple[int, int, int, int, int]]:
    """(layer, expert, plane, start, end) byte ranges of every plane in the shards."""
    m = json.loads((root / store_mod.MANIFEST).read_text())
    out = []
    for layer, entries in enumerate(m["experts"]):
        for e, ent in enumerate(entries):
            cum = ent["plane_offsets"]
            for p in range(len(cum) - 1):
                out.append((layer, e, p, ent["offset"] + cum[p], ent["offset"] + cum[p + 1]))
    return out
