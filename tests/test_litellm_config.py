"""LiteLLM's proxy config files, in the shapes its docs show, load as they are."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError
from gateway.litellm_config import from_litellm, load_any_config

ROOT = Path(__file__).resolve().parent.parent

# the proxy quick start: one provider model per name, keys from the environment
QUICK_START = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: azure/my_azure_deployment
      api_base: os.environ/AZURE_API_BASE
      api_key: "os.environ/AZURE_API_KEY"
      api_version: "2025-01-01-preview"
  - model_name: claude-3-5-sonnet
    litellm_params:
      model: anthropic/claude-3-5-sonnet-20241022
      api_key: os.environ/ANTHROPIC_API_KEY
general_settings:
  master_key: sk-1234
"""

# load balancing: deployments sharing a model_name, rpm/tpm, router settings, fallbacks
LOAD_BALANCING = """
model_list:
  - model_name: llama-3
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: http://10.0.0.5:8000/v1
      rpm: 600
    model_info:
      id: vllm-a
  - model_name: llama-3
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: http://10.0.0.6:8000/v1
      tpm: 100000
      timeout: 30
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: os.environ/OPENAI_API_KEY
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 3
  timeout: 60
  allowed_fails: 2
  cooldown_time: 30
  fallbacks: [{"llama-3": ["gpt-4o-mini"]}]
  redis_host: os.environ/REDIS_HOST
litellm_settings:
  drop_params: true
  success_callback: ["langfuse"]
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  database_url: postgresql://user:pass@host/db
"""


def test_quick_start_shape():
    config, notes = from_litellm(yaml.safe_load(QUICK_START))
    assert [m.name for m in config.models] == ["gpt-4o", "claude-3-5-sonnet"]
    gpt = config.models[0]
    assert gpt.backend == "litellm" and gpt.litellm_params["model"] == "azure/my_azure_deployment"
    assert gpt.litellm_params["api_key"] == "os.environ/AZURE_API_KEY"     # read when the model starts
    assert gpt.routing.policy == "cache_aware"
    assert config.server.api_keys == ["sk-1234"]
    assert notes == []


def test_load_balancing_shape(monkeypatch):
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-from-env")
    config, notes = from_litellm(yaml.safe_load(LOAD_BALANCING))
    llama, mini = config.models
    assert llama.name == "llama-3" and len(llama.litellm_params) == 2          # one replicated model
    assert llama.litellm_params[0]["rpm"] == 600 and llama.litellm_params[1]["tpm"] == 100000
    assert llama.model_info == {"id": "vllm-a"}
    assert llama.routing.policy == "random" and llama.routing.allowed_fails == 2
    assert llama.routing.cooldown_time_s == 30 and llama.num_retries == 3 and llama.timeout_s == 60
    assert llama.fallbacks == ["gpt-4o-mini"] and mini.fallbacks == []
    assert config.server.api_keys == ["sk-from-env"]
    # every key we do not act on is named
    assert sorted(notes) == sorted(["router_settings.redis_host: not supported, ignored",
                                    "litellm_settings.drop_params: not supported, ignored",
                                    "litellm_settings.success_callback: not supported, ignored",
                                    "general_settings.database_url: not supported, ignored"])


def test_unknown_strategy_and_bad_shapes_are_named(monkeypatch):
    data = yaml.safe_load(LOAD_BALANCING)
    data["router_settings"]["routing_strategy"] = "usage-based-routing-v2"
    monkeypatch.setenv("LITELLM_MASTER_KEY", "k")
    _, notes = from_litellm(data)
    assert any("usage-based-routing-v2" in n and "cache_aware" in n for n in notes)
    monkeypatch.delenv("LITELLM_MASTER_KEY")
    with pytest.raises(ConfigError, match="LITELLM_MASTER_KEY"):          # no key must not mean an open server
        from_litellm(yaml.safe_load(LOAD_BALANCING))
    with pytest.raises(ConfigError, match="model_list.0"):
        from_litellm({"model_list": [{"model_name": "x"}]})
    with pytest.raises(ConfigError, match="fallbacks"):
        from_litellm({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x"}}],
                      "router_settings": {"fallbacks": [{"x": ["nope"]}]}})


def test_load_any_config_tells_the_formats_apart(tmp_path):
    ours = tmp_path / "config.yaml"
    ours.write_text(yaml.safe_dump({"models": [{"name": "fleet", "workers": ["http://127.0.0.1:9/v1"]}]}))
    config, notes = load_any_config(ours)
    assert config.models[0].workers == ["http://127.0.0.1:9/v1"] and notes == []
    theirs = tmp_path / "litellm.yaml"
    theirs.write_text(QUICK_START)
    config, _ = load_any_config(theirs)
    assert config.models[1].name == "claude-3-5-sonnet"


def test_serve_checks_a_litellm_config_offline(tmp_path):
    """Start-up reads the file, names what it ignores, builds the litellm models without the network,
    and stops on a bad file with the key named (exit 2)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_list:\n  - model_name: x\n    litellm_params: {model: openai/x}\n"
                   "router_settings: {fallbacks: [{x: [missing]}]}\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "fallbacks" in run.stderr
