"""`edgemoe monitor [URL]`: the live cache panel of a running `edgemoe serve`, polling GET URL/stats."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Header, Static

from ..errors import EdgeMoEError
from ..runtime.stats import Stats, StatsFormatError, stats_from_dict
from .widgets import StatsPanel

DEFAULT_URL = "http://127.0.0.1:8080"


def stats_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/stats") else url + "/stats"


def fetch_stats(url: str, timeout: float = 2.0) -> Stats:
    """GET URL/stats (edgemoe.runtime.stats.stats_to_dict's shape) -> Stats."""
    target = stats_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise EdgeMoEError(f"{target}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise EdgeMoEError(f"{target}: cannot connect ({reason})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeMoEError(f"{target}: not a JSON stats document ({exc})") from None
    try:
        return stats_from_dict(data)
    except (StatsFormatError, TypeError, ValueError) as exc:
        raise EdgeMoEError(f"{target}: not an edgemoe stats document ({exc})") from None


class MonitorApp(App):
    CSS_PATH = "edgemoe.tcss"
    TITLE = "edgemoe monitor"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "poll", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, url: str = DEFAULT_URL, *, interval: float = 1.0, n_expert: int | None = None):
        super().__init__()
        self.url = url
        self.interval = interval
        self.n_expert = n_expert
        self.polls = 0
        self.errors = 0
        self.sub_title = stats_url(url)

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        yield StatsPanel(n_expert=self.n_expert, id="panel", classes="full")
        yield Static(f"connecting to {stats_url(self.url)}", id="monitor-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(StatsPanel).border_title = "live cache"
        self.action_poll()
        self.set_interval(self.interval, self.action_poll)

    def action_poll(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        try:
            data = fetch_stats(self.url, timeout=max(self.interval * 2, 1.0))
        except EdgeMoEError as exc:
            self._ui(self._failed, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 -- a monitor outlives one bad poll
            self._ui(self._failed, f"{type(exc).__name__}: {exc}")
            return
        self._ui(self._show, data)

    def _ui(self, fn: Any, *args: Any) -> None:
        try:
            self.call_from_thread(fn, *args)
        except Exception:
            if self.is_running and not self._exit:
                raise
            # the app is closing: its widgets are going away

    def _show(self, data: Stats) -> None:
        self.polls += 1
        self.query_one(StatsPanel).snapshot = data
        self.query_one("#monitor-status", Static).update(f"{stats_url(self.url)}: ok, every {self.interval:g} s")

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.query_one("#monitor-status", Static).update(f"error: {message} (retrying)")
