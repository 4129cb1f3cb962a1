"""`edgemoe serve`: a live server on 127.0.0.1 with a tiny model, driven by the official openai
client and by raw HTTP; /stats, /metrics, the queue limit, client disconnects, the examples."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import edgemoe
from edgemoe.api import Stats
from edgemoe.runtime.stats import CacheStats, LayerCacheStats, stats_to_dict
from edgemoe.serve import metrics
from edgemoe.serve.server import Server, is_loopback

openai = pytest.importorskip("openai")
prom_parser = pytest.importorskip("prometheus_client.parser")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny(build_model) -> Path:
    return build_model("qwen3moe")


@pytest.fixture(scope="module")
def model(tiny):
    with edgemoe.load(tiny, n_ctx=512) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, "127.0.0.1", 0, max_queue=4).start()  # the parallel test runs 4 clients
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


def raw(server, method: str, path: str, body: bytes | str | dict | None = None, timeout: float = 30):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    ctype = r.getheader("Content-Type", "")
    return r.status, dict(r.getheaders()), json.loads(data) if ctype.startswith("application/json") else data


def assert_error_shape(obj: dict) -> dict:
    assert set(obj) == {"error"}
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---- OpenAI client ---------------------------------------------------------------------------------


def test_models_list(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.name] and models[0].object == "model"
    assert client.models.retrieve(server.name).id == server.name


def test_completion_matches_generate(client, server, model):
    prompt = "Once upon a time"
    want = model.generate(prompt, max_tokens=12, temperature=0)
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == server.name
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    n_prompt = len(model.tokenize(prompt, special=True))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)

    chunks = list(
        client.completions.create(
            model=server.name,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and len({c.id for c in chunks}) == 1


def test_completion_stop_and_token_prompt(client, server, model):
    prompt = "The king"
    full = model.generate(prompt, max_tokens=10, temperature=0)
    stop = full[3:6]
    assume = stop and full.find(stop) == 3
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    if assume:
        assert r.choices[0].text == full[:3] and r.choices[0].finish_reason == "stop"
    ids = model.tokenize(prompt, special=True)
    r = client.completions.create(model=server.name, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == full


def test_chat_matches_model_chat(client, server, model):
    want = model.chat(MESSAGES, max_tokens=16, temperature=0)
    r = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1

    chunks = list(
        client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=16, temperature=0, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_sampling_params_and_extensions(client, server, model):
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    want = model.generate("Seeded", top_k=20, min_p=0.1, repeat_penalty=1.1, **kw)
    r = client.completions.create(
        model=server.name, prompt="Seeded", extra_body={"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1}, **kw
    )
    assert r.choices[0].text == want
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=server.name, prompt="x", temperature=5)
    assert exc.value.body["param"] == "temperature"


def test_parallel_requests_equal_serial(client, server):
    prompts = ["Alpha", "Bravo two", "Charlie three four", "Delta"]

    def one(p: str) -> tuple[str, str]:
        a = client.completions.create(model=server.name, prompt=p, max_tokens=8, temperature=0).choices[0].text
        b = (
            client.chat.completions.create(
                model=server.name, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0
            )
            .choices[0]
            .message.content
        )
        return a, b

    serial = [one(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(one, prompts * 2))
    assert parallel == serial * 2


# ---- raw HTTP: validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": [99999999]}, 400, None),  # token id out of range: EdgeMoEError -> 400
        ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
        ("/v1/chat/completions", {"messages": MESSAGES, "model": 7}, 400, "model"),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    got, _, obj = raw(server, "POST", path, body)
    assert got == status
    err = assert_error_shape(obj)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_wrong_method_and_keepalive(server):
    got, _, obj = raw(server, "GET", "/v1/completions")
    assert got == 405 and assert_error_shape(obj)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # errors keep the connection
    for _ in range(2):
        conn.request("POST", "/v1/completions", body='{"prompt": 1}')
        r = conn.getresponse()
        assert r.status == 400 and assert_error_shape(json.loads(r.read()))
    conn.close()


# ---- /stats and /metrics ---------------------------------------------------------------------------

STATS_KEYS = {
    "prompt_tokens",
    "generated_tokens",
    "prompt_tokens_per_s",
    "decode_tokens_per_s",
    "resident_bytes",
    "peak_resident_bytes",
    "budget_bytes",
    "model_bytes",
    "kv_bytes",
    "n_ctx",
    "cache",
    "quality",
    "lossless",
}


def fake_stats() -> Stats:
    layer = LayerCacheStats(
        **{f.name: v for f, v in zip(dataclasses.fields(LayerCacheStats), (3, 1, 1, 4096, 1, 0, 0, 0.25, *[0] * 20))}
    )
    known = dict(
        hits=6,
        misses=2,
        partial_hits=2,
        bytes_read=8192,
        evictions=2,
        upgrades=0,
        downgrades=0,
        io_stall_s=0.5,
        cache_bytes=1000,
        cache_capacity=2000,
        resident_bytes_by_bits={2: 400, 4: 600},
        layers=(layer, layer),
        experts={(0, 3): (3, 1, 1), (1, 7): (3, 1, 1)},
        resident_bits={(0, 3): 4, (1, 7): 2},
    )
    for f in dataclasses.fields(CacheStats):  # counters added since: zero / {bits: n}
        known.setdefault(f.name, {4: 1} if str(f.type).startswith("dict") else 0)
    cache = CacheStats(**known)
    return Stats(1, 2, 3.0, 4.0, 5, 6, 7, 8, 9, 10, cache, quality="fast", lossless=False)


def test_stats_endpoint(server, client):
    client.completions.create(model=server.name, prompt="count me", max_tokens=3, temperature=0)
    got, _, obj = raw(server, "GET", "/stats")
    assert got == 200 and set(obj) == STATS_KEYS
    assert obj["generated_tokens"] >= 3 and obj["n_ctx"] == 512 and obj["cache"] is None
    assert obj["quality"] == "max" and obj["lossless"] is True  # the quality every figure is measured at


def test_stats_to_dict_serialises_tuple_keys():
    d = stats_to_dict(fake_stats())
    json.dumps(d)
    assert set(d) == STATS_KEYS
    c = d["cache"]
    assert c["experts"] == {"0,3": [3, 1, 1], "1,7": [3, 1, 1]}
    assert c["resident_bits"] == {"0,3": 4, "1,7": 2}
    assert c["resident_bytes_by_bits"] == {"2": 400, "4": 600}
    assert c["hit_rate"] == 0.6 and c["layers"][1]["hits"] == 3 and c["layers"][0]["hit_rate"] == 0.6
    assert d["quality"] == "fast" and d["lossless"] is False


def _families(text: str) -> dict:
    return {f.name: f for f in prom_parser.text_string_to_metric_families(text)}


def test_metrics_endpoint_parses(server, client):
    client.completions.create(model=server.name, prompt="metrics", max_tokens=2, temperature=0)
    raw(server, "POST", "/v1/completions", b"{")
    got, headers, text = raw(server, "GET", "/metrics")
    assert got == 200 and headers["Content-Type"].startswith("text/plain")
    fam = _families(text)
    for name in (
        "edgemoe_generated_tokens",
        "edgemoe_decode_tokens_per_second",
        "edgemoe_resident_bytes",
        "edgemoe_queue_depth",
        "edgemoe_requests",
    ):
        assert name in fam, name
    reqs = {(s.labels["endpoint"], s.labels["status"]): s.value for s in fam["edgemoe_requests"].samples}
    assert reqs[("/v1/completions", "200")] >= 1 and reqs[("/v1/completions", "400")] >= 1
    [info] = fam["edgemoe_quality_info"].samples
    assert info.labels == {"quality": "max", "lossless": "true"} and info.value == 1
    assert fam["edgemoe_quality_lossless"].samples[0].value == 1


def test_metrics_render_cache_per_layer():
    fam = _families(metrics.render(fake_stats(), queue_depth=2, in_flight=3, requests={("/v1/completions", 429): 4}))
    assert [s.labels["layer"] for s in fam["edgemoe_cache_layer_hits"].samples] == ["0", "1"]
    assert fam["edgemoe_cache_hits"].samples[0].value == 6
    assert fam["edgemoe_budget_bytes"].samples[0].value == 7
    assert fam["edgemoe_cache_resident_bytes_by_bits"].samples[1].labels == {"bits": "4"}
    assert fam["edgemoe_queue_depth"].samples[0].value == 2
    assert fam["edgemoe_quality_info"].samples[0].labels == {"quality": "fast", "lossless": "false"}
    assert fam["edgemoe_quality_lossless"].samples[0].value == 0


# ---- queue, disconnects, shutdown ------------------------------------------------------------------


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_queue_limit_answers_429(server, model):
    body = {"prompt": "queued", "max_tokens": 2, "temperature": 0}
    results: list[int] = []
    with model._lock:  # the model is busy: requests wait behind it
        threads = [
            threading.Thread(target=lambda: results.append(raw(server, "POST", "/v1/completions", body)[0]))
            for _ in range(1 + server.gate.max_queue)
        ]
        for t in threads:
            t.start()
        _wait(lambda: server.gate.in_flight == 1 + server.gate.max_queue)
        got, headers, obj = raw(server, "POST", "/v1/completions", body)
        assert got == 429 and headers.get("Retry-After") == "1"
        assert assert_error_shape(obj)["type"] == "rate_limit_error"
        _, _, text = raw(server, "GET", "/metrics")
        assert _families(text)["edgemoe_queue_depth"].samples[0].value == 1 + server.gate.max_queue
    for t in threads:
        t.join(30)
    assert results == [200] * len(threads)


@pytest.fixture
def slow_model(model, monkeypatch):
    forward = model._engine.forward

    def slow(*a, **kw):
        time.sleep(0.01)
        return forward(*a, **kw)

    monkeypatch.setattr(model._engine, "forward", slow)
    return model


def test_client_disconnect_stops_generation(server, slow_model):
    before = slow_model.stats().generated_tokens
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"prompt": "long", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    s.close()
    _wait(lambda: server.gate.in_flight == 0, 5)
    assert slow_model.stats().generated_tokens - before < 200  # 400 tokens take >= 4 s


def test_close_stops_running_generation(model, slow_model):
    srv = Server(model, "127.0.0.1", 0, max_queue=0).start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=20)
    stream = c.completions.create(model=srv.name, prompt="x", max_tokens=400, temperature=0, stream=True)
    next(iter(stream))
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 3 and srv.gate.in_flight == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_polls_are_quiet_in_the_log(model, capsys):
    """`edgemoe monitor` polls /stats every second: successful GETs of the read-only endpoints are not
    logged; completions and errors (a poll's included) are."""
    with Server(model, "127.0.0.1", 0, log=True).start() as srv:
        capsys.readouterr()
        for path in ("/stats", "/metrics", "/v1/models", f"/v1/models/{srv.name}", "/health") * 2:
            assert raw(srv, "GET", path)[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("HEAD", "/stats")
        assert conn.getresponse().status == 200
        conn.close()
        assert capsys.readouterr().err == "", "a successful poll was logged"
        raw(srv, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        raw(srv, "GET", "/v1/models/nope")
        raw(srv, "GET", "/nowhere")
        lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert '"POST /v1/completions HTTP/1.1" 200' in lines[0]
    assert '"GET /v1/models/nope HTTP/1.1" 404' in lines[1] and '"GET /nowhere HTTP/1.1" 404' in lines[2]


def test_max_tokens_default_of_the_server(model):
    """`edgemoe serve -n N` (llama-server's -n): the default of requests that name no max_tokens."""
    with Server(model, "127.0.0.1", 0, max_tokens=3).start() as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        done = c.completions.create(model=srv.name, prompt="hi", temperature=0)
        chat = c.chat.completions.create(model=srv.name, messages=MESSAGES, temperature=0)
        asked = c.completions.create(model=srv.name, prompt="hi", temperature=0, max_tokens=5)
    assert done.usage.completion_tokens <= 3 and chat.usage.completion_tokens <= 3
    assert 3 in (done.usage.completion_tokens, chat.usage.completion_tokens)  # not all cut by an end token
    assert asked.usage.completion_tokens > 3 or asked.choices[0].finish_reason == "stop"
    bad = subprocess.run(
        [sys.executable, "-m", "edgemoe", "serve", "-n", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-tokens must be positive" in bad.stderr


def test_non_loopback_host_is_refused(model):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    with pytest.raises(edgemoe.EdgeMoEError, match="loopback"):
        Server(model, "0.0.0.0", 0)


def test_cli_serve_and_ctrl_c(tiny):
    p = subprocess.Popen(
        [sys.executable, "-m", "edgemoe", "serve", "-m", str(tiny), "--port", "0", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = p.stderr.readline()
        assert "serving" in line, line
        url = line.split(" at ", 1)[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)
        assert (
            c.completions.create(model=c.models.list().data[0].id, prompt="hi", max_tokens=2).choices[0].finish_reason
        )
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- examples --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["generate", "stream", "chat", "threads", "openai_client"])
def test_examples_run(name, tiny, server):
    env = dict(os.environ, EDGEMOE_MODEL=str(tiny), EDGEMOE_BASE_URL=server.url + "/v1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py")], env=env, capture_output=True, text=True, timeout=50
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
