"""The conversation: one MessageView per turn; assistant turns grow token by token."""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

# control characters a model may emit (random or byte-level tokens) would drive the terminal: shown as U+FFFD
_CONTROLS = {c: "\ufffd" for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]}

ROLE_LABELS = {"user": "you", "assistant": "model", "system": "system", "error": "error", "info": "edgemoe"}


class MessageView(Static):
    """One turn. append() is called on the UI thread (the worker goes through call_from_thread)."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.border_title = ROLE_LABELS.get(role, role)

    def on_mount(self) -> None:
        self._show()

    def append(self, text: str) -> None:
        self.text += text
        self._show()

    def set_note(self, note: str) -> None:
        self.border_subtitle = note

    def _show(self) -> None:
        self.update(Text(self.text.translate(_CONTROLS) or " "))


class Conversation(VerticalScroll):
    def add(self, role: str, text: str = "") -> MessageView:
        view = MessageView(role, text)
        self.mount(view)
        self.scroll_end(animate=False)
        return view

    def clear(self) -> None:
        self.remove_children()

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))
