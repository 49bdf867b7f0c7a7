"""`radixgate serve` in its own process, as a user or an operator starts it: a config file, a free
port, the output in a log file; ready once /health answers 200."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


class Served:
    def __init__(self, tmp_path: Path, config_text: str, command: list[str] | None = None):
        """command: how the server is started (default: `python -m gateway`); `serve --config ...
        --port ...` is appended."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / "config.yaml"
        config.write_text(config_text)
        self.log_path = tmp_path / "serve.log"
        argv = (command or [sys.executable, "-m", "gateway"]) + ["serve", "--config", str(config),
                                                                  "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.log()[-3000:]
            try:
                if self.health().status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def exit_code(self) -> int:
        return self.process.wait(timeout=120)

    def stop(self, graceful: bool = True) -> None:
        """End a server still running: SIGTERM (SIGKILL if it is not gone in 30 s), or SIGKILL at once."""
        if self.process.poll() is not None:
            return
        if graceful:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait(timeout=30)
