"""LiteLLM's own proxy as one more side of bench/routing.py: the two workers as two deployments of one
model name under its default routing (simple-shuffle), plus a one-worker name for the hop.

`pip install 'litellm[proxy]'` for our pinned litellm needs a `litellm-proxy` distribution that the
index this project installs from may lack, and the extra's pins would replace this environment's
fastapi and uvicorn. So the proxy runs in its own process with its missing packages in a separate
folder on its PYTHONPATH, assembled once by hand, for example:

    pip install --target FOLDER websockets orjson backoff redis apscheduler PyJWT \\
        python-multipart semver expression fastapi-sso mcp soundfile

(whatever `python -c "import litellm.proxy.proxy_server"` still names as missing). Nothing here
installs anything: bench/routing.py --litellm-proxy-path FOLDER runs the side only if the proxy
imports with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import yaml

from bench.serve_process import free_port, server_process

MASTER_KEY = "sk-bench-routing-litellm-proxy"
FLEET = "fleet"             # both workers, shuffled
ONE_WORKER = "direct-0"     # the first worker only (the hop)


def _env(extra_path: str) -> dict:
    path = os.pathsep.join(filter(None, [extra_path, os.environ.get("PYTHONPATH")]))
    # the packaged price map: no fetch from the network at import
    return {**os.environ, "PYTHONPATH": path, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY}


def import_error(extra_path: str) -> str | None:
    """None when LiteLLM's proxy imports with extra_path on its PYTHONPATH, else the error's last line."""
    result = subprocess.run([sys.executable, "-c", "import litellm.proxy.proxy_server"], env=_env(extra_path),
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def serve(stack: ExitStack, folder: Path, workers: list[str], model: str, extra_path: str) -> str:
    """Base URL of LiteLLM's proxy over `workers` (each an OpenAI-compatible server of `model`),
    stopped with the stack."""
    def deployment(name: str, worker: str) -> dict:
        return {"model_name": name, "litellm_params": {"model": f"openai/{model}", "api_base": f"{worker}/v1",
                                                       "api_key": "unused"}}
    config = {"model_list": [*(deployment(FLEET, w) for w in workers), deployment(ONE_WORKER, workers[0])],
              "router_settings": {"routing_strategy": "simple-shuffle"},
              "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}}
    path = folder / "litellm_proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port)]
    stack.enter_context(server_process(argv, f"http://127.0.0.1:{port}/health/liveliness",
                                       folder / "litellm_proxy.log", 300, _env(extra_path)))
    return f"http://127.0.0.1:{port}"
