"""A gateway in front of two radixgate worker processes (the embedded model) on 127.0.0.1: cache-aware
routing keeps a conversation on one worker, spreads conversations over both, survives a worker's
death and takes it back; litellm entries and fallbacks in the same gateway."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import MODEL, TEST_BACKEND, free_port, start_server

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """`radixgate serve` of the embedded model as its own process (it can be killed and started again)."""

    def __init__(self, folder: Path, port: int):
        self.port, self.folder = port, folder
        self.config = folder / f"worker-{port}.yaml"
        self.config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": port}, "models": [{
            "name": MODEL, "backend": TEST_BACKEND, "threads": 1, "kv_cache": {"page_size": 16, "num_pages": 1024}}]}))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(self.folder / f"worker-{self.port}.log", "a")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
                                         "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=log, env=env)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "worker exited during start-up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError("worker did not start")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def prompt_tokens(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=5).json()["models"][MODEL]["prompt_tokens_total"]


@pytest.fixture(scope="module")
def fleet():
    with tempfile.TemporaryDirectory() as folder:
        workers = [WorkerProcess(Path(folder), free_port()) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                worker.wait_ready()
            closed = f"http://127.0.0.1:{free_port()}/v1"          # nothing listens there
            remote = {"model": f"openai/{MODEL}", "api_base": f"{workers[0].url}/v1", "api_key": "unused"}
            gateway = start_server({"models": [
                {"name": "fleet", "workers": [f"{w.url}/v1" for w in workers], "upstream_model": MODEL,
                 "routing": {"health_interval_s": 0.5}},
                {"name": "remote", "backend": "litellm", "litellm_params": remote},
                {"name": "remote-missing", "backend": "litellm",
                 "litellm_params": {**remote, "model": "openai/no-such-model"}},
                {"name": "remote-slow", "backend": "litellm", "litellm_params": {**remote, "timeout": 0.001}},
                {"name": "unreachable", "backend": "litellm",
                 "litellm_params": {"model": "openai/x", "api_base": closed, "api_key": "unused"}},
                {"name": "unreachable-workers", "workers": [closed]},
                {"name": "workers-with-fallback", "workers": [closed], "fallbacks": ["fleet"]},
                {"name": "with-fallback", "backend": "litellm", "fallbacks": ["fleet"],
                 "litellm_params": {"model": "openai/x", "api_base": closed, "api_key": "unused"}}]})
            yield gateway, workers
            gateway.stop()
        finally:
            for worker in workers:
                worker.stop()


def _client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120)


def _converse(client, model: str, topic: str, rounds: int) -> list:
    """A multi-turn chat; the usage of every round."""
    messages = [{"role": "system", "content": f"You answer questions about {topic} in two sentences."}]
    usages = []
    for round_index in range(rounds):
        messages.append({"role": "user", "content": f"Tell me fact number {round_index + 1} about {topic}."})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        usages.append(reply.usage)
    return usages


def test_conversation_sticks_to_one_worker(fleet):
    gateway, workers = fleet
    before = [w.prompt_tokens() for w in workers]
    usages = _converse(_client(gateway), "fleet", "the moons of Jupiter", 4)
    grew = [w.prompt_tokens() - b for w, b in zip(workers, before, strict=True)]
    assert sorted(grew)[0] == 0 and sorted(grew)[1] == sum(u.prompt_tokens for u in usages), grew
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[0] < cached[1] < cached[2] < cached[3], cached
    assert cached[-1] > usages[-1].prompt_tokens // 2


def test_conversations_spread_over_both_workers(fleet):
    gateway, workers = fleet
    before = [w.prompt_tokens() for w in workers]
    client = _client(gateway)
    topics = ["volcanoes", "glaciers", "comets", "coral reefs", "deserts", "tides"]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda t: _converse(client, "fleet", t, 2), topics))
    grew = [w.prompt_tokens() - b for w, b in zip(workers, before, strict=True)]
    assert all(g > 0 for g in grew), grew
    replicas = httpx.get(f"{gateway.url}/health").json()["remote_models"]["fleet"]["replicas"]
    assert [r["in_flight"] for r in replicas] == [0, 0]          # every stream released its replica


def test_stream_through_the_pool_keeps_usage(fleet):
    gateway, _ = fleet
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    for _ in range(2):
        stream = _client(gateway).chat.completions.create(
            model="fleet", messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0      # the second time: the same worker


def test_litellm_entry_whole_and_streamed(fleet):
    gateway, _ = fleet
    client = _client(gateway)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = client.chat.completions.create(model="remote", messages=messages, max_tokens=12, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="remote", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    # the same prompt again: the worker served it from its cache, and the last chunk says so
    assert usage.prompt_tokens == reply.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 0
    text = client.completions.create(model="remote", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in text.choices[0].text


def test_upstream_errors_keep_their_status(fleet):
    gateway, _ = fleet
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    for model, status in (("unreachable", 502), ("unreachable-workers", 502), ("remote-missing", 404),
                          ("remote-slow", 504)):
        for stream in (False, True):
            answer = httpx.post(f"{gateway.base_url}/chat/completions", json={**body, "model": model, "stream": stream},
                                timeout=30)
            assert answer.status_code == status, (model, stream, answer.text)
            error = answer.json()["error"]
            assert error["message"] and "Traceback" not in error["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        _client(gateway).chat.completions.create(model="unreachable", max_tokens=8,
                                                 messages=[{"role": "user", "content": "Hello"}])
    assert caught.value.status_code == 502


def test_fallback_answers_when_the_model_cannot(fleet):
    gateway, _ = fleet
    client = _client(gateway)
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(model="with-fallback", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.model == "with-fallback"
    chunks = list(client.chat.completions.create(model="with-fallback", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_responses_and_messages_through_the_pool(fleet):
    gateway, _ = fleet
    reply = _client(gateway).responses.create(model="fleet", input="Say hello.", max_output_tokens=8)
    assert reply.output_text and reply.usage.input_tokens > 0
    answer = httpx.post(f"{gateway.base_url}/messages", timeout=60, json={
        "model": "fleet", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
    assert answer.status_code == 200 and answer.json()["content"][0]["text"]


def test_count_tokens_through_the_pool_litellm_and_fallback(fleet):
    """/v1/messages/count_tokens: a pool asks the worker the request would go to (a one-token
    completion there: its count is the worker's own, which a worker's direct count equals), litellm
    estimates, a fallback answers when its model cannot, and an unreachable pool is a 502."""
    gateway, workers = fleet
    body = {"messages": [{"role": "user", "content": "How many tokens is this question about counting?"}],
            "system": "You are terse."}

    def count(url: str, model: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/messages/count_tokens", json={"model": model, **body}, timeout=120)

    direct = count(workers[0].url, MODEL).json()["input_tokens"]
    before = sum(w.prompt_tokens() for w in workers)
    assert count(gateway.url, "fleet").json() == {"input_tokens": direct}
    assert sum(w.prompt_tokens() for w in workers) - before == direct       # one worker prefilled it once
    assert count(gateway.url, "workers-with-fallback").json() == {"input_tokens": direct}
    estimate = count(gateway.url, "remote").json()["input_tokens"]
    assert isinstance(estimate, int) and estimate > 5
    # litellm counts without the provider: a model it cannot reach is still counted (no fallback)
    assert count(gateway.url, "with-fallback").json() == {"input_tokens": estimate}
    body["messages"][0]["content"] *= 3
    assert count(gateway.url, "remote").json()["input_tokens"] > estimate
    down = count(gateway.url, "unreachable-workers")
    assert down.status_code == 502 and down.json()["type"] == "error"


def test_killed_worker_loses_no_unstarted_request_and_comes_back(fleet):
    gateway, workers = fleet
    client = _client(gateway)
    topics = [f"topic {i}" for i in range(6)]
    with ThreadPoolExecutor(3) as pool:                       # conversations on both workers
        list(pool.map(lambda t: _converse(client, "fleet", t, 1), topics))
    victim = workers[1]
    victim.kill()
    with ThreadPoolExecutor(3) as pool:                       # the same conversations go on at once
        usages = list(pool.map(lambda t: _converse(client, "fleet", t, 2), topics))
    assert all(len(u) == 2 for u in usages)                 # every request answered (the client does not retry)
    replicas = httpx.get(f"{gateway.url}/health").json()["remote_models"]["fleet"]["replicas"]
    assert [r["healthy"] for r in replicas] == [True, False]
    victim.start()
    victim.wait_ready()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replicas = httpx.get(f"{gateway.url}/health").json()["remote_models"]["fleet"]["replicas"]
        if all(r["healthy"] for r in replicas):
            break
        time.sleep(0.2)
    assert all(r["healthy"] for r in replicas), replicas
    before = victim.prompt_tokens()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda t: _converse(client, "fleet", t, 1), [f"new topic {i}" for i in range(6)]))
    assert victim.prompt_tokens() > before                   # new conversations reach it again


def _in_flight(gateway) -> list[int]:
    replicas = httpx.get(f"{gateway.url}/health", timeout=10).json()["remote_models"]["fleet"]["replicas"]
    return [r["in_flight"] for r in replicas]


def _wait_in_flight(gateway, total: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while sum(counts := _in_flight(gateway)) != total and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def test_client_gone_before_the_stream_starts_releases_the_replica(fleet):
    gateway, _ = fleet
    assert _wait_in_flight(gateway, 0) == [0, 0]
    # a long prompt: the worker is still prefilling (no byte of the answer sent) when the client leaves
    document = " ".join(f"item {i} of the inventory is a {['red', 'green', 'blue'][i % 3]} box" for i in range(200))
    body = json.dumps({"model": "fleet", "max_tokens": 64, "stream": True, "temperature": 0,
                       "messages": [{"role": "user", "content": f"{document}\nHow many boxes are blue?"}]}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    for _ in range(2):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            assert sum(_wait_in_flight(gateway, 1)) == 1           # a replica took it; on a CPU it is prefilling
        assert _wait_in_flight(gateway, 0) == [0, 0]
        document += " more"                                      # the next one is not a cache hit either
