"""The one stats tree: what a loaded model reports (Stats, with CacheStats of the expert cache and
a LayerCacheStats per layer), one hit rate, and one JSON shape.

Everybody reads these dataclasses: `edgemoe run --stats`, the chat panel, the server's /stats and
/metrics, the benchmarks. stats_to_dict gives the JSON shape (GET /stats returns it);
stats_from_dict turns it back into the same dataclasses (the monitor reads a server's /stats so),
and a missing or renamed field is an error there rather than a zero on screen.

In the JSON shape the (layer, expert) keys of cache.resident_bits and cache.experts are written
"layer,expert", the int keys of resident_bytes_by_bits and uses_by_bits as strings, tuples as
lists, and hit_rate is added to cache and to every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def hit_rate(hits: int, misses: int, partial_hits: int) -> float | None:
    """hits / (hits + misses + partial hits); None before any lookup."""
    n = hits + misses + partial_hits
    return hits / n if n else None


def percent(x: float | None, digits: int = 1) -> str:
    """A rate as a percentage; "-" for None (no lookups yet)."""
    return "-" if x is None else f"{x:.{digits}%}"


@dataclass(frozen=True)
class LayerCacheStats:
    hits: int
    misses: int
    partial_hits: int
    bytes_read: int
    evictions: int
    upgrades: int
    downgrades: int
    # time the compute waited for the layer's expert planes: the reads themselves on the
    # synchronous path, the waits on the reader thread with the pipeline
    io_stall_s: float

    @property
    def hit_rate(self) -> float | None:
        return hit_rate(self.hits, self.misses, self.partial_hits)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    partial_hits: int
    bytes_read: int
    evictions: int
    upgrades: int
    downgrades: int
    io_stall_s: float  # the layers' io_stall_s summed
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
    def hit_rate(self) -> float | None:
        return hit_rate(self.hits, self.misses, self.partial_hits)


@dataclass(frozen=True)
class Stats:
    """Cumulative counters of a loaded model. The TUI, server and benchmarks all read this."""

    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    resident_bytes: int  # process RSS now minus RSS right after `import edgemoe`
    peak_resident_bytes: int  # peak RSS (VmHWM where the OS has it) minus the same baseline
    budget_bytes: int | None
    model_bytes: int  # the GGUF file
    kv_bytes: int  # the KV cache as allocated (pages are touched only as the context fills)
    n_ctx: int
    cache: CacheStats | None = None  # expert cache figures when experts stream from a store
    # the quality in force (a preset name or thresholds, policy.parse_quality) and whether it is
    # lossless: every plane of every chosen expert, nothing skipped (what "max" computes)
    quality: str = "max"
    lossless: bool = True


# ---- the JSON shape ---------------------------------------------------------------------------


def stats_to_dict(stats: Stats) -> dict[str, Any]:
    """Stats -> a plain dict: string keys, lists for tuples, hit_rate added to cache and to every
    entry of cache.layers; json.loads(json.dumps(d)) == d."""
    d = _plain(dataclasses.asdict(stats))
    c = d["cache"]
    if c is not None:
        c["layers"] = [dict(layer, hit_rate=stats.cache.layers[i].hit_rate) for i, layer in enumerate(c["layers"])]
        c["hit_rate"] = stats.cache.hit_rate
    return d


class StatsFormatError(ValueError):
    """A stats document that is not stats_to_dict's shape; the message names the field."""


def stats_from_dict(d: Any) -> Stats:
    """stats_to_dict's shape (e.g. a server's GET /stats) -> Stats."""
    if not isinstance(d, dict):
        raise StatsFormatError("not a JSON object")
    c = d.get("cache")
    cache = None
    if c is not None:
        if not isinstance(c, dict):
            raise StatsFormatError("cache is not an object")
        layers = tuple(
            _build(LayerCacheStats, layer, f"cache.layers[{i}]") for i, layer in enumerate(_list(c, "layers"))
        )
        cache = _build(
            CacheStats,
            c,
            "cache",
            layers=layers,
            experts={parse_expert_key(k): tuple(v) for k, v in _dict(c, "experts").items()},
            resident_bits={parse_expert_key(k): int(v) for k, v in _dict(c, "resident_bits").items()},
            resident_bytes_by_bits={int(k): v for k, v in _dict(c, "resident_bytes_by_bits").items()},
            uses_by_bits={int(k): v for k, v in _dict(c, "uses_by_bits").items()},
        )
    return _build(Stats, d, "stats", cache=cache)


def _build(cls, d: dict, where: str, **given: Any):
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kw[f.name] = given[f.name]
        elif f.name in d:
            kw[f.name] = d[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise StatsFormatError(f"{where}.{f.name} is missing")
    return cls(**kw)


def _list(d: dict, name: str) -> list:
    v = d.get(name)
    if not isinstance(v, list):
        raise StatsFormatError(f"cache.{name} is not a list")
    return v


def _dict(d: dict, name: str) -> dict:
    v = d.get(name, {})
    if not isinstance(v, dict):
        raise StatsFormatError(f"cache.{name} is not an object")
    return v


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_key(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _key(k: Any) -> str:
    if isinstance(k, tuple):
        return ",".join(str(int(x)) for x in k)  # (layer, expert) -> "layer,expert"
    return str(k)


def parse_expert_key(key: Any) -> tuple[int, int]:
    """ "layer,expert" (or a (layer, expert) tuple) -> (layer, expert)."""
    if isinstance(key, str):
        layer, expert = key.split(",")
        return int(layer), int(expert)
    layer, expert = key
    return int(layer), int(expert)
