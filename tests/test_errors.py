"""Every client mistake gets an OpenAI error object with the right status, and disturbs nobody."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.conftest import MODEL, model_config, start_server

CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        yield client


def test_unknown_model_404(http):
    error = assert_error(http.post(CHAT, json={**GOOD, "model": "gpt-nope"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(http.get("/v1/models/gpt-nope"), 404)


def test_malformed_json_400(http):
    response = http.post(CHAT, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize("change, param", [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": "hello"}, "messages"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"model": ""}, "model"),
    ({"priority": "urgent"}, "priority"),
    ({"priority": 2**40}, "priority"),
])
def test_invalid_fields_400(http, change, param):
    body = {**GOOD, **change}
    if change.get("messages", "keep") is None:
        del body["messages"]
    assert_error(http.post(CHAT, json=body), 400, param)


def test_body_not_an_object_400(http):
    assert_error(http.post(CHAT, json=["not", "an", "object"]), 400)


def test_prompt_longer_than_context_names_both(http, live_server):
    context = live_server.engine.context_length
    words = "hello " * (context + 100)
    error = assert_error(http.post(CHAT, json={**GOOD, "messages": [{"role": "user", "content": words}]}), 400)
    assert str(context) in error["message"]
    assert error["code"] == "context_length_exceeded"
    prompt_tokens = int(error["message"].split("your prompt is ")[1].split()[0])
    assert prompt_tokens > context
    error = assert_error(http.post(CHAT, json={**GOOD, "max_tokens": context * 2}), 400, "max_tokens")
    assert str(context) in error["message"]


def test_completions_errors(http):
    assert_error(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 99}), 400)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get(CHAT), 405)


def test_sdk_raises_typed_errors(live_server):
    client = openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=GOOD["messages"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=GOOD["messages"], temperature=9)


def test_bad_requests_do_not_disturb_a_stream(live_server, http):
    client = openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "List three colours."}]
    alone = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    pieces: list[str] = []

    def stream() -> None:
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                    max_tokens=30, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")

    thread = threading.Thread(target=stream)
    thread.start()
    for _ in range(10):
        http.post(CHAT, content=b"{broken", headers={"content-type": "application/json"})
        http.post(CHAT, json={**GOOD, "temperature": -1})
        http.post(CHAT, json={**GOOD, "model": "missing"})
    thread.join(timeout=120)
    assert "".join(pieces) == alone.choices[0].message.content
    live_server.wait_idle()


def test_api_keys_enforced():
    config = model_config(kv_cache={"num_pages": 64})
    config["server"] = {"api_keys": ["sk-test-1"]}
    server = start_server(config)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            error = assert_error(http.post(CHAT, json=GOOD), 401)
            assert error["code"] == "invalid_api_key"
            assert_error(http.post(CHAT, json=GOOD, headers={"authorization": "Bearer wrong"}), 401)
            assert_error(http.post("/clear_radix_cache"), 401)
            ok = http.post(CHAT, json=GOOD, headers={"authorization": "Bearer sk-test-1"})
            assert ok.status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        server.stop()


def test_image_parts_rejected_and_nulls_accepted(http):
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    error = assert_error(http.post(CHAT, json={**GOOD, "messages": [image]}), 400)
    assert "'image_url' are not supported" in error["message"] and error["param"] == "messages.0.content"
    nulls = {**GOOD, "temperature": None, "top_p": None, "n": None, "presence_penalty": None,
             "frequency_penalty": None, "stop": None, "seed": None, "logit_bias": None, "max_tokens": None}
    nulls["max_tokens"] = 2
    assert http.post(CHAT, json=nulls).status_code == 200
