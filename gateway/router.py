"""Model name → the service that serves it; local models are loaded (gateway/local_model.py) and
run in an Engine."""
from __future__ import annotations

import os

from gateway.config import Config
from gateway.errors import model_not_found
from gateway.local_model import LocalModel, load_local_model
from gateway.services.build import build_services, is_local


class Router:
    """Model name -> the service that answers for it; unknown names are a 404, never a silent default.

    `models` holds the local engines (health, metrics and cache endpoints read them); `services` every
    model, local or not, behind the model seam (gateway/services/base.py).
    """

    def __init__(self, models: dict[str, LocalModel], services: dict, own: dict | None = None,
                 model_info: dict[str, dict] | None = None):
        self.models = models
        self.services = services
        self.own = own if own is not None else services       # each model's service once (start, stop)
        self.model_info = model_info or {}                     # LiteLLM's model_info, shown in /v1/models

    @classmethod
    def from_config(cls, config: Config, check_invariants: bool = False) -> Router:
        """Load every local model of the config; check_invariants walks the radix tree each step."""
        check = check_invariants or os.environ.get("RADIXGATE_CHECK_INVARIANTS") == "1"
        local = {cfg.name: load_local_model(cfg, check_invariants=check) for cfg in config.models if is_local(cfg)}
        services, own = build_services(config, local)
        return cls(local, services, own, {cfg.name: cfg.model_info for cfg in config.models})

    def service(self, name: str):
        if name in self.services:
            return self.services[name]
        raise model_not_found(name)

    def attach(self, loop) -> None:
        """Read every engine's messages on the server's event loop; start the pools' health checks."""
        for service in self.own.values():
            service.attach(loop)

    def stop(self) -> None:
        for service in self.own.values():
            service.stop()
