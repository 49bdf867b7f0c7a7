"""Shared fixtures: the embedded model served by a real uvicorn server on 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from gateway.config import parse_config
from gateway.router import Router
from gateway.server import create_app

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str            # base URL, e.g. http://127.0.0.1:PORT
    router: Router
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def engine(self):
        return self.router.models[MODEL].engine

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until the engine has no running or waiting work (cancellations are asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.engine.call_sync("idle"):
                return
            time.sleep(0.02)
        raise AssertionError("engine did not become idle")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_server(config_data: dict) -> LiveServer:
    """Start a real HTTP server for `config_data` in a thread; return once it answers /health."""
    port = free_port()
    config = parse_config(config_data)
    router = Router.from_config(config, check_invariants=True)
    app = create_app(config, router)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return LiveServer(url, router, server, thread)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def model_config(**overrides) -> dict:
    cfg = {"name": MODEL, "backend": "cpu", "source": "packaged:smollm2-135m-instruct"}
    cfg.update(overrides)
    return {"models": [cfg]}


@pytest.fixture(scope="session")
def live_server():
    server = start_server(model_config(kv_cache={"page_size": 16, "num_pages": 2048}))
    yield server
    assert server.engine.fatal_error is None, server.engine.fatal_error
    server.stop()
