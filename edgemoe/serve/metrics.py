"""Prometheus text exposition (format 0.0.4) of a model's Stats and the server's counters."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..runtime.stats import CacheStats, Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Exposition:
    """Collects metric families and renders them; each family gets one HELP and one TYPE line."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, Any], float | int]]
    ) -> None:
        samples = list(samples)
        if not samples:
            return
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{lab}}} {_fmt(value)}" if lab else f"{name} {_fmt(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | int | None) -> None:
        if value is not None:
            self.family(name, kind, help_text, [({}, value)])

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def render(
    stats: Stats,
    *,
    queue_depth: int = 0,
    in_flight: int = 0,
    requests: Mapping[tuple[str, int], int] | None = None,
    model: str = "",
) -> str:
    """The /metrics page of a model's Stats; requests maps (endpoint, HTTP status) -> count."""
    e = Exposition()
    _speed_and_memory(e, stats)
    _quality(e, stats)
    c = stats.cache
    if c is not None:
        _cache_totals(e, c)
        _cache_layers(e, c)
    _server(e, queue_depth, in_flight, requests, model)
    return e.render()


def _speed_and_memory(e: Exposition, stats: Stats) -> None:
    """Tokens, speeds, memory and sizes."""
    e.one(
        "edgemoe_prompt_tokens_total",
        "counter",
        "Prompt tokens evaluated (prefix-cache reuse excluded).",
        stats.prompt_tokens,
    )
    e.one("edgemoe_generated_tokens_total", "counter", "Tokens generated.", stats.generated_tokens)
    e.one(
        "edgemoe_prompt_tokens_per_second",
        "gauge",
        "Prompt evaluation speed, cumulative average.",
        stats.prompt_tokens_per_s,
    )
    e.one("edgemoe_decode_tokens_per_second", "gauge", "Decode speed, cumulative average.", stats.decode_tokens_per_s)
    e.one(
        "edgemoe_resident_bytes", "gauge", "Process RSS now minus RSS right after import edgemoe.", stats.resident_bytes
    )
    e.one("edgemoe_peak_resident_bytes", "gauge", "Peak RSS minus the same baseline.", stats.peak_resident_bytes)
    e.one(
        "edgemoe_budget_bytes",
        "gauge",
        "Memory budget (absent when the model runs in place without one).",
        stats.budget_bytes,
    )
    e.one("edgemoe_model_bytes", "gauge", "Size of the model file (or store).", stats.model_bytes)
    e.one("edgemoe_kv_bytes", "gauge", "KV cache as allocated.", stats.kv_bytes)
    e.one("edgemoe_context_tokens", "gauge", "Context length n_ctx.", stats.n_ctx)


def _quality(e: Exposition, stats: Stats) -> None:
    """The quality in force: every speed and cache figure here was measured at it."""
    e.family(
        "edgemoe_quality_info",
        "gauge",
        "The quality in force, which every speed and cache figure is measured at; lossless is true "
        "when it computes every plane of every chosen expert and skips none (max).",
        [({"quality": stats.quality, "lossless": "true" if stats.lossless else "false"}, 1)],
    )
    e.one(
        "edgemoe_quality_lossless",
        "gauge",
        "1 when the quality in force is lossless (max), 0 when it reads fewer bits or skips experts.",
        stats.lossless,
    )


_CACHE_COUNTERS = (  # CacheStats fields exported as edgemoe_cache_<field>_total
    ("skipped", "Token-expert pairs skipped by the quality policy."),
    ("chosen", "Token-expert pairs the routers chose."),
    ("prefetch_issued", "Expert prefetches issued."),
    ("prefetch_hits", "Prefetched experts the routing wanted."),
    ("prefetch_cancelled", "Queued prefetches dropped."),
    ("prefetch_wasted_bytes", "Prefetched bytes dropped before any use."),
)


def _cache_totals(e: Exposition, c: CacheStats) -> None:
    """The expert cache's counters over all layers, and its bytes by width."""
    e.one("edgemoe_cache_hits_total", "counter", "Expert cache hits (all planes resident).", c.hits)
    e.one("edgemoe_cache_misses_total", "counter", "Expert cache misses (read from the store).", c.misses)
    e.one(
        "edgemoe_cache_partial_hits_total",
        "counter",
        "Expert cache partial hits (some planes read).",
        c.partial_hits,
    )
    e.one("edgemoe_cache_bytes_read_total", "counter", "Bytes read from the expert store.", c.bytes_read)
    e.one("edgemoe_cache_evictions_total", "counter", "Experts evicted from the cache.", c.evictions)
    e.one("edgemoe_cache_upgrades_total", "counter", "Experts widened to more bits.", c.upgrades)
    e.one("edgemoe_cache_downgrades_total", "counter", "Experts narrowed to fewer bits.", c.downgrades)
    e.one("edgemoe_cache_io_stall_seconds_total", "counter", "Time spent waiting for expert reads.", c.io_stall_s)
    e.one("edgemoe_cache_bytes", "gauge", "Bytes the expert cache holds now.", c.cache_bytes)
    e.one("edgemoe_cache_capacity_bytes", "gauge", "Capacity of the expert cache.", c.cache_capacity)
    for field, help_text in _CACHE_COUNTERS:
        e.one(f"edgemoe_cache_{field}_total", "counter", help_text, getattr(c, field))
    e.family(
        "edgemoe_cache_uses_by_bits_total",
        "counter",
        "Expert computations by the width they ran at.",
        [({"bits": b}, n) for b, n in sorted(c.uses_by_bits.items())],
    )
    e.family(
        "edgemoe_cache_resident_bytes_by_bits",
        "gauge",
        "Expert cache bytes by nested width.",
        [({"bits": b}, n) for b, n in sorted(c.resident_bytes_by_bits.items())],
    )


_CACHE_PER_LAYER = (  # (metric name part, help, the layer's attribute)
    ("hits", "Expert cache hits per layer.", "hits"),
    ("misses", "Expert cache misses per layer.", "misses"),
    ("partial_hits", "Expert cache partial hits per layer.", "partial_hits"),
    ("bytes_read", "Bytes read from the store per layer.", "bytes_read"),
    ("evictions", "Evictions per layer.", "evictions"),
    ("io_stall_seconds", "I/O stall per layer.", "io_stall_s"),
)


def _cache_layers(e: Exposition, c: CacheStats) -> None:
    """The expert cache's counters per layer."""
    for short, help_text, attr in _CACHE_PER_LAYER:
        e.family(
            f"edgemoe_cache_layer_{short}_total",
            "counter",
            help_text,
            [({"layer": i}, getattr(layer, attr)) for i, layer in enumerate(c.layers)],
        )


def _server(
    e: Exposition, queue_depth: int, in_flight: int, requests: Mapping[tuple[str, int], int] | None, model: str
) -> None:
    """The server's queue, requests answered and the model it serves."""
    e.one("edgemoe_queue_depth", "gauge", "Requests waiting for the model.", queue_depth)
    e.one("edgemoe_requests_in_flight", "gauge", "Requests admitted (generating or waiting).", in_flight)
    e.family(
        "edgemoe_requests_total",
        "counter",
        "HTTP requests answered, by endpoint and status.",
        [({"endpoint": ep, "status": st}, n) for (ep, st), n in sorted((requests or {}).items())],
    )
    if model:
        e.family("edgemoe_model_info", "gauge", "The model served.", [({"model": model}, 1)])
