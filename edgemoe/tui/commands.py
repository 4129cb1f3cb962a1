"""Slash commands of the chat app, and /save's atomic writer (no Textual here)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import EdgeMoEError
from ..fileio import write_text_atomic
from ..runtime.memory import format_size

HELP = """\
/budget SIZE   change the memory budget (e.g. 600MB, 1.5GiB); the expert cache shrinks or grows
               (a model in place, all experts resident, is reloaded to stream them under it)
/quality NAME  change the quality preset: max, balanced, fast (below max, a model in place is reloaded)
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt (/system alone clears it)
/save [FILE]   write the conversation: FILE.md as markdown, anything else as JSON
/help          this list
keys: enter send, up/down history, esc stop generating, ctrl+t panel, ctrl+q quit"""

COMMANDS = ("budget", "quality", "reset", "system", "save", "help")


def parse(line: str) -> tuple[str, str]:
    """ "/budget 600MB" -> ("budget", "600MB"); unknown commands raise EdgeMoEError."""
    name, _, arg = line[1:].strip().partition(" ")
    name = name.lower()
    if name not in COMMANDS:
        raise EdgeMoEError(f"unknown command /{name}; /help lists them")
    return name, arg.strip()


def budget_info(plan: Any) -> str:
    """What /budget says of a MemoryPlan."""
    room = f", room for all {format_size(plan.experts)} of experts" if plan.cache_capacity >= plan.experts else ""
    return (
        f"budget {format_size(plan.budget)}: expert cache {format_size(plan.cache_capacity)}{room} "
        f"(minimum budget {format_size(plan.minimum_budget)})"
    )


def in_tui_terms(message: str) -> str:
    """An error of the loader as the TUI says it: the budget that works is a /budget to type."""
    return re.sub(r"\(--budget (\S+)\)", r"(/budget \1)", message)


def default_save_path() -> Path:
    return Path(f"edgemoe-chat-{time.strftime('%Y%m%d-%H%M%S')}.json")


def conversation_document(model_path: str, system: str | None, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": model_path, "system": system, "messages": messages}


def to_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# edgemoe chat with {Path(doc['model']).name}", ""]
    if doc.get("system"):
        lines += ["**system**", "", doc["system"], ""]
    for m in doc["messages"]:
        lines += [f"**{m['role']}**", "", m["content"], ""]
    return "\n".join(lines)


def save_conversation(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write doc as markdown (.md) or JSON, atomically: a temp file in the same folder, then rename."""
    path = Path(path).expanduser()
    text = (
        to_markdown(doc)
        if path.suffix.lower() in (".md", ".markdown")
        else json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    )
    try:
        return write_text_atomic(path, text)
    except OSError as exc:
        raise EdgeMoEError(f"{path}: cannot write ({exc.strerror or exc})") from None
