"""radixgate starts and serves offline: importing litellm and building litellm models opens no socket
to anything but loopback (litellm fetches a price map when imported unless told otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import socket
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    attempts.append(address)
    raise OSError("network disabled for this test")
socket.socket.connect = connect
socket.create_connection = lambda address, *a, **k: (attempts.append(address), connect(None, address))[1]
from gateway.litellm_config import from_litellm
from gateway.router import Router
config, _ = from_litellm({"model_list": [
    {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "k"}},
    {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-3-5-sonnet-20241022", "api_key": "k"}}]})
router = Router.from_config(config)
assert sorted(router.services) == ["claude", "gpt"], router.services
print("ATTEMPTS", attempts)
"""


def test_litellm_models_build_without_network():
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**env, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ATTEMPTS []" in run.stdout, run.stdout[-2000:]
