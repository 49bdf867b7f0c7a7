"""The engine runs in its own process: the gateway survives it dying, and says so in OpenAI's terms."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.conftest import MODEL, model_config, start_server


@pytest.fixture()
def server():
    live = start_server(model_config(kv_cache={"page_size": 16, "num_pages": 256}))
    yield live
    live.stop()


def test_engine_is_a_separate_process(server):
    process = server.engine._process
    assert process.is_alive() and process.pid != threading.get_native_id()
    assert server.engine.call_sync("idle") is True
    assert server.engine.info.model_name == MODEL


def test_engine_crash_fails_open_requests_and_later_ones_get_503(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to a thousand."}],
        max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))             # the stream is running
    assert first.choices[0].delta.role == "assistant"
    server.engine._process.kill()          # a crash inside a kernel, as the gateway sees it
    with pytest.raises(openai.APIError) as failure:
        for _ in stream:
            pass
    assert "engine process exited" in str(failure.value)

    deadline = time.monotonic() + 10
    while server.engine.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        reply = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_unavailable"
        assert "exited" in error["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert http.get("/v1/models").status_code == 200        # the gateway itself still answers
