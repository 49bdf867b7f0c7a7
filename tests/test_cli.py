"""`python -m gateway serve` as a user runs it: a real process, its start-up line, a streamed chat."""
from __future__ import annotations

from tests.conftest import MODEL
from tests.served import Served


def test_serve_streams_a_chat(tmp_path):
    served = Served(tmp_path, f"models:\n  - name: {MODEL}\n    backend: cpu\n    kv_cache: {{num_pages: 256}}\n")
    try:
        stream = served.client.chat.completions.create(
            model=MODEL, stream=True, temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert "Paris" in text
        startup = served.log()
        assert "%" in startup and "tensor" in startup           # the loading progress bar
        line = next(line for line in startup.splitlines() if f"model {MODEL}:" in line)
        for word in ("backend cpu", "device cpu", "dtype", "KV pages", "context"):
            assert word in line, line
    finally:
        served.stop()
