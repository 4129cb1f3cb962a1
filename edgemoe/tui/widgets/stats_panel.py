"""The live cache panel: memory against budget, hit rates, the layer x expert map, rates.

It reads a plain dict (edgemoe.runtime.snapshot.stats_to_dict), so the chat app (a loaded model) and the monitor
(GET /stats of `edgemoe serve`) feed it the same way: `panel.snapshot = d`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import Static

from ...runtime import policy
from ...runtime.memory import format_size
from ...runtime.snapshot import hit_rate, parse_expert_key

SPARK = "▁▂▃▄▅▆▇█"
# resident width -> (cell, style): the width's digit on its colour, so the map reads without colour too
BITS_STYLE = {
    0: ("·", "grey42"),
    2: ("2", "black on red3"),
    3: ("3", "black on dark_orange"),
    4: ("4", "black on green3"),
    8: ("8", "black on deep_sky_blue1"),
}
OTHER_BITS = ("?", "black on magenta")
HISTORY = 120  # sparkline samples kept


def sparkline(values: list[float], width: int) -> str:
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in vals)


def gauge(frac: float, width: int) -> Text:
    width = max(width, 4)
    filled = min(round(max(frac, 0.0) * width), width)
    colour = "green3" if frac < 0.8 else "yellow" if frac <= 1.0 else "red"
    return Text.assemble(("█" * filled, colour), ("░" * (width - filled), "grey35"))


def short_size(n: float | None) -> str:
    """1 decimal: "173.1 MiB" (the panel is narrow at 80 columns)."""
    if n is None:
        return "-"
    s = format_size(n)
    num, _, unit = s.partition(" ")
    return s if unit == "B" else f"{float(num):.1f} {unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


class StatsPanel(VerticalScroll):
    """Live panel fed with stats dicts. `updates` counts renders whose content changed."""

    snapshot: reactive[dict[str, Any] | None] = reactive(None, always_update=True, init=False)

    def __init__(self, *, n_expert: int | None = None, show_rates: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_expert = n_expert  # None: the largest expert index seen + 1
        self.show_rates = show_rates  # False: no sparklines (snapshot tests: nothing timing-dependent)
        self.updates = 0
        self._signature: tuple[str, ...] | None = None
        self._prev: tuple[float, dict[str, Any]] | None = None
        self.read_rates: deque[float] = deque(maxlen=HISTORY)
        self.token_rates: deque[float] = deque(maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Static("waiting for stats", id="panel-memory", classes="panel-section")
        rates = Static("", id="panel-rates", classes="panel-section")
        rates.display = self.show_rates
        yield rates
        yield Static("", id="panel-cache", classes="panel-section")
        yield Static("", id="panel-map", classes="panel-section")

    def show(self, d: dict[str, Any], *, sample: bool = True) -> None:
        """Show a snapshot. sample=False: not a point of the rate sparklines (a refresh after a
        generation or a command); the next rate is measured from the snapshot after this one."""
        self._sample_next = sample
        self.snapshot = d

    def watch_snapshot(self, d: dict[str, Any] | None) -> None:
        if d is None:
            return
        if getattr(self, "_sample_next", True):
            self._sample_rates(d, time.monotonic())
        else:
            self._prev = None
        self._sample_next = True
        self.refresh_sections()

    def on_resize(self) -> None:
        self.refresh_sections()

    # ---- rates ---------------------------------------------------------------------------------

    def _sample_rates(self, d: dict[str, Any], now: float) -> None:
        tokens = d.get("generated_tokens", 0)
        read = (d.get("cache") or {}).get("bytes_read", 0)
        if self._prev is not None:
            t0, p = self._prev
            dt = now - t0
            dtok = tokens - p.get("generated_tokens", 0)
            dread = read - (p.get("cache") or {}).get("bytes_read", 0)
            if dt > 0 and dtok >= 0 and dread >= 0:  # counters that went back: a restarted server
                self.token_rates.append(dtok / dt)
                self.read_rates.append(dread / dt)
        self._prev = (now, d)

    # ---- rendering ----------------------------------------------------------------------------

    def refresh_sections(self) -> None:
        d = self.snapshot
        if d is None or not self.is_mounted:
            return
        width = max(self.scrollable_content_region.width, 16)
        parts = (
            self.render_memory(d, width),
            self.render_rates(width),
            self.render_cache(d),
            self.render_map(d, width),
        )
        sig = tuple(p.plain for p in parts)
        if sig == self._signature:
            return
        self._signature = sig
        self.updates += 1
        for wid, part in zip(("#panel-memory", "#panel-rates", "#panel-cache", "#panel-map"), parts):
            self.query_one(wid, Static).update(part)

    def render_memory(self, d: dict[str, Any], width: int) -> Text:
        used, budget = d.get("resident_bytes", 0), d.get("budget_bytes")
        out = Text()
        if budget:
            frac = used / budget
            out.append("memory ", "bold")
            out.append_text(gauge(frac, width - 13))
            out.append(f" {frac:>4.0%}\n")
            out.append(f"{short_size(used)} of {short_size(budget)}\n")
        else:
            out.append("memory ", "bold")
            out.append(f"{short_size(used)} (no budget)\n")
        out.append("quality ", "bold")
        out.append(f"{quality_label(d)}\n", "" if d.get("lossless", True) else "yellow")
        c = d.get("cache")
        if c:
            out.append(f"cache {short_size(c.get('cache_bytes'))} of {short_size(c.get('cache_capacity'))}\n")
            by_bits = sorted(((int(b), n) for b, n in (c.get("resident_bytes_by_bits") or {}).items()), reverse=True)
            total = sum(n for _, n in by_bits)
            out.append("held ")
            out.append(" ".join(f"{b}b {n / total:.0%}" for b, n in by_bits) if total else "-")
        else:
            out.append("all experts resident, no streaming", "italic")
        return out

    def render_rates(self, width: int) -> Text:
        w = max(width - 19, 4)
        out = Text()
        last_read = short_size(self.read_rates[-1]) + "/s" if self.read_rates else "-"
        last_tok = f"{self.token_rates[-1]:.1f}" if self.token_rates else "-"
        out.append("read/s ", "bold")
        out.append(f"{sparkline(list(self.read_rates), w):<{w}}", "deep_sky_blue1")
        out.append(f" {last_read:>11}\n")
        out.append("tok/s  ", "bold")
        out.append(f"{sparkline(list(self.token_rates), w):<{w}}", "green3")
        out.append(f" {last_tok:>11}")
        return out

    def render_cache(self, d: dict[str, Any]) -> Text:
        c = d.get("cache")
        out = Text()
        if not c:
            return out  # the memory section says "all experts resident"
        lookups = c.get("hits", 0) + c.get("misses", 0) + c.get("partial_hits", 0)
        out.append("hit rate ", "bold")
        out.append(f"{_pct(hit_rate(c))}\n")
        out.append(f"hit/part/miss {c.get('hits', 0)}/{c.get('partial_hits', 0)}/{c.get('misses', 0)}\n")
        out.append(f"evict {c.get('evictions', 0)} up {c.get('upgrades', 0)} down {c.get('downgrades', 0)}\n")
        skipped = c.get("skipped")
        chosen = c.get("chosen") or lookups + (skipped or 0)
        out.append("skipped ", "bold")
        out.append("-\n" if skipped is None else f"{skipped} ({_pct(skipped / chosen if chosen else None)})\n")
        out.append("I/O stall ", "bold")
        out.append(f"{_pct(io_stall_share(d))}\n")
        issued, hits = c.get("prefetch_issued"), c.get("prefetch_hits")
        out.append("prefetch hit ", "bold")
        out.append("-" if issued is None or hits is None else f"{_pct(hits / issued if issued else None)} of {issued}")
        return out

    def render_map(self, d: dict[str, Any], width: int) -> Text:
        c = d.get("cache")
        out = Text()
        if not c:
            return out
        layers = c.get("layers") or []
        bits = {parse_expert_key(k): int(v) for k, v in (c.get("resident_bits") or {}).items()}
        n_expert = self.n_expert or infer_n_expert(c)
        out.append("experts by resident bits\n", "bold")
        out.append(BITS_STYLE[0][0], BITS_STYLE[0][1])
        out.append(" absent ")
        for b in (2, 3, 4, 8):
            out.append(*BITS_STYLE[b])
            out.append(" ")
        out.append("bits")
        label_w = len(str(max(len(layers) - 1, 0))) + 1
        row_w = max(width - label_w - 6, 4)
        for i, layer in enumerate(layers):
            out.append("\n")
            out.append(f"L{i:<{label_w - 1}} ", "bold")
            for start in range(0, max(n_expert, 1), row_w):
                if start:
                    out.append("\n" + " " * (label_w + 1))
                for e in range(start, min(start + row_w, n_expert)):
                    b = bits.get((i, e), 0)
                    glyph, colour = BITS_STYLE.get(b, OTHER_BITS)
                    out.append(glyph, colour)
            rate = hit_rate(layer)
            if n_expert > row_w:  # wrapped rows: the rate lines up at the right
                out.append(" " * (row_w - (n_expert - 1) % row_w - 1))
            out.append(f" {'-' if rate is None else f'{rate:.0%}':>4}")
        return out


def quality_label(d: dict[str, Any]) -> str:
    """ "max (lossless)", "fast (lossy)": the quality every figure of the panel is measured at
    ("-" from a server too old to report it)."""
    q = d.get("quality")
    if q is None:
        return "-"
    return policy.quality_label(q, bool(d.get("lossless")))


def infer_n_expert(c: dict[str, Any]) -> int:
    keys = list((c.get("resident_bits") or {}).keys()) + list((c.get("experts") or {}).keys())
    return max((parse_expert_key(k)[1] for k in keys), default=-1) + 1


def io_stall_share(d: dict[str, Any]) -> float | None:
    """I/O stall seconds over the time spent evaluating (prompt + decode), from the counters."""
    c = d.get("cache") or {}
    stall = c.get("io_stall_s")
    busy = 0.0
    if d.get("prompt_tokens_per_s"):
        busy += d.get("prompt_tokens", 0) / d["prompt_tokens_per_s"]
    if d.get("decode_tokens_per_s"):
        busy += max(d.get("generated_tokens", 0) - 1, 0) / d["decode_tokens_per_s"]
    if stall is None or busy <= 0:
        return None
    return min(stall / busy, 1.0)
