"""The chat and monitor TUIs driven by Textual's Pilot, on a tiny store the tests build, plus text
snapshots of the main screen (EDGEMOE_UPDATE_SNAPSHOTS=1 rewrites tests/snapshots/*.txt)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("textual")

from rich.console import Console

import edgemoe
from edgemoe.api import Response, Stats
from edgemoe.errors import EdgeMoEError
from edgemoe.runtime.stats import CacheStats, LayerCacheStats, stats_to_dict
from edgemoe.store.convert import convert
from edgemoe.testing import synth
from edgemoe.tui import app as app_module
from edgemoe.tui.app import ChatApp
from edgemoe.tui.monitor import MonitorApp
from edgemoe.tui.widgets import MessageView, PromptInput, StatsPanel

SNAPSHOTS = Path(__file__).parent / "snapshots"


# ---- models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tui")
    src = synth.write_model(synth.SynthSpec.tiny("qwen3moe", n_expert=16, n_layer=4), d / "tiny.gguf")
    return convert(src, d / "tiny.edgemoe", progress=False)


@pytest.fixture(scope="module")
def model(store):
    """A streaming model whose expert cache holds a third of the experts: it evicts."""
    with edgemoe.load(store, quality="max") as m:  # every plane: enough work per token to watch it stream
        plan = m.memory_plan
        m.set_budget(plan.budget - plan.cache_capacity + plan.cache_capacity // 3)
        yield m


def make(cls, **kw):
    """A stats dataclass with the given figures and zeros (or {}) for any field not named here."""
    for f in dataclasses.fields(cls):
        if f.name not in kw:
            kw[f.name] = {} if "dict" in str(f.type) else 0
    return cls(**kw)


def fixed_stats(with_cache: bool = True) -> Stats:
    """Stats with every figure fixed (snapshots, the monitor's server)."""
    cache = None
    if with_cache:
        layers = tuple(
            make(
                LayerCacheStats,
                hits=10 * i,
                misses=5,
                partial_hits=2,
                bytes_read=1 << 20,
                evictions=3,
                upgrades=1,
                downgrades=2,
                io_stall_s=0.05,
            )
            for i in range(4)
        )
        bits = {(i, e): (2, 3, 4, 8)[(i + e) % 4] for i in range(4) for e in range(16) if (i * 3 + e) % 5 < 3}
        cache = make(
            CacheStats,
            hits=60,
            misses=20,
            partial_hits=8,
            bytes_read=4 << 20,
            evictions=12,
            upgrades=4,
            downgrades=8,
            io_stall_s=0.2,
            cache_bytes=3 << 20,
            cache_capacity=4 << 20,
            resident_bytes_by_bits={8: 2 << 20, 4: 512 << 10, 2: 512 << 10},
            layers=layers,
            experts={(i, e): (1, 1, 0) for i in range(4) for e in range(16)},
            resident_bits=bits,
            skipped=6,
            chosen=96,
            prefetch_issued=40,
            prefetch_hits=30,
        )
    return Stats(
        prompt_tokens=12,
        generated_tokens=40,
        prompt_tokens_per_s=120.0,
        decode_tokens_per_s=10.0,
        resident_bytes=100 << 20,
        peak_resident_bytes=110 << 20,
        budget_bytes=128 << 20,
        model_bytes=64 << 20,
        kv_bytes=1 << 20,
        n_ctx=512,
        cache=cache,
    )


class FakeModel:
    """Model's surface as the chat app uses it, with fixed stats and a scripted reply."""

    path = Path("fake-moe.gguf")
    config = SimpleNamespace(n_expert=16)
    quality = "max"

    def __init__(self, reply: list[str] | None = None, delay: float = 0.0, with_cache: bool = True):
        self.reply = reply or ["To be", ", or not", " to be."]
        self.delay = delay
        self.closed_early = False
        self._stats = fixed_stats(with_cache)
        self.prompts: list[list[dict]] = []

    def stats(self) -> Stats:
        return self._stats

    def chat(self, messages, *, stream=False, **kwargs):
        self.prompts.append(messages)
        return self._gen()

    def _gen(self):
        done = False
        try:
            for i, piece in enumerate(self.reply):
                time.sleep(self.delay)
                last = i == len(self.reply) - 1
                yield Response(piece, i, 10.0, self._stats, "stop" if last else None)
            done = True
        finally:
            self.closed_early = not done

    def set_budget(self, budget):
        raise EdgeMoEError("this model runs from its GGUF file in place")

    def set_quality(self, q):
        raise EdgeMoEError(f"quality {q!r} is not one of max")


# ---- helpers ----------------------------------------------------------------------------------


def screen_text(app) -> str:
    """The screen as plain text (what a snapshot compares)."""
    w, h = app.size
    console = Console(
        width=w,
        height=h,
        file=io.StringIO(),
        force_terminal=True,
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def type_line(pilot, line: str) -> None:
    inp = pilot.app.query_one(PromptInput)
    inp.value = line
    await pilot.press("enter")
    await pilot.pause()


async def wait_idle(pilot, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    await pilot.pause(0.05)
    while pilot.app.generating:
        assert time.monotonic() - t0 < timeout, "generation did not finish"
        await pilot.pause(0.05)
    await pilot.pause()


def views(app, role: str) -> list[MessageView]:
    return [v for v in app.conversation.views if v.role == role]


def run(coro):
    return asyncio.run(coro)


# ---- chat -------------------------------------------------------------------------------------


def test_chat_streams_reply_and_panel_updates(model):
    app = ChatApp(model, sampling={"max_tokens": 800, "seed": 3, "ignore_eos": True}, stats_interval=0.02)

    async def go():
        async with app.run_test(size=(120, 36)) as pilot:
            panel = app.query_one(StatsPanel)
            await type_line(pilot, "ROMEO. What light")
            seen_text, seen_panel = set(), set()
            while app.generating:
                reply = views(app, "assistant")
                if reply:
                    seen_text.add(reply[-1].text)
                seen_panel.add(panel._signature)
                await pilot.pause(0.01)
            await wait_idle(pilot)
            assert [v.text for v in views(app, "user")] == ["ROMEO. What light"]
            assert app.messages[-1]["role"] == "assistant"
            assert app.messages[-1]["content"] == views(app, "assistant")[-1].text.strip()
            assert len(seen_text) >= 3, "the reply should grow token by token"
            assert len(seen_panel) >= 3, "the panel should change at least twice while generating"
            text = screen_text(app)
            assert "live cache" in text and "hit rate" in text and "L3" in text

    run(go())


def test_slash_commands(model, tmp_path):
    app = ChatApp(model, sampling={"max_tokens": 4, "seed": 1})

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            plan = model.memory_plan
            target = plan.budget + 4096
            await type_line(pilot, f"/budget {target}")
            assert model.stats().budget_bytes == target
            assert "budget" in views(app, "info")[-1].text
            await type_line(pilot, "/budget lots")
            assert "'lots' is not a size" in views(app, "error")[-1].text
            await type_line(pilot, "/budget 1MiB")  # too small: the budget that works, as a command
            err = views(app, "error")[-1].text
            assert "too small" in err and "(/budget " in err and "--budget" not in err, err
            await type_line(pilot, "/quality bad")
            assert "quality 'bad' is not one of" in views(app, "error")[-1].text
            await type_line(pilot, "/nonsense")
            assert "unknown command /nonsense" in views(app, "error")[-1].text
            await type_line(pilot, "/help")
            assert "/budget SIZE" in views(app, "info")[-1].text
            await type_line(pilot, "/system Speak in verse.")
            assert app.system == "Speak in verse."
            await type_line(pilot, "hello")
            await wait_idle(pilot)
            assert len(app.messages) == 2
            out = tmp_path / "chat.json"
            await type_line(pilot, f"/save {out}")
            doc = json.loads(out.read_text())
            assert doc["system"] == "Speak in verse." and [m["role"] for m in doc["messages"]] == [
                "user",
                "assistant",
            ]
            assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            md = tmp_path / "chat.md"
            await type_line(pilot, f"/save {md}")
            assert "**user**" in md.read_text() and "hello" in md.read_text()
            await type_line(pilot, f"/save {tmp_path / 'missing-dir' / 'x.json'}")
            assert "cannot write" in views(app, "error")[-1].text
            await type_line(pilot, "/reset")
            assert app.messages == [] and not views(app, "user") and not views(app, "assistant")
            assert app.system == "Speak in verse."

    run(go())


def test_history_and_busy_input():
    app = ChatApp(FakeModel(reply=["a"] * 1000, delay=0.02))

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            inp = app.query_one(PromptInput)
            await type_line(pilot, "/system one")
            await type_line(pilot, "/system two")
            await pilot.press("up")
            assert inp.value == "/system two"
            await pilot.press("up", "up")
            assert inp.value == "/system one"
            await pilot.press("down", "down")
            assert inp.value == ""
            await type_line(pilot, "first")
            assert app.generating
            await type_line(pilot, "second")
            assert "still generating" in views(app, "error")[-1].text
            await type_line(pilot, "/budget 1GB")
            assert "press esc" in views(app, "error")[-1].text
            await pilot.press("escape")
            await wait_idle(pilot)

    run(go())


def test_stop_key_stops_a_long_generation():
    fake = FakeModel(reply=["tok "] * 1000, delay=0.01)
    app = ChatApp(fake)

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await type_line(pilot, "go on forever")
            while not views(app, "assistant") or not views(app, "assistant")[-1].text:
                await pilot.pause(0.02)
            t0 = time.monotonic()
            await pilot.press("escape")
            await wait_idle(pilot, timeout=5)
            assert time.monotonic() - t0 < 3
            assert fake.closed_early, "the model's stream should be closed when stopped"
            reply = views(app, "assistant")[-1]
            assert reply.border_subtitle == "stopped"
            assert 0 < reply.text.count("tok") < 1000
            assert app.messages[-1]["role"] == "assistant"
            # the app takes the next message at once
            fake.reply, fake.delay = ["done"], 0.0
            await type_line(pilot, "again")
            await wait_idle(pilot)
            assert views(app, "assistant")[-1].text == "done"

    run(go())


def test_control_characters_do_not_reach_the_terminal():
    app = ChatApp(FakeModel(reply=["a\x00b", "\x1b[2J", "c\nd"]))

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await type_line(pilot, "hi")
            await wait_idle(pilot)
            assert app.messages[-1]["content"] == "a\x00b\x1b[2Jc\nd"  # kept as the model wrote it
            text = screen_text(app)
            assert "a\ufffdb\ufffd[2Jc" in text

    run(go())


def test_generation_error_is_shown_not_raised(model):
    app = ChatApp(model, sampling={"max_tokens": 4})

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await type_line(pilot, "word " * 2000)  # longer than n_ctx
            await wait_idle(pilot)
            assert "n_ctx" in views(app, "error")[-1].text
            assert app.messages == [] and not views(app, "assistant")

    run(go())


def test_gguf_in_place_has_no_cache(store):
    """Without the options it was loaded with, the app cannot reload a model in place: /budget and a
    lossy /quality say which `edgemoe chat` flag does it."""
    gguf = store.parent / "tiny.gguf"
    with edgemoe.load(gguf) as m:
        assert m.stats().cache is None
        app = ChatApp(m, sampling={"max_tokens": 3, "seed": 0})

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                await type_line(pilot, "hi")
                await wait_idle(pilot)
                assert "all experts resident, no streaming" in screen_text(app)
                await type_line(pilot, "/budget 1GB")
                err = views(app, "error")[-1].text
                assert "in place" in err and f"edgemoe chat -m {gguf} --budget 1GB" in err
                await type_line(pilot, "/quality fast")
                assert "--quality fast" in views(app, "error")[-1].text
                await type_line(pilot, "/quality max")  # lossless: nothing to reload
                assert views(app, "info")[-1].text == "quality max (lossless)"
                assert not [v for v in app.conversation.views if "memory_budget" in v.text or "load it" in v.text]

        run(go())


async def wait_loaded(pilot, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    await pilot.pause(0.05)
    while pilot.app.loading:
        assert time.monotonic() - t0 < timeout, "the reload did not finish"
        await pilot.pause(0.05)
    await pilot.pause()


def test_budget_and_quality_reload_a_model_in_place(store, monkeypatch):
    """`edgemoe chat -m model.gguf` runs it in place; /budget reloads it streaming its experts under
    that budget (in a worker, the status line saying so), /quality fast likewise; a budget too small
    is refused in the TUI's terms and the model is back as it was. No Python API names on screen."""
    gguf = store.parent / "tiny.gguf"
    options = {"path": gguf, "n_ctx": 256}
    app = ChatApp(edgemoe.load(**options), sampling={"max_tokens": 3, "seed": 0}, load_options=options)
    gate = threading.Event()  # holds the reload's load until the test has seen the app wait for it
    gate.set()
    monkeypatch.setattr(app_module, "load", lambda **kw: gate.wait(30) and edgemoe.load(**kw))

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            assert app.model.memory_plan is None
            await type_line(pilot, "/budget 1MiB")  # too small: refused, back in place
            await wait_loaded(pilot)
            err = views(app, "error")[-1].text
            assert "1.00 MiB is too small" in err and "(/budget " in err and "--budget" not in err, err
            assert app.model.memory_plan is None and "back as it was" in err
            gate.clear()
            await type_line(pilot, "/budget 1GiB")
            assert app.loading == "budget 1.00 GiB" and "reloading" in views(app, "info")[-1].text
            await pilot.pause(0.6)
            assert "reloading the model with budget 1.00 GiB" in str(app.query_one("#status").render())
            await type_line(pilot, "hi")
            assert views(app, "error")[-1].text == "the model is reloading"
            await type_line(pilot, "/quality fast")
            assert "waits for the reload" in views(app, "error")[-1].text
            gate.set()
            await wait_loaded(pilot)
            plan = app.model.memory_plan
            assert plan is not None and plan.budget == 1 << 30, "the model should stream under the budget"
            assert views(app, "info")[-1].text.startswith("reloaded: budget 1.00 GiB: expert cache")
            assert "hit rate" in screen_text(app) and "no streaming" not in screen_text(app)
            await type_line(pilot, "/budget 900MiB")  # now it streams: in place, no reload
            assert not app.loading and app.model.memory_plan.budget == 900 << 20
            await type_line(pilot, "hi")
            await wait_idle(pilot)
            assert app.messages[-1]["role"] == "assistant"
            text = " ".join(v.text for v in app.conversation.views)
            assert "memory_budget" not in text and "load it with" not in text

    try:
        run(go())
    finally:
        app.model.close()

    app = ChatApp(edgemoe.load(**options), sampling={"max_tokens": 3, "seed": 0}, load_options=options)

    async def quality():
        async with app.run_test(size=(100, 30)) as pilot:
            await type_line(pilot, "/quality fast")
            await wait_loaded(pilot)
            assert app.model.quality == "fast" and app.model.streamed_experts is not None
            assert "fast (lossy)" in screen_text(app)
            await type_line(pilot, "/quality balanced")  # streams now: changed in place
            assert app.model.quality == "balanced" and views(app, "info")[-1].text == "quality balanced (lossy)"

    try:
        run(quality())
    finally:
        app.model.close()


def test_stats_to_dict_is_json_and_feeds_the_panel(model):
    d = stats_to_dict(model.stats())
    back = json.loads(json.dumps(d))
    assert back == d
    assert all("," in k for k in back["cache"]["resident_bits"])
    assert set(back["cache"]["resident_bits"].values()) <= {2, 3, 4, 8}
    assert stats_to_dict(fixed_stats(with_cache=False))["cache"] is None


# ---- monitor ----------------------------------------------------------------------------------


class _StatsServer:
    def __init__(self, payload: dict):
        self.payload = payload
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if self.path != "/stats":
                    self.send_error(404)
                    return
                body = json.dumps(outer.payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_monitor_polls_a_server():
    payload = stats_to_dict(fixed_stats())
    with _StatsServer(payload) as srv:
        app = MonitorApp(srv.url, interval=0.05)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                t0 = time.monotonic()
                while app.polls < 3:
                    assert time.monotonic() - t0 < 10, "the monitor did not poll"
                    await pilot.pause(0.05)
                # the server's counters move: the panel follows
                srv.payload = json.loads(json.dumps(payload))
                srv.payload["cache"]["hits"] = 200
                n = app.polls
                while app.polls < n + 2:
                    await pilot.pause(0.05)
                text = screen_text(app)
                assert "hit rate 87.7%" in text  # 200 / (200 + 20 + 8)
                assert "L3" in text and "ok" in app.query_one("#monitor-status").render().plain

        run(go())


def test_monitor_reports_an_unreachable_server():
    with _StatsServer({}) as srv:
        url = srv.url
    app = MonitorApp(url, interval=0.05)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            t0 = time.monotonic()
            while app.errors < 1:
                assert time.monotonic() - t0 < 10
                await pilot.pause(0.05)
            assert "cannot connect" in app.query_one("#monitor-status").render().plain

    run(go())


# ---- snapshots and the CLI --------------------------------------------------------------------


def check_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/NAME. A missing or different snapshot fails; only
    EDGEMOE_UPDATE_SNAPSHOTS=1 writes it (then review and commit the file)."""
    path = SNAPSHOTS / name
    if os.environ.get("EDGEMOE_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing (EDGEMOE_UPDATE_SNAPSHOTS=1 writes it)"
    assert text == path.read_text(encoding="utf-8"), f"{path} differs (EDGEMOE_UPDATE_SNAPSHOTS=1 rewrites it)"


@pytest.mark.parametrize("size", [(120, 36), (80, 24)])
def test_snapshot_main_screen(size):
    app = ChatApp(FakeModel(), show_rates=False)

    async def go():
        async with app.run_test(size=size) as pilot:
            await type_line(pilot, "/system You are a player.")
            await type_line(pilot, "Speak the speech, I pray you.")
            await wait_idle(pilot)
            app.query_one(PromptInput).blur()
            await pilot.pause()
            check_snapshot(f"chat_{size[0]}x{size[1]}.txt", screen_text(app))

    run(go())


def test_cli_chat_load_error(tmp_path, capsys, monkeypatch):
    from edgemoe.cli import main

    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: True))  # the UI's path, not the pipe's
    assert main(["chat", "-m", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgemoe: error: ")
    assert main(["monitor", "--interval", "0"]) == 2


ROOT = Path(__file__).resolve().parent.parent


def piped_chat(stdin: str, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`edgemoe chat ARGS` with stdin a pipe (not a terminal), as `echo hi | edgemoe chat` runs it.
    A timeout: the bug this guards against is the TUI starting on a pipe and hanging."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "edgemoe", "chat", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_piped_chat_answers_and_exits():
    """`echo "..." | edgemoe chat`: stdin is the user message (after --system, through the chat
    template, as the TUI sends it), the answer streams to stdout with a newline, exit 0."""
    sampling = {"max_tokens": 8, "temperature": 0}
    with edgemoe.load() as m:  # the bundled model, as `edgemoe chat` without -m
        system = "JULIET. Speak, fair one, in verse."
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": "ROMEO. What light"}]
        want = ["".join(r.text for r in m.chat(ms, stream=True, **sampling)).strip() + "\n" for ms in (msgs[1:], msgs)]
    r = piped_chat("ROMEO. What light\n", "-n", "8", "--temperature", "0")
    assert (r.returncode, r.stdout) == (0, want[0]), r.stderr[-2000:]
    assert "\x1b" not in r.stdout + r.stderr, "no terminal escape codes on a pipe"
    r = piped_chat("ROMEO. What light", "-n", "8", "--temperature", "0", "--system", system)
    assert (r.returncode, r.stdout) == (0, want[1]), r.stderr[-2000:]
    assert want[0] != want[1], "the system prompt should change the greedy answer"


def test_piped_chat_refuses_an_empty_pipe_and_leaves_textual_alone():
    for stdin in ("", "  \n"):
        r = piped_chat(stdin, "-n", "8", "--temperature", "0")
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.splitlines() == ['edgemoe: error: stdin is empty: pipe a prompt, e.g. echo "hi" | edgemoe chat']
    code = (
        "import sys\nfrom edgemoe.cli import main\nrc = main(['chat', '-n', '2', '--temperature', '0'])\n"
        "assert 'textual' not in sys.modules, 'the piped chat imported Textual'\nsys.exit(rc)"
    )
    r = piped_chat("hi", code=code)
    assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr[-2000:]


def test_plain_chat_shows_the_cache_at_work():
    """`edgemoe chat` with no options: the bundled model streams from its store into a cache that
    holds half its experts, and the panel shows the budget and hit rates, not "all resident"."""
    from edgemoe.cli import build_parser
    from edgemoe.tui.cli import BUNDLED_CACHE_SHARE, open_chat_model

    m = open_chat_model(build_parser().parse_args(["chat"]))
    try:
        plan = m.memory_plan
        assert plan is not None and m.stats().cache is not None, "the bundled model must stream"
        assert plan.cache_capacity == int(BUNDLED_CACHE_SHARE * plan.experts)
        assert m.stats().budget_bytes == plan.budget and m.quality == "max"
        app = ChatApp(m, sampling={"max_tokens": 24, "seed": 0, "ignore_eos": True})

        async def go():
            async with app.run_test(size=(120, 36)) as pilot:
                await type_line(pilot, "ROMEO. What light")
                await wait_idle(pilot)
                text = screen_text(app)
                assert "all experts resident" not in text
                from edgemoe.tui.widgets.stats_panel import short_size

                assert "hit rate" in text and f"of {short_size(m.stats().budget_bytes)}" in text
                c = m.stats().cache
                assert c.misses > 0 and c.evictions > 0, "half the experts cached: some must be read again"

        run(go())
    finally:
        m.close()
