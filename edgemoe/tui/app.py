"""`edgemoe chat`: a conversation with streamed tokens beside the live cache panel.

Generation runs in a thread worker (exclusive); the worker touches widgets only through
call_from_thread. The panel is refreshed by a set_interval timer from the latest Response.stats.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Input, Static

from ..api import load
from ..errors import EdgeMoEError
from ..runtime.memory import format_size, parse_size
from ..runtime.policy import parse_quality, quality_label
from . import commands
from .widgets import Conversation, MessageView, PromptInput, StatsPanel


class ChatApp(App):
    CSS_PATH = "edgemoe.tcss"
    TITLE = "edgemoe chat"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+t", "toggle_panel", "Panel"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        model: Any,
        *,
        sampling: dict[str, Any] | None = None,
        system: str | None = None,
        stats_interval: float = 0.5,
        show_rates: bool = True,
        load_options: dict[str, Any] | None = None,
    ):
        """load_options: edgemoe.load's arguments (path included) that gave this model: /budget or
        /quality reload it with them when it cannot change in place. None: say which flag does."""
        super().__init__()
        self.model = model
        self.load_options = dict(load_options) if load_options is not None else None
        self.loading: str | None = None  # what a reload is for, while a worker reloads the model
        self.lost: str | None = None  # set when a reload failed and so did loading the model back
        self._load_t0 = 0.0
        self.sampling = dict(sampling or {})
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.stats_interval = stats_interval
        self.show_rates = show_rates
        self.generating = False
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while a worker holds the model's stream
        self._idle.set()
        self._latest: Any = None  # the newest Response.stats, written by the worker
        self._shown: Any = None
        self.sub_title = Path(str(getattr(model, "path", "model"))).name

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Conversation(id="conversation")
                yield Static("ready: type a message, /help for commands", id="status")
                yield PromptInput(placeholder="message or /command", id="prompt")
            n_expert = getattr(getattr(self.model, "config", None), "n_expert", None)
            yield StatsPanel(n_expert=n_expert, show_rates=self.show_rates, id="panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#panel", StatsPanel).border_title = "live cache"
        self.query_one(PromptInput).focus()
        self.show_stats(self.model.stats())
        self.set_interval(self.stats_interval, self._tick)

    # ---- stats --------------------------------------------------------------------------------

    def show_stats(self, stats: Any, *, sample: bool = False) -> None:
        """Feed the panel; sample=True only for the timer's snapshots while generating (the rates)."""
        self._shown = stats
        self.query_one("#panel", StatsPanel).show(stats, sample=sample)

    def _tick(self) -> None:
        if self.loading:
            self.set_status(f"reloading the model with {self.loading}: {time.monotonic() - self._load_t0:.0f} s")
            return
        latest = self._latest
        if self.generating and latest is not None and latest is not self._shown:
            self.show_stats(latest, sample=True)

    # ---- input --------------------------------------------------------------------------------

    @property
    def conversation(self) -> Conversation:
        return self.query_one("#conversation", Conversation)

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = self.query_one(PromptInput)
        line = event.value.strip()
        if not line:
            return
        prompt.remember(line)
        prompt.value = ""
        if line.startswith("/"):
            try:
                self.run_command(line)
            except EdgeMoEError as exc:
                self.conversation.add("error", str(exc))
            return
        if self.generating or self.loading or self.lost:
            busy = "still generating: press esc to stop first" if self.generating else "the model is reloading"
            self.conversation.add("error", self.lost or busy)
            return
        self.messages.append({"role": "user", "content": line})
        self.conversation.add("user", line)
        self.start_generation()

    def run_command(self, line: str) -> None:
        name, arg = commands.parse(line)
        conv = self.conversation
        if name == "help":
            conv.add("info", commands.HELP)
            return
        if self.generating and name in ("budget", "quality", "reset"):
            raise EdgeMoEError(f"/{name} waits for the generation to end: press esc to stop it first")
        if self.loading and name in ("budget", "quality"):
            raise EdgeMoEError(f"/{name} waits for the reload with {self.loading} to end")
        if self.lost and name in ("budget", "quality"):
            raise EdgeMoEError(self.lost)
        if name == "budget":
            if not arg:
                raise EdgeMoEError("/budget needs a size, e.g. /budget 600MB")
            budget = parse_size(arg)
            if getattr(self.model, "memory_plan", None) is None:  # in place: no expert cache to resize
                self.reload(f"budget {format_size(budget)}", f"--budget {arg}", memory_budget=budget)
                return
            try:
                plan = self.model.set_budget(budget)
            except EdgeMoEError as exc:
                raise EdgeMoEError(commands.in_tui_terms(str(exc))) from None
            conv.add("info", commands.budget_info(plan))
            self.show_stats(self.model.stats())
        elif name == "quality":
            if not arg:
                raise EdgeMoEError(f"/quality needs a name (now {getattr(self.model, 'quality', '-')})")
            q = parse_quality(arg)
            if q.name != "max" and getattr(self.model, "streamed_experts", None) is None:  # lossy needs a store
                self.reload(f"quality {q.name}", f"--quality {arg}", quality=arg)
                return
            self.model.set_quality(arg)
            s = self.model.stats()
            conv.add("info", f"quality {quality_label(s.quality, s.lossless)}")
            self.show_stats(s)
        elif name == "reset":
            self.messages.clear()
            conv.clear()
            conv.add("info", "conversation cleared" + (" (system prompt kept)" if self.system else ""))
        elif name == "system":
            self.system = arg or None
            conv.add("info", f"system prompt: {arg}" if arg else "system prompt cleared")
        elif name == "save":
            doc = commands.conversation_document(str(getattr(self.model, "path", "")), self.system, self.messages)
            path = commands.save_conversation(arg or commands.default_save_path(), doc)
            conv.add("info", f"saved {len(self.messages)} messages to {path}")

    # ---- generation ---------------------------------------------------------------------------

    def prompt_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)

    def start_generation(self) -> None:
        self.generating = True
        self._idle.clear()
        self._stop.clear()
        self._latest = None
        self.set_status("generating: esc stops")
        view = self.conversation.add("assistant")
        self.generate(self.prompt_messages(), view)

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()
            self.set_status("stopping")

    def action_toggle_panel(self) -> None:
        self.query_one("#panel", StatsPanel).toggle_class("hidden")

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, messages: list[dict[str, str]], view: MessageView) -> None:
        parts: list[str] = []
        finish: str | None = None
        error: str | None = None
        stream = None
        try:
            stream = self.model.chat(messages, stream=True, **self.sampling)
            for r in stream:
                self._latest = r.stats
                if r.text:
                    parts.append(r.text)
                    self._ui(self._append, view, r.text)
                finish = r.finish_reason
                if self._stop.is_set() and finish is None:
                    finish = "stopped"
                    break
        except EdgeMoEError as exc:
            error = str(exc)
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # releases the model's lock at once when stopped early
            self._idle.set()
        self._ui(self._finished, view, "".join(parts), finish, error)

    def _ui(self, fn: Any, *args: Any) -> None:
        try:
            self.call_from_thread(fn, *args)
        except Exception:
            self._stop.set()
            if self.is_running and not self._exit:
                raise
            # the app is closing while generating: its widgets are going away

    def _append(self, view: MessageView, text: str) -> None:
        view.append(text)
        self.conversation.scroll_end(animate=False)

    def _finished(self, view: MessageView, text: str, finish: str | None, error: str | None) -> None:
        self.generating = False
        if error is not None:
            view.remove()
            self.conversation.add("error", error)
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
        else:
            self.messages.append({"role": "assistant", "content": text.strip()})
            view.set_note({"stop": "", "length": "max tokens", "stopped": "stopped"}.get(finish or "", finish or ""))
        self.show_stats(self.model.stats())
        self.set_status("stopped" if finish == "stopped" else "ready")

    # ---- reloading (/budget, /quality on a model in place) ----------------------------------------

    def reload(self, what: str, flag: str, **change: Any) -> None:
        """The model runs from its GGUF in place (all experts resident): a budget or a lossy quality
        needs its experts streaming from an expert store, i.e. loading it again with `change`."""
        path = getattr(self.model, "path", "MODEL")
        if self.load_options is None:
            raise EdgeMoEError(
                f"this model runs from its GGUF file in place, all experts resident: for a {what.split()[0]}, "
                f"restart with `edgemoe chat -m {path} {flag}` (its experts then stream from an expert store)"
            )
        options = {**self.load_options, **change}
        self.loading = what
        self._load_t0 = time.monotonic()
        self._idle.clear()
        self.conversation.add(
            "info",
            f"reloading {Path(str(path)).name} with {what}: its experts will stream from an expert store "
            "(converted on first use, which can take a while for a large model)",
        )
        self.set_status(f"reloading the model with {what}")
        self.reload_model(options)

    @work(thread=True, exclusive=True, group="reload")
    def reload_model(self, options: dict[str, Any]) -> None:
        old_options = self.load_options or {}
        error: str | None = None
        self.model.close()  # first: the new model's budget is measured without the old one's memory
        try:
            self.model = load(**options, progress=False)
            self.load_options = options
        except (EdgeMoEError, OSError) as exc:
            error = commands.in_tui_terms(str(exc)) + "; the model is back as it was"
            try:
                self.model = load(**old_options, progress=False)  # back to the model as it was
            except (EdgeMoEError, OSError) as again:
                self.lost = f"no model: loading it back failed ({again}); quit with ctrl+q and restart"
        finally:
            self._idle.set()
        self._ui(self._reloaded, error)

    def _reloaded(self, error: str | None) -> None:
        what, self.loading = self.loading, None
        self.set_status("ready")
        if error is not None:
            self.conversation.add("error", error)
        else:
            plan = self.model.memory_plan
            self.conversation.add("info", "reloaded: " + (commands.budget_info(plan) if plan else what))
        if self.lost:
            self.conversation.add("error", self.lost)
        else:
            self.show_stats(self.model.stats())

    def on_unmount(self) -> None:
        self._stop.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """After run(): wait for a generation stopped by quitting to let go of the model."""
        self._stop.set()
        return self._idle.wait(timeout)
