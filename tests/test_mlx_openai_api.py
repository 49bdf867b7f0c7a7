"""The OpenAI API test modules (openai SDK and litellm) once more, against a live server whose model
runs on `backend: mlx` (mlx-cpu on Linux): the gateway, scheduler and radix cache unchanged."""
from __future__ import annotations

import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")

from tests.conftest import MODEL, model_config, start_server  # noqa: E402
from tests.test_litellm import *  # noqa: E402,F403  (the same tests, collected here with this module's server)
from tests.test_openai_api import *  # noqa: E402,F403


@pytest.fixture(scope="module")
def live_server():
    """The conftest server, on the MLX backend (overrides the session fixture for this module)."""
    server = start_server(model_config(backend="mlx", kv_cache={"page_size": 16, "num_pages": 512}))
    assert server.router.models[MODEL].info.backend == "mlx"
    yield server
    assert server.engine.fatal_error is None, server.engine.fatal_error
    server.stop()
