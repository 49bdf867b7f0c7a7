"""Prometheus metrics: HTTP-side counters plus the engines' own counters, read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# engine snapshot key -> (metric name, help); keys ending in _total are counters, the rest gauges
ENGINE_SERIES = {
    "running_requests": ("radixgate_running_requests", "requests in the running batch"),
    "waiting_requests": ("radixgate_waiting_requests", "requests waiting for admission"),
    "kv_pages_total": ("radixgate_kv_pages", "KV pages on the device"),
    "kv_pages_free": ("radixgate_kv_pages_free", "KV pages on the free list"),
    "prompt_tokens_total": ("radixgate_prompt_tokens", "prompt tokens admitted"),
    "cached_prompt_tokens_total": ("radixgate_cached_prompt_tokens", "prompt tokens served from the radix cache"),
    "generated_tokens_total": ("radixgate_generated_tokens", "tokens generated"),
    "preemptions_total": ("radixgate_preemptions", "requests preempted for KV pages"),
    "cancelled_total": ("radixgate_cancelled_requests", "requests cancelled (client gone)"),
    "attention_pages_read_total": ("radixgate_attention_pages_read", "KV pages read by sparse-eligible decode"),
    "attention_pages_skipped_total": ("radixgate_attention_pages_skipped", "KV pages skipped by sparse decode"),
    "attention_sparsity_ratio": ("radixgate_attention_sparsity_ratio", "pages skipped / pages dense would read"),
}
RADIX_SERIES = ("total_nodes", "cached_tokens", "shared_prefix_count", "avg_sharing_depth", "hit_rate",
                "evictions", "evictable_pages", "protected_pages",
                # per tier (gateway/engine/tiers.py): L1 device, L2 host, L3 disk
                "l1_pages", "l1_tokens", "l2_pages", "l2_tokens", "l3_pages", "l3_tokens",
                "l1_hit_rate", "l2_hit_rate", "l3_hit_rate")


class EngineCollector:
    """Turns the latest engine snapshots (set just before each scrape) into metric families."""

    def __init__(self):
        self.snapshots: dict[str, dict] = {}

    def collect(self):
        families = {}
        for model, snap in self.snapshots.items():
            for key, (name, help_text) in ENGINE_SERIES.items():
                kind = CounterMetricFamily if key.endswith("_total") and key != "kv_pages_total" else GaugeMetricFamily
                family = families.setdefault(name, kind(name, help_text, labels=["model"]))
                family.add_metric([model], float(snap[key]))
            for key in RADIX_SERIES:
                name = f"radixgate_radix_cache_{key}"
                family = families.setdefault(name, GaugeMetricFamily(name, f"radix cache {key}", labels=["model"]))
                family.add_metric([model], float(snap["radix_cache_stats"].get(key, 0)))
        yield from families.values()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("radixgate_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("radixgate_time_to_first_token_seconds", "time to first token", ["model"],
                              registry=self.registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("radixgate_request_seconds", "whole request time", ["model"],
                                 registry=self.registry, buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.engines = EngineCollector()
        self.registry.register(self.engines)

    def render(self, snapshots: dict[str, dict]) -> bytes:
        self.engines.snapshots = snapshots
        return generate_latest(self.registry)
