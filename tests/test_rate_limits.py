"""Per-key limits: requests/minute, tokens/minute (charged from usage as requests end), concurrent streams
(released however a request ends, the client gone included); 429 with Retry-After and each API's error object."""
from __future__ import annotations

import threading
import time

import anthropic
import httpx
import openai
import pytest

from gateway.config import KeyLimits
from gateway.rate_limits import KeyBudget, RateLimited
from tests.conftest import MODEL, model_config, start_server

PLAIN, RPM, TPM_STREAM, TPM_WHOLE, ONE_STREAM, OTHER = (
    "sk-plain", "sk-rpm", "sk-tpm-stream", "sk-tpm-whole", "sk-one-stream", "sk-other")
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "user", "content": "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 12}]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_bucket():
    clock = Clock()
    budget = KeyBudget("k", KeyLimits(requests_per_minute=3), clock)
    for _ in range(3):
        budget.admit()
        budget.finish(0)
    with pytest.raises(RateLimited, match="3 requests per minute") as caught:
        budget.admit()
    assert caught.value.retry_after_s == pytest.approx(20.0) and caught.value.retry_after_header == "20"
    clock.now += 19.9
    with pytest.raises(RateLimited):
        budget.admit()
    clock.now += 0.1                                      # one request's worth refilled: 60 s / 3
    budget.admit()
    budget.finish(0)
    clock.now += 3600                                     # the bucket holds at most a minute's worth
    for _ in range(3):
        budget.admit()
        budget.finish(0)
    with pytest.raises(RateLimited):
        budget.admit()


def test_tokens_per_minute_charged_as_requests_end():
    clock = Clock()
    budget = KeyBudget("k", KeyLimits(tokens_per_minute=600), clock)     # 10 tokens a second
    budget.admit()
    budget.admit()                                        # admitted while the balance is positive
    budget.finish(500)
    budget.finish(400)                                    # balance 600 - 900 = -300
    with pytest.raises(RateLimited, match="600 tokens per minute") as caught:
        budget.admit()
    assert caught.value.retry_after_s == pytest.approx(30.1)          # to a balance of one token
    clock.now += 30.0
    with pytest.raises(RateLimited):                       # balance 0: not yet
        budget.admit()
    clock.now += 0.2
    budget.admit()
    budget.finish(0)


def test_concurrent_streams_and_refusals_cost_nothing():
    clock = Clock()
    budget = KeyBudget("k", KeyLimits(concurrent_streams=2, requests_per_minute=5), clock)
    budget.admit()
    budget.admit()
    for _ in range(5):                                    # refused for streams: no request token is taken
        with pytest.raises(RateLimited, match="concurrent_streams 2"):
            budget.admit()
    budget.finish(0)
    budget.admit()
    assert budget.streams == 2 and budget.requests.level == pytest.approx(2.0)
    budget.finish(0)
    budget.finish(0)
    assert budget.streams == 0
    with pytest.raises(AssertionError):
        budget.finish(0)                                  # every admitted request ends exactly once


@pytest.fixture(scope="module")
def server():
    config = model_config(kv_cache={"num_pages": 512})
    config["server"] = {
        "api_keys": [PLAIN, {"key": RPM, "name": "rpm", "requests_per_minute": 3},
                     {"key": TPM_STREAM, "name": "tpm-stream", "tokens_per_minute": 60},
                     {"key": TPM_WHOLE, "name": "tpm-whole", "tokens_per_minute": 60},
                     {"key": ONE_STREAM, "name": "one-stream", "concurrent_streams": 1},
                     {"key": OTHER, "name": "other"}],
        "key_limits": {"requests_per_minute": 2}}         # PLAIN's, as it sets none of its own
    live = start_server(config)
    yield live
    live.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def assert_429(error: openai.RateLimitError, name: str, limit: str, most_s: int) -> None:
    response = error.response
    assert response.status_code == 429
    assert error.body["type"] == "rate_limit_error" and error.body["code"] == "rate_limit_exceeded"
    assert f"`{name}`" in error.body["message"] and limit in error.body["message"]
    assert 1 <= int(response.headers["retry-after"]) <= most_s


