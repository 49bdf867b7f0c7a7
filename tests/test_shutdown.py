"""Graceful shutdown of a real `radixgate serve` process (gateway/shutdown.py): SIGTERM drains, every
KV page is free at exit, and the engine process never outlives the gateway, SIGKILL included."""
from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conftest import MODEL
from tests.served import Served

NUM_PAGES = 256
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
# One line per model at exit (gateway/shutdown.py): pages held by requests or locked, of the total.
PAGES_LINE = re.compile(rf"shutdown: model {MODEL}: (\d+) of (\d+) KV pages in use \((\d+) free, (\d+) cached\)")


def start_served(tmp_path: Path, grace_s: float) -> Served:
    script = Path(sys.executable).with_name("radixgate")          # the console script, as installed
    return Served(tmp_path, f"server: {{shutdown_grace_s: {grace_s}}}\nmodels:\n  - name: {MODEL}\n"
                  f"    backend: cpu\n    kv_cache: {{num_pages: {NUM_PAGES}}}\n",
                  [str(script)] if script.exists() else None)


def wait_draining(served: Served) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = served.health()
        if response.json()["status"] == "draining":
            assert response.status_code == 503
            return response.json()
        time.sleep(0.05)
    raise AssertionError("the server never reported draining")


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(grace_s: float) -> Served:
        started.append(start_served(tmp_path, grace_s))
        return started[-1]
    yield start
    for served in started:
        served.stop(graceful=False)


def long_stream(served: Served, max_tokens: int):
    stream = served.client.chat.completions.create(
        model=MODEL, messages=PROMPT, stream=True, temperature=0, max_tokens=max_tokens,
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant"
    return chunks


def pages_at_exit(log: str) -> tuple[int, int, int, int]:
    match = PAGES_LINE.search(log)
    assert match, log[-3000:]
    in_use, total, free, cached = map(int, match.groups())
    return in_use, total, free, cached


def test_sigterm_lets_the_running_stream_finish_and_refuses_new_requests(serve):
    served = serve(grace_s=300)
    chunks = long_stream(served, max_tokens=400)
    served.process.send_signal(signal.SIGTERM)

    health = wait_draining(served)
    snap = health["models"][MODEL]
    cache = snap["radix_cache_stats"]
    assert snap["kv_pages_free"] + cache["evictable_pages"] + cache["protected_pages"] \
        + snap["kv_pages_held_by_requests"] == snap["kv_pages_total"] == NUM_PAGES
    assert snap["kv_pages_held_by_requests"] > 0            # the stream is still running

    with pytest.raises(openai.APIStatusError) as refused:
        served.client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4)
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["retry-after"]) == 300
    assert refused.value.response.json()["error"]["code"] == "shutting_down"
    messages = anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as refused_there:
        messages.messages.create(model=MODEL, max_tokens=4, messages=PROMPT)
    assert refused_there.value.status_code == 503
    assert refused_there.value.response.json()["error"]["type"] == "overloaded_error"

    rest = list(chunks)                                     # the running request finishes in full
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].delta.content or "") for c in rest) > 0
    assert served.exit_code() == 0, served.log()[-3000:]
    in_use, total, free, cached = pages_at_exit(served.log())
    assert (in_use, total) == (0, NUM_PAGES) and free + cached == NUM_PAGES
    assert cached > 0                     # the finished stream's pages stayed in the radix cache, unlocked


def test_past_the_grace_period_the_stream_ends_with_an_error_event(serve):
    served = serve(grace_s=1)
    chunks = long_stream(served, max_tokens=3000)
    served.process.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as ended:
        for _ in chunks:
            pass
    assert "shutdown grace period" in str(ended.value)
    assert served.exit_code() == 0, served.log()[-3000:]
    in_use, total, free, cached = pages_at_exit(served.log())
    assert (in_use, total) == (0, NUM_PAGES) and free + cached == NUM_PAGES
    assert "1 request(s) ended with an error" in served.log()


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child that nobody reaped yet is dead all the same)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the engine process")
def test_the_engine_process_dies_with_a_killed_gateway(serve):
    served = serve(grace_s=20)
    engines = [pid for pid in _children(served.process.pid)
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(engines) == 1, engines
    chunks = long_stream(served, max_tokens=400)           # the engine is busy in a step loop
    served.process.kill()
    assert served.process.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _running(engines[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(engines[0]), f"engine {engines[0]} outlived the gateway"
    with pytest.raises(openai.APIConnectionError):
        list(chunks)
