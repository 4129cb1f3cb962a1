"""The `chat` and `monitor` subcommands; cli.build_parser registers them with add_subcommands."""

from __future__ import annotations

import argparse
import os
import sys

from ..options import add_load_options, add_sampling_options, budget_of, load_model, load_options

# `edgemoe chat` with neither -m nor --budget: the bundled model (31 MB) would fit in memory whole and
# the panel would have no cache to show, so its experts stream from its store into an expert cache
# that holds this share of them (README, "edgemoe chat"). Results are the same; only speed changes.
BUNDLED_CACHE_SHARE = 0.5


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "chat",
        help="chat with a model in a terminal UI, with the live expert-cache panel",
        description="Chat with a model in a terminal UI beside a live panel of the expert cache. With "
        "neither -m nor --budget, the bundled model's experts stream from its expert store into a cache "
        f"that holds {BUNDLED_CACHE_SHARE:.0%} of them, so the panel shows hits, misses and bytes read; "
        "the budget it gets is shown in the panel. With stdin not a terminal (echo hi | edgemoe chat), "
        "stdin is the prompt: the answer streams to stdout, without the UI.",
    )
    add_load_options(c)
    add_sampling_options(c)
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("monitor", help="the live expert-cache panel of a running `edgemoe serve`")
    m.add_argument("url", nargs="?", default=None, help="server URL (default http://127.0.0.1:8080); polls URL/stats")
    m.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    m.set_defaults(func=cmd_monitor)


def open_chat_model(args: argparse.Namespace):
    """The model `edgemoe chat` runs: as the load options say; with neither -m nor --budget (nor a
    profile's budget), the bundled model streamed under a budget whose expert cache holds
    BUNDLED_CACHE_SHARE of its experts."""

    bundled_default = args.model is None and budget_of(args) is None
    if not bundled_default:
        return load_model(args)
    from ..runtime.memory import available

    model = load_model(args, memory_budget=int(0.8 * available()))  # room for every expert, then cut
    model.set_budget(model.memory_plan.budget_holding(BUNDLED_CACHE_SHARE))
    return model


def cmd_chat(args: argparse.Namespace) -> int:
    from ..errors import EdgeMoEError

    if args.max_tokens < 1:
        raise EdgeMoEError(f"--max-tokens must be positive, got {args.max_tokens}")
    if sys.stdin is not None and not sys.stdin.isatty():
        return piped_chat(args)
    from .app import ChatApp

    model = open_chat_model(args)
    reload = {"path": model.path, **load_options(args)}  # /budget and /quality reload with these when needed
    app = ChatApp(model, sampling=sampling_of(args), system=args.system, load_options=reload)
    try:
        app.run()
    finally:
        if app.wait_idle(timeout=30):  # a generation cut short by quitting stops at its next token
            app.model.close()  # the model in use now: /budget or /quality may have reloaded it
    return 0


def read_prompt() -> str:
    """All of stdin as text (UTF-8): the prompt of a piped `edgemoe chat`."""
    from ..errors import EdgeMoEError

    try:
        raw = sys.stdin.buffer.read()
    except (OSError, AttributeError) as exc:
        raise EdgeMoEError(f"cannot read the prompt from stdin: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeMoEError(f"stdin is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None
    if not text.strip():
        raise EdgeMoEError('stdin is empty: pipe a prompt, e.g. echo "hi" | edgemoe chat')
    return text.strip()


def piped_chat(args: argparse.Namespace) -> int:
    """`echo hi | edgemoe chat`: stdin is one user message (after --system, through the model's chat
    template, as the TUI sends it); the answer streams to stdout, then a newline. No Textual."""
    prompt = read_prompt()  # before loading: an empty pipe is refused at once
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    model = load_model(args)
    out = sys.stdout
    started, held = False, ""  # the answer stripped, as the TUI keeps it: whitespace waits for more text
    try:
        for r in model.chat(messages, stream=True, **sampling_of(args)):
            text = held + r.text if started else r.text.lstrip()
            shown = text.rstrip()
            held = text[len(shown) :]
            if shown:
                started = True
                out.write(shown)
                out.flush()
        out.write("\n")
        out.flush()
    except BrokenPipeError:  # `| head`: the reader is gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    finally:
        model.close()
    return 0


def sampling_of(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def cmd_monitor(args: argparse.Namespace) -> int:
    from ..errors import EdgeMoEError
    from .monitor import DEFAULT_URL, MonitorApp

    if not args.interval > 0:
        raise EdgeMoEError(f"--interval must be positive, got {args.interval}")
    MonitorApp(args.url or DEFAULT_URL, interval=args.interval).run()
    return 0
