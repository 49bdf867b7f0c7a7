"""config.yaml as validated data: the one place where defaults live and are documented."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL_SOURCE = "packaged:smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="empty: no auth")


class KVCacheConfig(Strict):
    page_size: int = Field(16, ge=1, le=256, description="tokens per KV page")
    num_pages: int | None = Field(None, ge=4, description="fixed page count; null: sized from memory")
    device_memory_fraction: float = Field(0.85, gt=0, le=1, description="GPU: share of free memory for KV")
    cpu_cache_gb: float = Field(1.0, gt=0, description="CPU backend: memory for KV pages")
    host_cache_gb: float = Field(2.0, ge=0, description="L2 tier (later)")
    disk_cache_dir: str | None = None

    @model_validator(mode="after")
    def _page_size_power_of_two(self) -> KVCacheConfig:
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        return self


class SparseAttentionConfig(Strict):
    """Quest-style decode: tokens round to pages as kernels/reference.py says."""

    enabled: bool = False
    token_budget: int = Field(2048, ge=1, description="KV tokens read per decode step and layer")
    dense_layers: int = Field(2, ge=0, description="the first layers always attend densely")
    sink_tokens: int = Field(16, ge=0, description="always kept from the start of the sequence")
    recent_tokens: int = Field(64, ge=1, description="always kept from the end of the sequence")
    summary_tokens: int = Field(4, ge=1, description="tokens per key min/max summary (several per page: "
                                "tighter page scores); must divide kv_cache.page_size")
    shortlist_tokens: int = Field(8192, ge=0, description="past this many tokens (and twice the budget), pages are "
                                  "scored coarse to fine: one summary per page shortlists that many tokens' worth of "
                                  "pages, only those are scored by their block summaries (less to read per step); "
                                  "0: every page by its blocks")


class SchedulerConfig(Strict):
    max_running_requests: int = Field(64, ge=1)
    max_waiting_requests: int = Field(256, ge=0, description="beyond it new requests get 429")
    prefill_chunk_tokens: int = Field(512, ge=16, description="prompt tokens per step (chunked prefill)")
    radix_cache: bool = Field(True, description="false turns prefix reuse off (for comparison)")
    policy: Literal["fcfs", "fair"] = Field(
        "fcfs", description="fcfs: arrival order; fair: short prompts are not queued behind long ones, "
        "priority and cached prefixes order the queue within an age bound (gateway/engine/admission.py); "
        "opt-in until it meets its bounds at full load (docs/benchmarks.md)")
    long_prefill_tokens: int | None = Field(
        None, ge=1, description="fair: a prompt with more uncached tokens left is long; long prompts take at "
        "most this many tokens of a step that also prefills a short one; null: half of prefill_chunk_tokens")
    max_wait_steps: int = Field(64, ge=0, description="fair: the age bound; a request queued this many steps "
                                "goes ahead of every later arrival")

    @model_validator(mode="after")
    def _short_prompts_keep_a_share(self) -> SchedulerConfig:
        if self.long_prefill_tokens is not None and self.long_prefill_tokens >= self.prefill_chunk_tokens:
            raise ValueError(f"long_prefill_tokens {self.long_prefill_tokens} must be below prefill_chunk_tokens "
                             f"{self.prefill_chunk_tokens} (short prompts get the rest of each step)")
        return self


class ModelConfig(Strict):
    name: str = Field(min_length=1)
    backend: Literal["auto", "cuda", "mlx", "cpu", "litellm"] = "auto"
    source: str = DEFAULT_MODEL_SOURCE
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "int4"] = "auto"
    context_length: int | None = Field(None, ge=16, description="null: the model's own")
    threads: int | None = Field(None, ge=1, description="CPU threads; null: all cores")
    attention_backend: Literal["auto", "torch", "cpu_fused", "triton"] = Field(
        "auto", description="auto: triton on CUDA, the fused C++ ops on CPU; torch: the plain reference")
    cuda_graphs: bool = Field(True, description="capture decode steps in CUDA graphs (CUDA only)")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    sparse_attention: SparseAttentionConfig = Field(default_factory=SparseAttentionConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    litellm_params: dict | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backend == "litellm" and not self.litellm_params:
            raise ValueError("backend litellm needs litellm_params (e.g. {model: openai/gpt-4o-mini})")
        sparse, page = self.sparse_attention, self.kv_cache.page_size
        if sparse.enabled:
            if page % sparse.summary_tokens:
                raise ValueError(f"sparse_attention.summary_tokens {sparse.summary_tokens} must divide "
                                 f"kv_cache.page_size {page}")
            budget_pages = sparse.token_budget // page
            fixed = -(-sparse.sink_tokens // page) + max(1, -(-sparse.recent_tokens // page))
            if budget_pages <= fixed:
                raise ValueError(
                    f"sparse_attention.token_budget {sparse.token_budget} is {budget_pages} pages of "
                    f"{page}; it must exceed the sink + recent pages ({fixed})")
        return self


class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig(name="smollm2-135m-instruct")])

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not self.models:
            raise ValueError("models must list at least one model")
        return self


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key and the problem."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: object, origin: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin} is invalid:\n{_describe(error)}") from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_config(data, str(path))
