"""config.yaml as validated data: the one place where defaults live and are documented."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends.base import sparse_unit_counts
from backends.head_budgets import read_weights

DEFAULT_MODEL_SOURCE = "packaged:smollm2-135m-instruct"
ENV_PREFIX = "os.environ/"
MiB = 1 << 20


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def resolve_secret(value: str) -> str:
    """A secret as config files write it: the value, or os.environ/NAME read from the environment now.
    An unset or empty variable is an error: a missing key must not leave a server open."""
    if not value.startswith(ENV_PREFIX):
        if not value:
            raise ValueError("a key must not be empty")
        return value
    name = value[len(ENV_PREFIX):]
    if not os.environ.get(name):
        raise ValueError(f"names the environment variable {name}, which is not set")
    return os.environ[name]


class KeyLimits(Strict):
    """Per API key, in this process; over a limit a request gets 429 with Retry-After (gateway/rate_limits.py)."""

    requests_per_minute: int | None = Field(None, ge=1, description="generation requests; null: no limit")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens, charged from usage "
                                          "as each request ends; a key may start requests while it has tokens left")
    concurrent_streams: int | None = Field(None, ge=1, description="generation requests in flight at once, streamed "
                                           "or not; null: no limit")


class APIKeyConfig(KeyLimits):
    """An API key with a name (for messages and logs, which never show the key) and its own limits."""

    key: str = Field(min_length=1, repr=False, description="the key, or os.environ/NAME")
    name: str | None = Field(None, min_length=1, description="null: key-N, N its position in api_keys")

    @field_validator("key", mode="before")
    @classmethod
    def _read_key(cls, value):
        return resolve_secret(value) if isinstance(value, str) else value


class RequestLimits(Strict):
    """What one request may ask for; each limit is checked before the body is parsed or anything is
    tokenised, and answered with a 4xx naming it (docs/security.md says why each default is what it is)."""

    max_body_bytes: int = Field(16 * MiB, ge=1024, description="request body; 413 beyond it")
    max_json_depth: int = Field(64, ge=4, description="nesting of arrays and objects in the body")
    max_json_values: int = Field(65_536, ge=1024, description="array elements and object members in the body, "
                                 "counted before it is parsed: parsing and validating this many costs the event loop "
                                 "~20-50 ms (a token-id prompt has one per token)")
    max_messages: int = Field(2048, ge=1, description="chat or Anthropic messages, Responses input items, "
                              "completions prompts")
    max_prompt_chars: int = Field(4 * MiB, ge=1, description="characters of every string in what the model would "
                                  "read (messages with their roles and tool calls, system, instructions, prompt, "
                                  "tools), counted before tokenising")
    max_tokens: int = Field(1 * MiB, ge=1, description="max_tokens, max_completion_tokens, max_output_tokens")
    max_n: int = Field(16, ge=1, description="choices per prompt (n)")
    max_stop_sequences: int = Field(16, ge=1, description="stop / stop_sequences entries")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop sequence")
    max_logit_bias_entries: int = Field(1024, ge=1, description="logit_bias entries")
    stream_idle_timeout_s: float = Field(600.0, gt=0, description="a request whose model produces nothing for this "
                                         "long (waiting in the queue included) ends with an error event")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_grace_s: float = Field(20.0, ge=0, description="on SIGTERM: how long running requests may take to "
                                    "finish (new ones get 503) before they end with an error; below a service "
                                    "manager's kill timeout (Kubernetes: 30 s)")
    api_keys: list[str | APIKeyConfig] = Field(
        default_factory=list, description="keys for the API routes, each a value or os.environ/NAME, plain or with "
        "its own limits; empty (and no admin_keys): no auth (docs/security.md)")
    admin_keys: list[str] = Field(default_factory=list, description="operators' keys: every route, no per-key "
                                  "limits, and the only keys that may clear the radix cache; empty: any API key may")
    key_limits: KeyLimits = Field(default_factory=KeyLimits, description="per-key limits of every API key that "
                                  "does not set its own")
    limits: RequestLimits = Field(default_factory=RequestLimits)

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _read_keys(cls, value):
        keys = []
        for i, key in enumerate(value if isinstance(value, list) else []):
            try:
                keys.append(resolve_secret(key) if isinstance(key, str) else key)
            except ValueError as error:
                raise ValueError(f"entry {i}: {error}") from None
        return keys if isinstance(value, list) else value

    @model_validator(mode="after")
    def _keys_distinct(self) -> ServerConfig:
        # the message names positions only: a key's value never reaches a log
        seen: dict[str, str] = {}
        api = [(f"api_keys.{i}", k if isinstance(k, str) else k.key) for i, k in enumerate(self.api_keys)]
        admin = [(f"admin_keys.{i}", k) for i, k in enumerate(self.admin_keys)]
        for where, key in api + admin:
            if key in seen:
                raise ValueError(f"{where} repeats the key of {seen[key]} (each key is one caller)")
            seen[key] = where
        names = [k.name for k in self.api_keys if not isinstance(k, str) and k.name]
        if len(set(names)) != len(names):
            raise ValueError(f"api_keys: names must be unique, got {names}")
        return self


class KVCacheConfig(Strict):
    page_size: int = Field(16, ge=1, le=256, description="tokens per KV page")
    num_pages: int | None = Field(None, ge=4, description="fixed page count; null: sized from memory")
    device_memory_fraction: float = Field(0.85, gt=0, le=1, description="GPU: share of free memory for KV")
    cpu_cache_gb: float = Field(1.0, gt=0, description="CPU backend: memory for KV pages")
    host_cache_gb: float = Field(2.0, ge=0, description="L2: host memory (pinned on CUDA) that evicted KV pages "
                                 "move to instead of being dropped; 0: no tiers (docs/cache.md)")
    disk_cache_dir: str | None = Field(None, description="L3: KV page files here, kept across restarts (keyed by "
                                       "model and layout); needs host_cache_gb > 0; null: off")
    disk_cache_gb: float = Field(10.0, gt=0, description="L3: bound on the files' size (least recently used go)")
    write_policy: Literal["write_through", "write_back"] = Field(
        "write_through", description="write_through: pages copy to L2 (and L3) as they enter the cache, so "
        "eviction only frees and the cache survives a restart; write_back: pages copy down only when evicted")
    prefetch_policy: Literal["wait_complete"] = Field(
        "wait_complete", description="a prompt whose cached prefix lies on L2/L3 loads it into L1 at admission "
        "and runs once its own pages have landed (others keep running meanwhile)")

    @model_validator(mode="after")
    def _page_size_power_of_two(self) -> KVCacheConfig:
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.disk_cache_dir is not None and self.host_cache_gb == 0:
            raise ValueError("disk_cache_dir needs host_cache_gb > 0 (pages reach disk through host memory)")
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
    shortlist_tokens: int = Field(8192, ge=0, description="past this many tokens (and, for quest, twice the budget) "
                                  "decode is scored coarse to fine: quest: one summary per page shortlists that many "
                                  "tokens' worth of pages, only those are scored by their block summaries; centroids: "
                                  "runs of run_tokens, scored by their own centroids, shortlist that many tokens, and "
                                  "the groups are chosen among theirs (less to read per step); 0: one stage")
    selector: Literal["quest", "centroids"] = Field(
        "quest", description="quest: pages scored by key min/max bounds (summary_tokens, shortlist_tokens); "
        "centroids: each group_tokens run of keys keeps `centroids` 8-bit k-means centroids that estimate its "
        "attention mass, and whole groups are selected (fewer bytes read per step; every backend)")
    centroids: int = Field(8, ge=1, le=64, description="centroids: k-means centroids per group and KV head "
                           "(a power of two)")
    group_tokens: int = Field(64, ge=1, description="centroids: tokens per group (a multiple of kv_cache.page_size)")
    run_tokens: int = Field(256, ge=1, description="centroids with shortlist_tokens > 0: tokens per run of the coarse "
                            "stage, which keeps its own centroids and shortlists that many tokens' worth of runs "
                            "before groups are chosen among them (a multiple of group_tokens, a power-of-two number "
                            "of pages)")
    head_budgets: str | None = Field(
        None, description="centroids: a budget per (layer, KV head) from a calibrated table, token_budget then "
        "being the mean per head: the name of a shipped table (backends/head_budget_tables: "
        "smollm2-135m-instruct, each layer's heads at its neediest head's share; smollm2-135m-instruct-per-head) "
        "or a JSON file from bench/sparse_layer_budgets.py calibrate --per-head; null: every head keeps "
        "token_budget")


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


class RoutingConfig(Strict):
    """How a replicated model (workers, or litellm deployments sharing a name) picks a replica."""

    policy: Literal["cache_aware", "round_robin", "random", "least_loaded"] = Field(
        "cache_aware", description="cache_aware: the replica whose approximate prefix tree matches the request "
        "longest, unless the load is imbalanced (SGLang's router policy, docs/routing.md); random is LiteLLM's "
        "default simple-shuffle")
    cache_threshold: float = Field(0.5, ge=0, le=1, description="a match below this share of the prompt counts as "
                                   "none: the replica with the smallest prefix tree takes the request")
    balance_abs_threshold: int = Field(32, ge=0, description="imbalanced when the busiest replica has this many more "
                                       "requests in flight than the idlest ...")
    balance_rel_threshold: float = Field(1.5, ge=1, description="... and more than this multiple of its load")
    max_tree_chars: int = Field(1 << 22, ge=1024, description="per replica: characters of prefixes remembered (LRU)")
    health_interval_s: float = Field(2.0, gt=0, description="workers: GET …/v1/models this often")
    health_timeout_s: float = Field(1.0, gt=0)
    allowed_fails: int = Field(3, ge=0, description="failures within a minute before a replica cools down")
    cooldown_time_s: float = Field(5.0, ge=0, description="how long a failing replica is left out")


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
    deterministic: bool = Field(
        False, description="batch-invariant kernels: a request's output does not depend on its batch, "
        "its prefill chunks or the radix cache (CUDA: slower, docs/cuda.md; CPU: the default already)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="split the model over this many GPUs of the host (one process each, NCCL); "
        "the heads, KV heads, MLP columns and vocabulary divide by it (docs/cuda.md)")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    sparse_attention: SparseAttentionConfig = Field(default_factory=SparseAttentionConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    litellm_params: dict | list[dict] | None = Field(None, description="backend litellm: LiteLLM's litellm_params "
                                                    "as its proxy config writes them; a list: replicas of one model")
    workers: list[str] = Field(default_factory=list, description="OpenAI-compatible base URLs (…/v1) that serve "
                               "this model (radixgate, vLLM, SGLang, llama.cpp): one model, routed cache-aware")
    upstream_model: str | None = Field(None, description="workers: the model name the workers serve; null: name")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    fallbacks: list[str] = Field(default_factory=list, description="models tried in order when this one answers "
                                 "429 or 5xx or cannot be reached (while streaming: only before the first token)")
    num_retries: int = Field(2, ge=0, description="remote models: retries (with backoff) of a request that failed "
                             "before producing anything")
    timeout_s: float = Field(600.0, gt=0, description="remote models: per request, unless litellm_params.timeout")
    model_info: dict = Field(default_factory=dict, description="free-form metadata shown in /v1/models")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backend == "litellm" and not self.litellm_params:
            raise ValueError("backend litellm needs litellm_params (e.g. {model: openai/gpt-4o-mini})")
        if self.litellm_params and self.backend != "litellm":
            raise ValueError("litellm_params needs backend: litellm")
        if self.workers and self.backend != "auto":
            raise ValueError(f"workers serve the model: backend {self.backend!r} does not apply (leave it out)")
        for params in self.litellm_params if isinstance(self.litellm_params, list) else [self.litellm_params or {}]:
            if self.litellm_params is not None and not isinstance(params.get("model"), str):
                raise ValueError("litellm_params needs model (e.g. openai/gpt-4o-mini)")
        for url in self.workers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"workers: {url!r} is not an http(s) URL")
        sparse, page = self.sparse_attention, self.kv_cache.page_size
        if sparse.enabled:
            if page % sparse.summary_tokens:
                raise ValueError(f"sparse_attention.summary_tokens {sparse.summary_tokens} must divide "
                                 f"kv_cache.page_size {page}")
            unit, name = page, "pages"
            if sparse.selector == "centroids":
                if sparse.group_tokens % page:
                    raise ValueError(f"sparse_attention.group_tokens {sparse.group_tokens} must be a multiple of "
                                     f"kv_cache.page_size {page}")
                if sparse.centroids & (sparse.centroids - 1):
                    raise ValueError(f"sparse_attention.centroids {sparse.centroids} must be a power of two")
                unit, name = sparse.group_tokens, "groups"
                run_pages = sparse.run_tokens // page
                if sparse.shortlist_tokens and (sparse.run_tokens % sparse.group_tokens or run_pages & (run_pages - 1)):
                    raise ValueError(f"sparse_attention.run_tokens {sparse.run_tokens} must be a multiple of "
                                     f"group_tokens {sparse.group_tokens} and a power-of-two number of "
                                     f"kv_cache.page_size {page} pages")
            if sparse.head_budgets is not None:
                if sparse.selector != "centroids":
                    raise ValueError("sparse_attention.head_budgets needs selector: centroids")
                read_weights(sparse.head_budgets)       # the file's shape; the model's fit is checked at load
            budget, sink, recent = sparse_unit_counts(unit, sparse.token_budget, sparse.sink_tokens,
                                                      sparse.recent_tokens)
            fixed = sink + recent
            if budget <= fixed:
                raise ValueError(
                    f"sparse_attention.token_budget {sparse.token_budget} is {budget} {name} of "
                    f"{unit} tokens; it must exceed the sink + recent {name} ({fixed})")
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
        for model in self.models:
            unknown = [name for name in model.fallbacks if name not in names or name == model.name]
            if unknown:
                raise ValueError(f"model {model.name}: fallbacks {unknown} are not other models of this config")
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
