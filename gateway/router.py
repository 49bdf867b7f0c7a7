"""Model name → what serves it. Local models run in an Engine; remote ones (litellm) come later."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

from backends.base import BackendInfo, RunnerSettings, SparseSettings
from backends.factory import choose_device, create_backend
from backends.source import resolve_source
from gateway.config import Config, ModelConfig
from gateway.engine.engine import Engine, EngineSettings, EngineSpec
from gateway.errors import APIError, model_not_found
from gateway.templating import ChatTokenizer, load_tokenizer

log = logging.getLogger("radixgate.router")


@dataclass
class LocalModel:
    name: str
    engine: Engine
    tokenizer: ChatTokenizer
    info: BackendInfo


def choose_backend(requested: str) -> str:
    """auto → mlx on Apple silicon with mlx installed, cuda when torch sees a GPU, else cpu."""
    return choose_device(requested)


def runner_settings(cfg: ModelConfig, backend: str, validate_batches: bool = False) -> RunnerSettings:
    source = resolve_source(cfg.source)
    sparse = cfg.sparse_attention
    return RunnerSettings(
        source_kind=source.kind, source_path=source.path, model_name=cfg.name, dtype=cfg.dtype,
        device=backend, page_size=cfg.kv_cache.page_size, num_pages=cfg.kv_cache.num_pages,
        kv_memory_bytes=int(cfg.kv_cache.cpu_cache_gb * (1 << 30)),
        device_memory_fraction=cfg.kv_cache.device_memory_fraction,
        max_sequences=cfg.scheduler.max_running_requests, attention=cfg.attention_backend,
        cuda_graphs=cfg.cuda_graphs, validate_batches=validate_batches, context_length=cfg.context_length,
        threads=cfg.threads, sparse=SparseSettings(
            enabled=sparse.enabled, token_budget=sparse.token_budget, dense_layers=sparse.dense_layers,
            sink_tokens=sparse.sink_tokens, recent_tokens=sparse.recent_tokens,
            summary_tokens=sparse.summary_tokens, shortlist_tokens=sparse.shortlist_tokens))


def load_local_model(cfg: ModelConfig, check_invariants: bool = False) -> LocalModel:
    backend = choose_backend(cfg.backend)
    source = resolve_source(cfg.source)
    tokenizer = load_tokenizer(source)
    sched = cfg.scheduler
    # The engine process builds its own backend and tokenizer from these (see engine/worker.py).
    engine = Engine(EngineSpec(
        make_backend=functools.partial(create_backend, runner_settings(cfg, backend, check_invariants)),
        make_tokenizer=functools.partial(load_tokenizer, source),
        settings=EngineSettings(
            max_running_requests=sched.max_running_requests, max_waiting_requests=sched.max_waiting_requests,
            prefill_chunk_tokens=sched.prefill_chunk_tokens, radix_cache=sched.radix_cache,
            policy=sched.policy, long_prefill_tokens=sched.long_prefill_tokens,
            max_wait_steps=sched.max_wait_steps, check_invariants=check_invariants),
        log_level=logging.getLogger("radixgate").getEffectiveLevel()))
    engine.start()
    info = engine.info
    log.info("model %s: backend %s, device %s, dtype %s, %d KV pages of %d tokens, context %d",
             info.model_name, info.backend, info.device, info.dtype, info.num_pages, info.page_size,
             engine.context_length)
    return LocalModel(cfg.name, engine, tokenizer, info)


class Router:
    """Finds the model a request names; unknown names are a 404, never a silent default."""

    def __init__(self, models: dict[str, LocalModel], remote: dict[str, ModelConfig]):
        self.models = models
        self.remote = remote

    @classmethod
    def from_config(cls, config: Config, check_invariants: bool = False) -> Router:
        """Load every local model of the config; check_invariants walks the radix tree each step."""
        check = check_invariants or os.environ.get("RADIXGATE_CHECK_INVARIANTS") == "1"
        local, remote = {}, {}
        for cfg in config.models:
            if cfg.backend == "litellm":
                log.warning("model %s: remote (litellm) models are not served by this version", cfg.name)
                remote[cfg.name] = cfg
            else:
                local[cfg.name] = load_local_model(cfg, check_invariants=check)
        return cls(local, remote)

    def get(self, name: str) -> LocalModel:
        if name in self.models:
            return self.models[name]
        if name in self.remote:
            raise APIError(501, f"The model `{name}` is a remote (litellm) model, which this version of "
                                "radixgate does not serve yet.", type="server_error", param="model")
        raise model_not_found(name)

    def attach(self, loop) -> None:
        """Read every engine's messages on the server's event loop."""
        for model in self.models.values():
            model.engine.attach(loop)

    def stop(self) -> None:
        for model in self.models.values():
            model.engine.stop()
