"""A local model: its engine (in its own process), tokenizer and backend info, loaded from config.

LocalModel is what the local model service (gateway/services/local.py), the generation helpers and
the health and cache endpoints hold; runner_settings() is the config -> RunnerSettings mapping the
engine process builds its backend from.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from backends.base import BackendInfo, RunnerSettings, SparseSettings
from backends.factory import choose_device, create_backend
from backends.head_budgets import read_weights
from backends.source import resolve_source
from gateway.config import ModelConfig
from gateway.engine.engine import Engine, EngineSettings, EngineSpec
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
        host_cache_bytes=int(cfg.kv_cache.host_cache_gb * (1 << 30)) if cfg.scheduler.radix_cache else 0,
        device_memory_fraction=cfg.kv_cache.device_memory_fraction,
        max_sequences=cfg.scheduler.max_running_requests, attention=cfg.attention_backend,
        cuda_graphs=cfg.cuda_graphs, validate_batches=validate_batches, context_length=cfg.context_length,
        deterministic=cfg.deterministic,
        threads=cfg.threads, tensor_parallel_size=cfg.tensor_parallel_size, sparse=SparseSettings(
            enabled=sparse.enabled, token_budget=sparse.token_budget, dense_layers=sparse.dense_layers,
            sink_tokens=sparse.sink_tokens, recent_tokens=sparse.recent_tokens,
            summary_tokens=sparse.summary_tokens, shortlist_tokens=sparse.shortlist_tokens,
            selector=sparse.selector, centroids=sparse.centroids, group_tokens=sparse.group_tokens,
            run_tokens=sparse.run_tokens,
            head_budget_weights=read_weights(sparse.head_budgets) if sparse.head_budgets is not None else ()))


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
            max_wait_steps=sched.max_wait_steps, check_invariants=check_invariants,
            write_policy=cfg.kv_cache.write_policy, disk_cache_dir=cfg.kv_cache.disk_cache_dir,
            disk_cache_bytes=int(cfg.kv_cache.disk_cache_gb * (1 << 30))),
        log_level=logging.getLogger("radixgate").getEffectiveLevel()))
    engine.start()
    info = engine.info
    log.info("model %s: backend %s, device %s, dtype %s, %d KV pages of %d tokens, context %d",
             info.model_name, info.backend, info.device, info.dtype, info.num_pages, info.page_size,
             engine.context_length)
    return LocalModel(cfg.name, engine, tokenizer, info)
