"""Input limits and timeouts: each limit answers a 4xx naming it in its API's error object (413 for the body),
bodies are refused before they are read or parsed, nothing a client sends gets a 5xx, and streams whose model
or upstream goes silent end with an error event while everyone else is served."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gateway.config import RequestLimits
from gateway.errors import APIError
from gateway.input_limits import JsonShape, check_fields
from tests.conftest import MODEL, free_port, model_config, start_server

CHAT, COMPLETIONS, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"
MSG = {"role": "user", "content": "Hi"}
BASE = {CHAT: {"model": MODEL, "messages": [MSG], "max_tokens": 2},
        COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        RESPONSES: {"model": MODEL, "input": "Hi", "max_output_tokens": 2},
        MESSAGES: {"model": MODEL, "messages": [MSG], "max_tokens": 2}}
DEFAULTS = RequestLimits()
TOO_LONG = "x" * (DEFAULTS.max_prompt_chars + 1)


def nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


CASES = [  # path, fields replaced, the param named (None: the body as a whole), the limit
    (CHAT, {"messages": [MSG] * 2049}, "messages", "max_messages"),
    (CHAT, {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages", "max_prompt_chars"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": TOO_LONG}]}]}, "messages",
     "max_prompt_chars"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "description": TOO_LONG}}]}, "tools",
     "max_prompt_chars"),
    (CHAT, {"max_tokens": 2**20 + 1}, "max_tokens", "max_tokens"),
    (CHAT, {"max_completion_tokens": 2**20 + 1}, "max_completion_tokens", "max_tokens"),
    (CHAT, {"n": 17}, "n", "max_n"),
    (CHAT, {"n": 300.0}, "n", "max_n"),                 # the request model reads a whole float as an int
    (CHAT, {"max_tokens": "2000000"}, "max_tokens", "max_tokens"),     # and a numeric string
    (CHAT, {"stop": ["s"] * 17}, "stop", "max_stop_sequences"),
    (CHAT, {"stop": "s" * 257}, "stop", "max_stop_chars"),
    (CHAT, {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "max_logit_bias_entries"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(70)}}}, None,
     "max_json_depth"),
    (COMPLETIONS, {"prompt": ["Hi"] * 2049}, "prompt", "max_messages"),
    (COMPLETIONS, {"prompt": TOO_LONG}, "prompt", "max_prompt_chars"),
    (COMPLETIONS, {"prompt": [1] * (DEFAULTS.max_json_values + 1)}, None, "max_json_values"),
    (COMPLETIONS, {"n": 17}, "n", "max_n"),
    (COMPLETIONS, {"n": 968.0}, "n", "max_n"),
    (COMPLETIONS, {"stop": "s" * 257}, "stop", "max_stop_chars"),
    (COMPLETIONS, {"max_tokens": 10**30}, "max_tokens", "max_tokens"),
    (RESPONSES, {"input": [MSG] * 2049}, "input", "max_messages"),
    (RESPONSES, {"instructions": TOO_LONG}, "instructions", "max_prompt_chars"),
    (RESPONSES, {"max_output_tokens": 2**20 + 1}, "max_output_tokens", "max_tokens"),
    (MESSAGES, {"messages": [MSG] * 2049}, "messages", "max_messages"),
    (MESSAGES, {"system": TOO_LONG}, "system", "max_prompt_chars"),
    (MESSAGES, {"stop_sequences": ["s"] * 17}, "stop_sequences", "max_stop_sequences"),
    (MESSAGES, {"max_tokens": 2**20 + 1}, "max_tokens", "max_tokens"),
]


@pytest.fixture(scope="module")
def server():
    live = start_server(model_config(kv_cache={"num_pages": 256}))       # the default limits
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def error_of(answer: httpx.Response, path: str, status: int) -> dict:
    """The error object in the shape of the API at `path`: Anthropic's for /v1/messages, else OpenAI's."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    if path == MESSAGES:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path, change, param, limit", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_each_limit_is_a_400_naming_it(http, path, change, param, limit):
    error = error_of(http.post(path, json={**BASE[path], **change}), path, 400)
    assert f"server.limits.{limit}" in error["message"], error
    assert str(getattr(DEFAULTS, limit)) in error["message"]
    if path != MESSAGES:
        assert error["param"] == param


