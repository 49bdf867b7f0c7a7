"""Start `radixgate serve` as a real process on loopback for a benchmark, and stop it afterwards."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; a process that exits or a timeout raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not start in time: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def server_process(argv: list[str], health_url: str, log_path: Path, timeout_s: float = 300,
                   env: dict | None = None):
    """Run a server command (from the repository root, its output into log_path), wait until
    health_url answers 200, and stop the process afterwards (terminate, then kill)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_ready(process, health_url, log_path, timeout_s)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def radixgate_server(model: dict, timeout_s: float = 300):
    """Yield the base URL (…/v1) of a server running one model config (a dict of models[0])."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": port}, "models": [model]}))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with server_process(argv, f"http://127.0.0.1:{port}/health", Path(folder) / "server.log", timeout_s, env):
            yield f"http://127.0.0.1:{port}/v1"
