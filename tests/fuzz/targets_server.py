"""Random request bodies for the server fuzzers, and one bounded loopback request."""

from __future__ import annotations

import http.client
import json
import random

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "seed",
    "stop",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "echo",
    "response_format",
    "suffix",
    "tools",
    "role",
    "content",
    "type",
    "text",
    "include_usage",
    "user",
]
ATOMS = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    4,
    0.5,
    -0.0,
    1e308,
    -1e308,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1.5,
    "",
    "x",
    "hi there",
    "user",
    "system",
    "assistant",
    "developer",
    "text",
    "\u0000",
    "\udcff",
    "a" * 300,
    "tiny",
    "edgemoe",
    "<|endoftext|>",
    [],
    {},
    [1, 2, 3],
    [99999999],
    [-1],
    ["a", "b"],
]
MAX_TOKENS_CAP = 4  # valid requests generate this many tokens at most: bounded time


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth >= 3 or r < 0.5:
        return rng.choice(ATOMS)
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(FIELDS): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def cap(body):
    """Keep generation short: a missing or large max_tokens becomes MAX_TOKENS_CAP."""
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            v = body.get(k)
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_TOKENS_CAP):
                body[k] = MAX_TOKENS_CAP
    return body


def random_body(rng: random.Random) -> tuple[str, bytes]:
    endpoint = rng.choice(ENDPOINTS)
    r = rng.random()
    if r < 0.1:  # not JSON at all
        return endpoint, bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if r < 0.2:
        return endpoint, json.dumps(random_json(rng)).encode()
    body = (
        {"prompt": "hello"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "hello"}]}
    )
    for _ in range(rng.randint(0, 5)):
        body[rng.choice(FIELDS)] = random_json(rng, 1)
    if rng.random() < 0.3 and endpoint.endswith("chat/completions"):
        body["messages"] = [{rng.choice(FIELDS): random_json(rng, 2) for _ in range(2)}]
    return endpoint, json.dumps(cap(body)).encode()


def send(port: int, endpoint: str, body: bytes, timeout: float = 20.0):
    """(status, parsed JSON body or raw text) of one POST; TimeoutError when it takes too long."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", endpoint, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    except TimeoutError:
        raise TimeoutError(endpoint) from None
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    if "json" in ctype:
        return resp.status, json.loads(data)
    return resp.status, data.decode("utf-8", "replace")