def test_the_sdk_sees_a_bad_request(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[MSG] * 2049, max_tokens=2)
    assert caught.value.body["code"] == "array_above_max_length"


def test_limits_at_their_bounds_pass():
    # every string of the messages counts: 3 roles, a part's type (4 characters each) and 10 of content
    limits = RequestLimits(max_messages=3, max_prompt_chars=26, max_tokens=5, max_n=2, max_stop_sequences=2,
                           max_stop_chars=3, max_logit_bias_entries=2)
    at = {"model": "m", "messages": [{"role": "user", "content": "abcd"}, {"role": "user", "content": "ef"},
                                     {"role": "user", "content": [{"type": "text", "text": "ghij"}]}],
          "max_tokens": 5, "max_completion_tokens": 5, "n": 2, "stop": ["abc", "d"], "logit_bias": {"1": 1, "2": 2}}
    check_fields(CHAT, at, limits)
    check_fields(COMPLETIONS, {"prompt": [[1, 2], [3]] * 1 + [[4]], "n": 2, "stop": "abc"}, limits)
    check_fields(COMPLETIONS, {"prompt": list(range(1000))}, limits)        # one token-id prompt, not 1000
    for change in ({"messages": at["messages"] + [{"role": "user", "content": ""}]}, {"max_tokens": 6},
                   {"max_completion_tokens": 6}, {"n": 3}, {"stop": ["a", "b", "c"]}, {"stop": "abcd"},
                   {"logit_bias": {"1": 1, "2": 2, "3": 3}},
                   {"messages": [{"role": "user", "content": "abcde"}] + at["messages"][1:]}):
        with pytest.raises(APIError):
            check_fields(CHAT, {**at, **change}, limits)
    # fields of the wrong type are left for the request model to refuse in its own words
    check_fields(CHAT, {"messages": "text", "n": "many", "stop": 5, "max_tokens": True, "logit_bias": []}, limits)
    check_fields(MESSAGES, [1, 2], limits)


def _walk(value, depth: int = 0) -> tuple[int, int]:
    """The plain reference: (nesting depth, array elements + object members + containers)."""
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        inner = [_walk(item, depth + 1) for item in items]
        return max([depth + 1] + [d for d, _ in inner]), 1 + max(len(items) - 1, 0) + sum(v for _, v in inner)
    return depth, 0


KEY_TAILS = ["", "[", ",", "\\\\", '"', "}"]


def _random_json(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 6 or roll < 0.4:
        return rng.choice([1, -2.5e3, None, True, "plain", 'q"u\\"o', "\\", "\\\\\"", "[{,}]", "x\\\\", ",[", "é,{"])
    if roll < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}" + rng.choice(KEY_TAILS): _random_json(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_json_shape_matches_the_parsed_body_in_any_pieces():
    rng = random.Random(7)
    for _ in range(2000):
        value = _random_json(rng)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        shape, start = JsonShape(), 0
        while start < len(text):
            end = start + rng.randint(1, 9)
            shape.feed(text[start:end])
            start = end
        assert (shape.max_depth, shape.values) == _walk(value), text
        assert shape.depth == 0 and not shape.in_string


def test_body_over_the_limit_is_refused_from_its_length_before_it_is_read(server, http):
    size = 30 << 20
    for path in (CHAT, MESSAGES):
        error = error_of(http.post(path, content=b"x" * size, headers={"content-type": "application/json"}), path, 413)
        assert "server.limits.max_body_bytes" in error["message"] and str(size) in error["message"]
    # the answer comes with only the headers sent: the server did not wait for the 30 MB
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as raw:
        raw.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    f"content-length: {size}\r\n\r\n{{".encode())
        assert raw.recv(65536).startswith(b"HTTP/1.1 413")


