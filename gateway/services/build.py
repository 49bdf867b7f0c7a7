"""The config's models -> their services: local engines, worker pools, litellm deployments (a pool
of them when several share a name), each wrapped with its fallbacks. Chosen once, at start-up."""
from __future__ import annotations

from gateway.config import Config, ConfigError, ModelConfig
from gateway.services.fallback import FallbackService
from gateway.services.local import LocalService
from gateway.services.pool import PoolService, replica
from gateway.services.worker import WorkerClient


def _pool(cfg: ModelConfig) -> PoolService:
    if cfg.workers:
        members = [replica(url, WorkerClient(url, cfg.upstream_model or cfg.name, cfg.timeout_s,
                                             cfg.routing.health_timeout_s), cfg.routing) for url in cfg.workers]
    else:
        try:
            from gateway.services.litellm_provider import LiteLLMDeployment  # imports litellm: only when used
        except ImportError as error:
            raise ConfigError(f"model {cfg.name}: backend litellm needs the litellm package "
                              f"(pip install 'radixgate[litellm]'): {error}") from None

        params = cfg.litellm_params if isinstance(cfg.litellm_params, list) else [cfg.litellm_params]
        deployments = [LiteLLMDeployment(cfg.name, dict(p), cfg.timeout_s) for p in params]
        members = [replica(f"{i}: {d.label}", d, cfg.routing) for i, d in enumerate(deployments)]
    return PoolService(cfg.name, members, cfg.routing, cfg.num_retries)


def build_services(config: Config, local: dict) -> tuple[dict, dict]:
    """(the service each name answers with, each model's own service). `local`: the loaded engines."""
    own = {cfg.name: LocalService(local[cfg.name]) if cfg.name in local else _pool(cfg) for cfg in config.models}
    answering = dict(own)
    for cfg in config.models:
        if cfg.fallbacks:
            answering[cfg.name] = FallbackService(cfg.name, own[cfg.name], [(n, own[n]) for n in cfg.fallbacks])
    return answering, own


def is_local(cfg: ModelConfig) -> bool:
    """Served by an engine in this process tree (not by workers or a provider)."""
    return cfg.backend != "litellm" and not cfg.workers
