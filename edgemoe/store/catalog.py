"""Where expert stores live and which store belongs to which model file.

A model's store is found by the content of its source, not by its path or time: the manifest of a
store records the source's fingerprint (size, the first 16 MiB with the GGUF header and metadata,
the last 1 MiB, and 64 samples of 64 KiB spread over the rest, hashed with xxh3-128; about 21 MB
read however large the file). `edgemoe run -m m.gguf --budget B` uses, in order, the store
`edgemoe convert m.gguf` wrote beside it (m.edgemoe), then the cache's store for that content
(~/.cache/edgemoe/stores, EDGEMOE_CACHE moves it), and converts into the cache only when neither
exists. A copied, renamed or touched model finds its store; a changed one does not.

Every store edgemoe writes or opens is recorded in the cache's index (stores/index.json: store
path, source path, time of last use) so that `edgemoe stores` can list it with its size, source
and last use, and `edgemoe stores --rm` can remove it; the store directories themselves are
never written after conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..errors import EdgeMoEError
from .format import MANIFEST, is_current, is_store

HEAD = 16 << 20
TAIL = 1 << 20
SAMPLES = 64
SAMPLE = 64 << 10
INDEX = "index.json"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe")) / "stores"


def fingerprint(path: Path) -> str:
    """The content identity of a model file (see the module's docstring); 32 hex digits."""
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(HEAD))
            if size > HEAD + TAIL:
                step = (size - HEAD - TAIL) // SAMPLES
                for i in range(SAMPLES):
                    f.seek(HEAD + i * step)
                    h.update(f.read(min(SAMPLE, step)))
            if size > HEAD:
                f.seek(max(HEAD, size - TAIL))
                h.update(f.read())
    except OSError as exc:
        raise EdgeMoEError(f"{path}: cannot read the model file ({exc.strerror or exc})") from None
    return h.hexdigest()


def source_fingerprint(store: Path) -> str | None:
    """The fingerprint a store's manifest records for its source (None: none or unreadable)."""
    try:
        src = json.loads((store / MANIFEST).read_text()).get("source", {})
    except (OSError, ValueError, AttributeError):
        return None
    return src.get("fingerprint") if isinstance(src, dict) else None


def cache_store(model: Path, fp: str) -> Path:
    """Where the cache keeps the store of the model with fingerprint fp."""
    return cache_dir() / f"{model.stem}-{fp[:12]}.edgemoe"


def find_store(model: Path) -> tuple[Path | None, str]:
    """(the existing store for model's content, marked used, or None; model's fingerprint). The
    store beside the model (what `edgemoe convert` writes by default) first, then the cache's."""
    fp = fingerprint(model)
    renamed = sorted(cache_dir().glob(f"*-{fp[:12]}.edgemoe"))  # the same content under another name
    for cand in (model.with_suffix(".edgemoe"), cache_store(model, fp), *renamed):
        if is_store(cand) and source_fingerprint(cand) == fp and is_current(cand):  # older formats: again
            mark_used(cand)
            return cand, fp
    return None, fp


def ensure_writable_dir(path: Path, what: str) -> None:
    """mkdir -p path, or one error naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise EdgeMoEError(f"{path}: cannot write {what} there ({exc.strerror or exc})") from None


# ---- the index: every store edgemoe wrote, for `edgemoe stores` -------------------------------


def _read_index() -> dict[str, dict]:
    """{store path: {"source": its source's path or None, "used": time of last use}}."""
    try:
        data = json.loads((cache_dir() / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def _write_index(entries: dict[str, dict]) -> None:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{INDEX}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, d / INDEX)
    except OSError:
        pass  # the index only serves `edgemoe stores`


def record(store: Path, source: Path) -> None:
    """Note a store edgemoe wrote, its source and its use now, in the index."""
    entries = _read_index()
    entries[str(store.resolve())] = dict(source=str(source.resolve()), used=time.time())
    _write_index(entries)


def mark_used(store: Path) -> None:
    entries = _read_index()
    entries.setdefault(str(store.resolve()), dict(source=None))["used"] = time.time()
    _write_index(entries)


@dataclass(frozen=True)
class StoreEntry:
    path: Path
    source: str  # the source's path when known, else its file name from the manifest
    source_present: bool | None  # None: only its file name is known (a store from before the index)
    nbytes: int
    last_used: float


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entry(path: Path, info: dict) -> StoreEntry:
    try:
        name = json.loads((path / MANIFEST).read_text())["source"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        name = "?"
    source = info.get("source") if isinstance(info.get("source"), str) else None
    used = info.get("used")
    last = float(used) if isinstance(used, (int, float)) else (path / MANIFEST).stat().st_mtime
    present = None if source is None else Path(source).exists()
    return StoreEntry(path, source or name, present, _size(path), last)


def list_stores() -> list[StoreEntry]:
    """The cache's stores and the indexed ones elsewhere that still exist, most recently used first."""
    index = _read_index()
    gone = [p for p in index if not is_store(p)]
    if gone:  # removed by hand: forget them
        _write_index({k: v for k, v in index.items() if k not in gone})
    paths = {str(p.resolve()) for p in cache_dir().glob("*.edgemoe") if is_store(p)}
    paths |= {p for p in index if p not in gone}
    out = [_entry(Path(p), index.get(p, {})) for p in paths]
    return sorted(out, key=lambda e: -e.last_used)


def resolve(name: str) -> Path:
    """A store named by path, or by its directory name in the cache (with or without .edgemoe)."""
    cands = [Path(name)] if os.sep in name or name.endswith(".edgemoe") else []
    cands += [cache_dir() / name, cache_dir() / f"{name}.edgemoe"]
    for c in cands:
        if is_store(c):
            return c
    raise EdgeMoEError(f"{name}: no such expert store (see `edgemoe stores`)")


def remove(name: str) -> Path:
    """Delete a store (after checking it is one) and drop it from the index; returns its path."""
    path = resolve(name)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise EdgeMoEError(f"{path}: cannot remove the store ({exc.strerror or exc})") from None
    entries = _read_index()
    if entries.pop(str(path.resolve()), None) is not None:
        _write_index(entries)
    return path


def age(seconds_since_epoch: float, now: float | None = None) -> str:
    """'just now', '5 minutes ago', '3 days ago'."""
    s = max(0.0, (time.time() if now is None else now) - seconds_since_epoch)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = int(s // n)
            return f"{k} {unit}{'s' * (k != 1)} ago"
    return "just now"