def test_body_without_a_length_is_refused_as_it_streams_in(server):
    sent = 0

    def pieces():
        nonlocal sent
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        while sent < 30 << 20:
            sent += 1 << 20
            yield b"y" * (1 << 20)
        yield b'"}]}'
    try:
        answer = httpx.post(f"{server.base_url}/chat/completions", content=pieces(), timeout=120,
                            headers={"content-type": "application/json"})
        error = error_of(answer, CHAT, 413)
        assert "server.limits.max_body_bytes" in error["message"]
    except httpx.WriteError:
        pass                                   # the server closed the connection without reading the rest
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_health_answers_while_a_large_body_uploads(server):
    """A 15 MB body (under the limit) sent slowly: /health keeps answering, the body is then refused for
    its prompt, and a 16 MiB body of values is refused mid-upload by its shape."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "z" * (15 << 20)}]}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    answers: list[bytes] = []
    healths: list[int] = []

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as raw:
            raw.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode())
            for start in range(0, len(body), 1 << 20):
                raw.sendall(body[start:start + (1 << 20)])
                time.sleep(0.05)
            answers.append(b"".join(iter(lambda: raw.recv(65536), b"")))
    thread = threading.Thread(target=upload)
    thread.start()
    while thread.is_alive():
        healths.append(httpx.get(f"{server.url}/health", timeout=30).status_code)
    thread.join()
    assert len(healths) > 3 and set(healths) == {200}
    head, _, payload = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"server.limits.max_prompt_chars" in payload
    values = b'{"model": "m", "prompt": [' + b"1," * (7 << 20) + b"1]}"        # 14 MiB, under the size limit
    error = error_of(httpx.post(f"{server.base_url}/completions", content=values, timeout=120,
                                headers={"content-type": "application/json"}), COMPLETIONS, 400)
    assert "server.limits.max_json_values" in error["message"]


NASTY = [b"", b"null", b"[]", b"42", b'"text"', b"{", b"\xff\xfe{}", b'{"model": "\xc3"}', b"[" * 100_000,
         b"{\"a\":" * 50_000, b'{"model": 1' + b"0" * 5000 + b"}", b'{"model": NaN}', b'{"messages": [1, 2]}',
         b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', b'{"prompt": [[[]]]}',
         b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}',
         b'{"n": -1, "stop": [[]], "logit_bias": {"x": "y"}, "max_tokens": "lots"}', b'{"input": {"a": 1}}',
         b'{"system": [{"type": "image"}], "messages": [], "max_tokens": 1}']


def test_nothing_a_client_sends_gets_a_5xx(server, http):
    for path in (CHAT, COMPLETIONS, RESPONSES, MESSAGES):
        for body in NASTY:
            for content_type in ("application/json", "text/plain"):
                answer = http.post(path, content=body, headers={"content-type": content_type})
                assert 400 <= answer.status_code < 500, (path, body[:40], answer.text)
                error_of(answer, path, answer.status_code)
    assert http.post(CHAT, json=BASE[CHAT]).status_code == 200
    server.wait_idle()


# ---- timeouts -----------------------------------------------------------------------------------

async def _stalled_models(_request):
    return JSONResponse({"object": "list", "data": [{"id": "stall-before", "object": "model"}]})


async def _stalled_chat(request):
    """An upstream gone silent: `stall-before` never answers; `stall-after` sends one chunk, then nothing."""
    body = await request.json()
    if body["model"] == "stall-before":
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        return JSONResponse({}, status_code=499)            # no one reads it
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}

    async def events():
        yield f"data: {json.dumps(chunk)}\n\n"
        await asyncio.sleep(3600)
    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stalled_upstream():
    app = Starlette(routes=[Route("/v1/models", _stalled_models), Route("/v1/chat/completions", _stalled_chat,
                                                                        methods=["POST"])])
    port = free_port()
    upstream = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                             timeout_graceful_shutdown=1))
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    while not upstream.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    upstream.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def idle_server(stalled_upstream):
    config = model_config(kv_cache={"num_pages": 256}, scheduler={"max_running_requests": 1})
    config["models"] += [
        {"name": "stall-before", "workers": [stalled_upstream], "timeout_s": 1, "num_retries": 0},
        {"name": "stall-after", "workers": [stalled_upstream], "timeout_s": 60, "num_retries": 0}]
    config["server"] = {"limits": {"stream_idle_timeout_s": 5}}        # well past a step on a busy CPU
    live = start_server(config)
    yield live
    live.stop()


def sse_data(answer: httpx.Response) -> list[dict | str]:
    events = [line[5:].strip() for line in answer.text.splitlines() if line.startswith("data:")]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


def test_upstream_that_never_answers_is_a_504(idle_server):
    for stream in (False, True):
        answer = httpx.post(f"{idle_server.base_url}/chat/completions", timeout=60,
                            json={"model": "stall-before", "messages": [MSG], "stream": stream})
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "upstream_timeout"


def test_upstream_gone_silent_mid_stream_ends_with_an_error_event(idle_server):
    answer = httpx.post(f"{idle_server.base_url}/chat/completions", timeout=60,
                        json={"model": "stall-after", "messages": [MSG], "stream": True})
    events = sse_data(answer)
    assert events[1]["choices"][0]["delta"]["content"] == "Hel"
    assert "server.limits.stream_idle_timeout_s" in events[-1]["error"]["message"]
    answer = httpx.post(f"{idle_server.base_url}/messages", timeout=60,
                        json={"model": "stall-after", "messages": [MSG], "max_tokens": 8, "stream": True})
    kinds = [line[6:].strip() for line in answer.text.splitlines() if line.startswith("event:")]
    assert "content_block_delta" in kinds and kinds[-1] == "error"
    error = sse_data(answer)[-1]
    assert error["type"] == "error" and "stream_idle_timeout_s" in error["error"]["message"]


def test_a_request_left_waiting_ends_with_an_error_event_others_go_on(idle_server):
    """One request runs at a time: the one queued behind a long generation hears nothing for the idle
    timeout and ends with an error event while the running one keeps streaming; the engine drops both
    (the queued one timed out, the running one's client leaves)."""
    warm = httpx.post(f"{idle_server.base_url}/chat/completions", timeout=60,      # the first step is slow
                      json={"model": MODEL, "messages": [MSG], "max_tokens": 2})
    assert warm.status_code == 200
    seen: list[dict | str] = []
    leave = threading.Event()

    def long_stream() -> None:
        body = {"model": MODEL, "messages": [MSG], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{idle_server.base_url}/chat/completions", json=body, timeout=120) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                if leave.is_set():
                    return
    thread = threading.Thread(target=long_stream)
    thread.start()
    while not seen:
        time.sleep(0.05)
    answer = httpx.post(f"{idle_server.base_url}/chat/completions", timeout=60,
                        json={"model": MODEL, "messages": [MSG], "max_tokens": 8, "stream": True})
    events = sse_data(answer)
    assert "server.limits.stream_idle_timeout_s" in events[-1]["error"]["message"], events
    answer = httpx.post(f"{idle_server.base_url}/chat/completions", timeout=60,      # not streamed: a 504
                        json={"model": MODEL, "messages": [MSG], "max_tokens": 8})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "timeout"
    assert "server.limits.stream_idle_timeout_s" in answer.json()["error"]["message"]
    ended_at = len(seen)
    deadline = time.monotonic() + 60
    while len(seen) < ended_at + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    leave.set()
    thread.join(timeout=120)
    assert len(seen) >= ended_at + 5, "the running stream did not go on"
    assert all("error" not in event for event in seen)
    idle_server.wait_idle()