def test_requests_per_minute_429_in_each_api_shape(server):
    rpm = client(server, RPM)
    for _ in range(3):
        rpm.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        rpm.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert_429(caught.value, "rpm", "3 requests per minute", 20)
    with pytest.raises(openai.RateLimitError):
        rpm.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        anthropic.Anthropic(base_url=server.url, api_key=RPM, max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=HI)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "rate_limit_error"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 20
    # the default limits (key_limits) hold for a key without its own
    plain = client(server, PLAIN)
    plain.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    plain.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        plain.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert_429(caught.value, "key-1", "2 requests per minute", 30)
    # other keys are served all the while; listing models is not a generation request
    assert client(server, OTHER).chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
    assert len(rpm.models.list().data) == 1
    server.wait_idle()


def test_tokens_per_minute_from_usage_streamed_and_whole(server):
    stream = client(server, TPM_STREAM).chat.completions.create(
        model=MODEL, messages=LONG, max_tokens=8, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    used = usage.prompt_tokens + usage.completion_tokens
    assert used > 100                                     # well over the minute's 60
    with pytest.raises(openai.RateLimitError) as caught:
        client(server, TPM_STREAM).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    # the balance is 60 - used, plus what refilled since (1 token a second)
    assert_429(caught.value, "tpm-stream", "60 tokens per minute", used - 60 + 1)
    whole = client(server, TPM_WHOLE).chat.completions.create(model=MODEL, messages=LONG, max_tokens=8)
    used = whole.usage.total_tokens
    with pytest.raises(openai.RateLimitError) as caught:
        client(server, TPM_WHOLE).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert_429(caught.value, "tpm-whole", "60 tokens per minute", used - 60 + 1)
    server.wait_idle()


def admitted_within(server, key: str, timeout_s: float = 60) -> None:
    """Until a request with `key` is admitted (a stream slot is given back when the server sees the end)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=120, headers={"authorization": f"Bearer {key}"}) as http:
        while time.monotonic() < deadline:
            answer = http.post(CHAT, json={"model": MODEL, "messages": HI, "max_tokens": 1})
            if answer.status_code == 200:
                return
            assert answer.status_code == 429 and "concurrent_streams 1" in answer.json()["error"]["message"]
            time.sleep(0.1)
    raise AssertionError("the stream slot was not given back")


def test_concurrent_stream_slot_released_however_the_request_ends(server):
    busy = {"model": MODEL, "messages": HI, "max_tokens": 400, "ignore_eos": True}
    headers = {"authorization": f"Bearer {ONE_STREAM}"}
    one = client(server, ONE_STREAM)
    with httpx.Client(base_url=server.url, timeout=120, headers=headers) as http:
        # 1. a stream whose client goes away mid-way
        with http.stream("POST", CHAT, json={**busy, "stream": True}) as streaming:
            lines = streaming.iter_lines()
            assert next(lines).startswith("data:")
            with pytest.raises(openai.RateLimitError) as caught:
                one.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            assert_429(caught.value, "one-stream", "concurrent_streams 1", 1)
            # everyone else is served meanwhile
            assert client(server, OTHER).chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        admitted_within(server, ONE_STREAM)

        # 2. a whole (non-streamed) request whose client gives up
        def impatient() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}{CHAT}", json=busy, headers=headers, timeout=1.5)
        thread = threading.Thread(target=impatient)
        thread.start()
        thread.join(timeout=60)
        admitted_within(server, ONE_STREAM)

        # 3. finished streams, refused requests and failures end too
        assert len(list(one.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True))) > 1
        assert http.post(CHAT, json={**busy, "max_tokens": 10**6}).status_code == 400        # past the context
        assert http.post(CHAT, json={**busy, "model": "nope"}).status_code == 404
        assert http.post(CHAT, content=b"{broken", headers={"content-type": "application/json"}).status_code == 400
        reply = anthropic.Anthropic(base_url=server.url, api_key=ONE_STREAM, max_retries=0).messages.create(
            model=MODEL, max_tokens=3, messages=HI)
        assert reply.usage.output_tokens >= 1
        admitted_within(server, ONE_STREAM, timeout_s=10)
    server.wait_idle()
