"""Which runner serves a device. Imports are lazy: torch (or mlx) loads only in the engine process."""
from __future__ import annotations

import importlib.util
import platform
import sys

from backends.base import Backend, RunnerSettings


def create_backend(settings: RunnerSettings) -> Backend:
    if settings.device in ("cpu", "cuda"):
        from backends.cuda.runner import TorchRunner
        return TorchRunner(settings)
    # -- MLX backend (backends/mlx) --
    if settings.device == "mlx":
        if settings.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs backend cuda (or cpu); mlx runs on one device")
        from backends.mlx.runner import MlxRunner
        return MlxRunner(settings)
    raise ValueError(f"no runner for device {settings.device!r}")


# -- backend: auto --
def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_device(requested: str) -> str:
    """config's backend -> the device of a runner. auto: mlx on Apple silicon when mlx is
    installed, cuda when torch sees a GPU, else cpu."""
    if requested != "auto":
        return requested
    if apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
