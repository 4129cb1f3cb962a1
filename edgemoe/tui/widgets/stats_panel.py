"""The live cache panel: memory against budget, hit rates, the layer x expert map, rates.

It reads edgemoe.runtime.stats.Stats: the chat app shows model.stats(), the monitor the Stats that
stats_from_dict makes of GET /stats of `edgemoe serve`; both feed it the same way: `panel.snapshot = s`.
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
from ...runtime.stats import CacheStats, Stats, percent

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


class StatsPanel(VerticalScroll):
    """Live panel fed with Stats. `updates` counts renders whose content changed."""

    snapshot: reactive[Stats | None] = reactive(None, always_update=True, init=False)

    def __init__(self, *, n_expert: int | None = None, show_rates: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_expert = n_expert  # None: the largest expert index seen + 1
        self.show_rates = show_rates  # False: no sparklines (snapshot tests: nothing timing-dependent)
        self.updates = 0
        self._signature: tuple[str, ...] | None = None
        self._prev: tuple[float, Stats] | None = None
        self.read_rates: deque[float] = deque(maxlen=HISTORY)
        self.token_rates: deque[float] = deque(maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Static("waiting for stats", id="panel-memory", classes="panel-section")
        rates = Static("", id="panel-rates", classes="panel-section")
        rates.display = self.show_rates
        yield rates
        yield Static("", id="panel-cache", classes="panel-section")
        yield Static("", id="panel-map", classes="panel-section")

    def show(self, d: Stats, *, sample: bool = True) -> None:
        """Show a snapshot. sample=False: not a point of the rate sparklines (a refresh after a
        generation or a command); the next rate is measured from the snapshot after this one."""
        self._sample_next = sample
        self.snapshot = d

    def watch_snapshot(self, d: Stats | None) -> None:
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

    def _sample_rates(self, d: Stats, now: float) -> None:
        if self._prev is not None:
            t0, p = self._prev
            dt = now - t0
            dtok = d.generated_tokens - p.generated_tokens
            dread = _bytes_read(d) - _bytes_read(p)
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

    def render_memory(self, d: Stats, width: int) -> Text:
        used, budget = d.resident_bytes, d.budget_bytes
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
        out.append(f"{policy.quality_label(d.quality, d.lossless)}\n", "" if d.lossless else "yellow")
        c = d.cache
        if c:
            out.append(f"cache {short_size(c.cache_bytes)} of {short_size(c.cache_capacity)}\n")
            by_bits = sorted(c.resident_bytes_by_bits.items(), reverse=True)
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

    def render_cache(self, d: Stats) -> Text:
        c = d.cache
        out = Text()
        if not c:
            return out  # the memory section says "all experts resident"
        out.append("hit rate ", "bold")
        out.append(f"{percent(c.hit_rate)}\n")
        out.append(f"hit/part/miss {c.hits}/{c.partial_hits}/{c.misses}\n")
        out.append(f"evict {c.evictions} up {c.upgrades} down {c.downgrades}\n")
        out.append("skipped ", "bold")
        out.append(f"{c.skipped} ({percent(c.skipped / c.chosen if c.chosen else None)})\n")
        out.append("I/O stall ", "bold")
        out.append(f"{percent(io_stall_share(d))}\n")
        issued = c.prefetch_issued
        out.append("prefetch hit ", "bold")
        out.append(f"{percent(c.prefetch_hits / issued if issued else None)} of {issued}")
        return out

    def render_map(self, d: Stats, width: int) -> Text:
        c = d.cache
        out = Text()
        if not c:
            return out
        layers = c.layers
        bits = c.resident_bits
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
            if n_expert > row_w:  # wrapped rows: the rate lines up at the right
                out.append(" " * (row_w - (n_expert - 1) % row_w - 1))
            out.append(f" {percent(layer.hit_rate, 0):>4}")
        return out


def _bytes_read(d: Stats) -> int:
    return d.cache.bytes_read if d.cache else 0


def infer_n_expert(c: CacheStats) -> int:
    keys = list(c.resident_bits) + list(c.experts)
    return max((e for _, e in keys), default=-1) + 1


def io_stall_share(d: Stats) -> float | None:
    """I/O stall seconds over the time spent evaluating (prompt + decode), from the counters."""
    busy = 0.0
    if d.prompt_tokens_per_s:
        busy += d.prompt_tokens / d.prompt_tokens_per_s
    if d.decode_tokens_per_s:
        busy += max(d.generated_tokens - 1, 0) / d.decode_tokens_per_s
    if d.cache is None or busy <= 0:
        return None
    return min(d.cache.io_stall_s / busy, 1.0)
