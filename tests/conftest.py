"""Shared fixtures: the embedded model served by a real uvicorn server on 127.0.0.1, and the
Triton interpreter for one test at a time."""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn


def _split_cpus_between_workers() -> None:
    """Under pytest-xdist (`make test` runs two workers) give each worker its own share of the CPUs
    before torch starts: the engine sizes its thread pool from the CPUs it may run on, and two
    workers whose engines each spin a pool over every CPU slowed the heavy tests 2-2.5x."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[index % count::count])


_split_cpus_between_workers()

from gateway.config import parse_config  # noqa: E402  (after the CPU split: these import torch)
from gateway.router import Router  # noqa: E402
from gateway.server import create_app  # noqa: E402

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


def tiny_llama_folder(path, **sizes) -> str:
    """A Llama checkpoint with random weights (seed 0) of these LlamaConfig sizes, as an HF folder of
    safetensors in `path`: the runner tests' model, small enough for the CPU and the Triton interpreter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**sizes)).save_pretrained(path, safe_serialization=True)
    return str(path)


# The HTTP tests' backend: cpu here and in CI; RADIXGATE_TEST_BACKEND=cuda runs the same tests on a GPU.
TEST_BACKEND = os.environ.get("RADIXGATE_TEST_BACKEND", "cpu")


def model_config(**overrides) -> dict:
    cfg = {"name": MODEL, "backend": TEST_BACKEND, "source": "packaged:smollm2-135m-instruct"}
    cfg.update(overrides)
    return {"models": [cfg]}


@pytest.fixture(scope="session")
def live_server():
    server = start_server(model_config(kv_cache={"page_size": 16, "num_pages": 2048}))
    yield server
    assert server.engine.fatal_error is None, server.engine.fatal_error
    server.stop()


# ---- the Triton interpreter, per test ------------------------------------------------------------

# triton.jit decides between a compiled JITFunction and the interpreter's InterpretedFunction when
# it decorates, i.e. when a module is imported; setting TRITON_INTERPRET at a test module's import
# would put every kernel of the whole session in interpreter mode (wrong on a GPU machine). So the
# modules holding jit functions are reloaded under the variable for one test, and again after it.
# That includes triton's own jit library (tl.sum, tl.max, ... in triton.language.standard): an
# interpreted kernel cannot call a compiled JITFunction ("Cannot call @triton.jit'd outside of the
# scope of a kernel"); reloading the triton.language package rebinds tl.sum etc. to the new ones.
# importlib.reload re-runs a module in its own dict: launchers imported elsewhere look their kernels
# up in that dict and see the new ones; jit helpers imported across modules (extend's mma from
# decode) are refreshed by reloading the importers after what they import.
TRITON_JIT_MODULES = ("triton.language.standard", "triton.language.random", "triton.language",
                      "kernels.triton.decode", "kernels.triton.extend", "kernels.triton.summaries",
                      "kernels.triton.top_k", "kernels.triton.selection", "kernels.triton.sparse",
                      "kernels.triton.select_attend", "kernels.triton.centroid_scores",
                      "kernels.triton.shortlist_scores", "kernels.triton.centroids",
                      "kernels.triton.layer_ops",
                      "kernels.triton.gemv", "kernels.triton")


def reload_triton_kernels() -> None:
    for name in TRITON_JIT_MODULES:
        importlib.reload(importlib.import_module(name))


@contextlib.contextmanager
def triton_interpreter_mode() -> Iterator[None]:
    """TRITON_INTERPRET=1 and interpreted kernels inside; the environment and the kernels as they
    were before (compiled jit functions, unless the variable was already set) after."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "1")
            reload_triton_kernels()
            yield
    finally:
        reload_triton_kernels()          # after the context restored (or removed) the variable


@pytest.fixture
def triton_interpreter():
    """Run this test's Triton kernels under the CPU interpreter (kernel modules reloaded around it)."""
    with triton_interpreter_mode():
        yield
