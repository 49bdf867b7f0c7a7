"""Which runner serves a device. Imports are lazy: torch (or mlx) loads only in the engine process."""
from __future__ import annotations

from backends.base import Backend, RunnerSettings


def create_backend(settings: RunnerSettings) -> Backend:
    if settings.device in ("cpu", "cuda"):
        from backends.cuda.runner import TorchRunner
        return TorchRunner(settings)
    raise ValueError(f"no runner for device {settings.device!r}")
