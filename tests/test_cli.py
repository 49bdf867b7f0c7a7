"""`python -m gateway serve` as a user runs it: a real process, its start-up line, a streamed chat."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import MODEL, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_serve_streams_a_chat(tmp_path):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  - name: {MODEL}\n    backend: cpu\n    kv_cache: {{num_pages: 256}}\n")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                                    "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL, stream=True, temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert "Paris" in text
        startup = log_path.read_text()
        assert "%" in startup and "tensor" in startup           # the loading progress bar
        line = next(line for line in startup.splitlines() if f"model {MODEL}:" in line)
        for word in ("backend cpu", "device cpu", "dtype", "KV pages", "context"):
            assert word in line, line
    finally:
        process.terminate()
        process.wait(timeout=30)
