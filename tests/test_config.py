"""config.yaml validation: a bad file stops start-up with a message naming the key and the problem."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, SchedulerConfig, SparseAttentionConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_repository_config_is_valid():
    config = load_config(ROOT / "config.yaml")
    assert config.models[0].name == "smollm2-135m-instruct"
    assert config.models[0].kv_cache.page_size == 16
    assert config.models[0].sparse_attention == SparseAttentionConfig()     # config.yaml shows the defaults
    assert config.models[0].scheduler == SchedulerConfig()


@pytest.mark.parametrize("data, key, words", [
    ({"server": {"port": 70000}}, "server.port", "less than or equal"),
    ({"models": [{"name": "m", "backend": "tpu"}]}, "models.0.backend", "auto"),
    ({"models": [{"name": "m", "kv_cache": {"page_size": 12}}]}, "models.0.kv_cache", "power of two"),
    ({"models": [{"name": "m", "sparse_attention": {"enabled": True, "token_budget": 64}}]},
     "models.0", "token_budget"),
    ({"models": [{"name": "m", "sparse_attention": {"dense_layers": -1}}]},
     "models.0.sparse_attention.dense_layers", "greater than or equal"),
    ({"models": [{"name": "m", "kv_cache": {"page_size": 8}, "sparse_attention": {"enabled": True,
                                                                                  "summary_tokens": 16}}]},
     "models.0", "sparse_attention.summary_tokens 16 must divide kv_cache.page_size 8"),
    ({"models": [{"name": "m", "sparse_attention": {"summary_tokens": 0}}]},
     "models.0.sparse_attention.summary_tokens", "greater than or equal"),
    ({"models": [{"name": "m", "sparse_attention": {"enabled": True, "head_budgets": "smollm2-135m-instruct"}}]},
     "models.0", "head_budgets needs selector: centroids"),
    ({"models": [{"name": "m", "sparse_attention": {"enabled": True, "selector": "centroids",
                                                     "head_budgets": "no-such-model"}}]},
     "models.0", "cannot read a per-head table"),
    ({"models": [{"name": "m", "colour": "blue"}]}, "models.0.colour", "Extra inputs"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "(top level)", "unique"),
    ({"models": [{"name": "g", "backend": "litellm"}]}, "models.0", "litellm_params"),
    ({"models": [{"name": "m", "scheduler": {"policy": "lpm"}}]}, "models.0.scheduler.policy", "fair"),
    ({"models": [{"name": "m", "scheduler": {"prefill_chunk_tokens": 256, "long_prefill_tokens": 256}}]},
     "models.0.scheduler", "long_prefill_tokens 256 must be below prefill_chunk_tokens 256"),
    ({"models": [{"name": "m", "scheduler": {"max_wait_steps": -1}}]}, "models.0.scheduler.max_wait_steps",
     "greater than or equal"),
])
def test_bad_values_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    message = str(raised.value)
    assert key in message and words in message, message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_refuses_bad_config(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("models:\n  - name: m\n    kv_cache: {page_size: 0}\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2
    assert "models.0.kv_cache.page_size" in run.stderr


def test_head_budgets_table_is_read_into_the_runner_settings():
    """A shipped table by its name: its weights reach the backend's SparseSettings (the model's fit is
    checked when the backend starts: tests/test_centroid_selector.py)."""
    from gateway.local_model import runner_settings
    config = parse_config({"models": [{"name": "m", "sparse_attention": {
        "enabled": True, "selector": "centroids", "token_budget": 1600, "head_budgets": "smollm2-135m-instruct"}}]})
    sparse = config.models[0].sparse_attention
    assert sparse.head_budgets == "smollm2-135m-instruct"
    settings = runner_settings(config.models[0], "cpu")
    assert len(settings.sparse.head_budget_weights) == 28 and settings.sparse.token_budget == 1600
