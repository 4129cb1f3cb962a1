"""Stats as a plain, JSON-ready dict: what the live panel reads, in the chat app and in the monitor.

stats_to_dict(model.stats()) is dataclasses.asdict with the tuple keys of cache.resident_bits and
cache.experts written "layer,expert", int keys (resident_bytes_by_bits, uses_by_bits) written as
strings and tuples as lists, so json.dumps(stats_to_dict(s)) is what `edgemoe serve` returns on GET /stats and
json.loads of that feeds the panel unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def stats_to_dict(stats: Any) -> dict[str, Any]:
    """edgemoe.api.Stats -> a plain dict: string keys, lists for tuples, hit_rate added to cache and
    to every entry of cache.layers; json.loads(json.dumps(d)) == d."""
    d = _plain(dataclasses.asdict(stats))
    c = d.get("cache")
    if c is not None:
        c["layers"] = [dict(layer, hit_rate=stats.cache.layers[i].hit_rate) for i, layer in enumerate(c["layers"])]
        c["hit_rate"] = stats.cache.hit_rate
    return d


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


def expert_key(key: Any) -> str:
    """(layer, expert) -> "layer,expert" (strings pass through)."""
    if isinstance(key, str):
        return key
    layer, expert = key
    return f"{int(layer)},{int(expert)}"


def parse_expert_key(key: Any) -> tuple[int, int]:
    """ "layer,expert" (or a (layer, expert) tuple) -> (layer, expert)."""
    if isinstance(key, str):
        layer, expert = key.split(",")
        return int(layer), int(expert)
    layer, expert = key
    return int(layer), int(expert)


def hit_rate(d: dict[str, Any]) -> float | None:
    """hits / (hits + misses + partial hits) of a cache or layer dict; None before any lookup."""
    n = d.get("hits", 0) + d.get("misses", 0) + d.get("partial_hits", 0)
    return d.get("hits", 0) / n if n else None
