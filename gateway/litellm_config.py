"""LiteLLM's proxy config file, taken as it is: model_list, router_settings and general_settings
mapped onto our Config. A key we do not act on is named once at start-up, never dropped silently.

Entries sharing a model_name are one replicated model (routed cache-aware unless routing_strategy
says otherwise); `os.environ/NAME` values inside litellm_params are read when the model starts, the
master key's as our own server.api_keys are (gateway/config.py resolve_secret).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from gateway.config import Config, ConfigError, load_config, parse_config

# LiteLLM routing_strategy -> ours; absent means cache_aware (LiteLLM's own default is simple-shuffle)
STRATEGIES = {"simple-shuffle": "random", "least-busy": "least_loaded"}
ROUTER_KEYS = {"routing_strategy", "num_retries", "timeout", "fallbacks", "allowed_fails", "cooldown_time"}
LITELLM_SETTINGS_KEYS = {"num_retries", "request_timeout", "fallbacks"}
GENERAL_KEYS = {"master_key"}


def _fallbacks(value, where: str, notes: list[str]) -> dict[str, list[str]]:
    """[{"model-a": ["model-b", ...]}, ...] -> {"model-a": [...]}."""
    out: dict[str, list[str]] = {}
    for item in value or []:
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: each fallback must be a mapping {{model: [fallback, ...]}}, got {item!r}")
        for name, chain in item.items():
            out[name] = [chain] if isinstance(chain, str) else list(chain)
    return out


def from_litellm(data: dict, origin: str = "config") -> tuple[Config, list[str]]:
    """(our Config, a note per key or value we do not act on)."""
    notes: list[str] = []
    for key in data:
        if key not in ("model_list", "router_settings", "litellm_settings", "general_settings"):
            notes.append(f"{key}: not supported, ignored")
    router = data.get("router_settings") or {}
    settings = data.get("litellm_settings") or {}
    general = data.get("general_settings") or {}
    for section, known, name in ((router, ROUTER_KEYS, "router_settings"),
                                 (settings, LITELLM_SETTINGS_KEYS, "litellm_settings"),
                                 (general, GENERAL_KEYS, "general_settings")):
        notes += [f"{name}.{key}: not supported, ignored" for key in section if key not in known]

    strategy = router.get("routing_strategy")
    policy = STRATEGIES.get(strategy, "cache_aware")
    if strategy is not None and strategy not in STRATEGIES:
        notes.append(f"router_settings.routing_strategy {strategy!r}: not supported, cache_aware routing instead")
    routing = {"policy": policy}
    if "allowed_fails" in router:
        routing["allowed_fails"] = router["allowed_fails"]
    if "cooldown_time" in router:
        routing["cooldown_time_s"] = router["cooldown_time"]
    retries = router.get("num_retries", settings.get("num_retries"))
    timeout = router.get("timeout", settings.get("request_timeout"))
    fallbacks = {**_fallbacks(settings.get("fallbacks"), f"{origin}: litellm_settings.fallbacks", notes),
                 **_fallbacks(router.get("fallbacks"), f"{origin}: router_settings.fallbacks", notes)}

    groups: dict[str, dict] = {}
    for i, entry in enumerate(data.get("model_list") or []):
        if not isinstance(entry, dict) or "model_name" not in entry or "litellm_params" not in entry:
            raise ConfigError(f"{origin}: model_list.{i} needs model_name and litellm_params")
        notes += [f"model_list.{i}.{key}: not supported, ignored" for key in entry
                  if key not in ("model_name", "litellm_params", "model_info")]
        group = groups.setdefault(str(entry["model_name"]), {"params": [], "info": {}})
        group["params"].append(dict(entry["litellm_params"]))
        group["info"].update(entry.get("model_info") or {})

    models = []
    for name, group in groups.items():
        model = {"name": name, "backend": "litellm", "routing": routing, "model_info": group["info"],
                 "litellm_params": group["params"][0] if len(group["params"]) == 1 else group["params"]}
        if retries is not None:
            model["num_retries"] = retries
        if timeout is not None:
            model["timeout_s"] = timeout
        if name in fallbacks:
            model["fallbacks"] = fallbacks[name]
        models.append(model)
    ours: dict = {"models": models}
    if "master_key" in general:
        ours["server"] = {"api_keys": [str(general["master_key"])]}      # an unset os.environ/NAME stops start-up
    return parse_config(ours, origin), notes


def load_any_config(path: str | Path | None) -> tuple[Config, list[str]]:
    """Our config.yaml, or LiteLLM's proxy config (recognised by its model_list)."""
    if path is None:
        return load_config(None), []
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return load_config(path), []          # it raises the ConfigError that says which
    if isinstance(data, dict) and "model_list" in data:
        return from_litellm(data, str(path))
    return parse_config(data, str(path)), []
