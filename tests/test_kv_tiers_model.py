"""KV tiers with the real model: the torch backend's page copies (K, V and key summaries), a bit-exact
L1 -> L2 -> L3 -> L1 round trip of the embedded model's pages with the same greedy output, and over
HTTP: per-tier stats in /health and /metrics, a clear that empties every tier, and a restart of a
real server process that continues a conversation from disk."""
from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch

from backends.base import RunnerSettings, SparseSettings
from backends.cuda.kv_store import TorchKVStore
from backends.cuda.runner import TorchRunner
from backends.kv_store import KVLayout, Tier
from backends.sampling_params import SamplingParams
from backends.source import resolve_source
from bench.serve_process import radixgate_server
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine.disk_store import DiskStore
from gateway.engine.page_pool import PagePool
from gateway.engine.request import Request
from gateway.engine.scheduler import Scheduler
from gateway.engine.tiers import TieredRadixCache
from kernels.cpu import quant_linear
from tests.conftest import MODEL, model_config, start_server

PAGE = 16


def parts(runner: TorchRunner, pages: list[int]) -> list[torch.Tensor]:
    cache = runner.cache
    return [t[:, pages].clone() for t in (cache.k, cache.v, cache.kmin, cache.kmax, cache.pmin, cache.pmax)
            if t is not None]


def test_store_round_trip_moves_k_v_and_summaries_exactly():
    runner = TorchRunner(RunnerSettings(
        "random", "tiny", "tiny", dtype="bfloat16", attention="torch", page_size=8, num_pages=16,
        host_cache_bytes=1 << 20, sparse=SparseSettings(enabled=True, token_budget=32, dense_layers=0,
                                                       sink_tokens=8, recent_tokens=8, summary_tokens=4)))
    store = runner.kv_store
    assert runner.cache.kmin is not None and store.layout.summary_tokens == 4
    generator = torch.Generator().manual_seed(0)
    for t in (runner.cache.k, runner.cache.v, runner.cache.kmin, runner.cache.kmax, runner.cache.pmin,
              runner.cache.pmax):
        t.copy_(torch.randn(t.shape, generator=generator).to(t.dtype))
    before = parts(runner, [3, 7, 8])
    store.copy_pages(Tier.DEVICE, Tier.HOST, [3, 7, 8], [5, 0, 1]).wait()
    store.write_host_page(2, bytes(store.read_host_page(5)))          # through bytes, as L3 does
    store.copy_pages(Tier.HOST, Tier.DEVICE, [2, 0, 1], [12, 1, 2]).wait()
    after = parts(runner, [12, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class Tok:
    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def test_embedded_model_round_trip_through_every_tier_is_bit_exact(tmp_path):
    source = resolve_source("packaged:smollm2-135m-instruct")
    runner = TorchRunner(RunnerSettings(source.kind, source.path, MODEL, page_size=PAGE, num_pages=12,
                                        max_sequences=2, validate_batches=True, host_cache_bytes=1 << 24))
    runner.kv_store = TorchKVStore(runner.cache, 4, runner.kv_store.layout)      # an L2 of 4 pages
    pool = PagePool(runner.num_pages)
    disk = DiskStore(tmp_path, runner.kv_store.layout, 1 << 30)
    cache = TieredRadixCache(pool, PAGE, runner.kv_store, disk, "write_back")
    sched = Scheduler(runner, pool, cache, max_running=2, prefill_chunk_tokens=256, context_length=2048)

    def generate(prompt: list[int]) -> Request:
        request = Request(f"r{len(prompt)}-{prompt[0]}", 0, prompt, SamplingParams(temperature=0.0), 8,
                          frozenset(), IncrementalDetokenizer(Tok(), None), lambda event: None)
        sched.add(request)
        while sched.has_work:
            sched.step()
            sched.check_accounting()
            cache.check_invariants()
        return request

    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, 60).tolist() for _ in range(7)]
    first = generate(prompts[0])
    kv_before = parts(runner, cache.match_prefix(prompts[0][:3 * PAGE]).pages)
    for prompt in prompts[1:]:                           # 6 x 4 pages through a 12-page L1, 4-page L2
        generate(prompt)
    node, path = cache.root, []
    while len(path) < 3 * PAGE:
        node = node.children[tuple(prompts[0][len(path):len(path) + PAGE])]
        path += node.key
        assert not node.pages and not node.host_pages and node.on_disk, node    # on L3 only now
    again = generate(prompts[0])
    assert again.cached_tokens == 48 and sched.stats.l3_hit_tokens == 48
    assert again.output_ids == first.output_ids
    kv_after = parts(runner, cache.match_prefix(prompts[0][:3 * PAGE]).pages)
    assert all(torch.equal(a, b) for a, b in zip(kv_before, kv_after, strict=True))


def chat(base_url: str, messages: list[dict]) -> tuple[str, int]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens


SYSTEM = ("You are a helpful assistant of a small town library. Answer in one or two short sentences, and "
          "say so when you do not know. ") * 3


def test_http_tier_stats_metrics_and_clear_empties_every_tier(tmp_path):
    server = start_server(model_config(kv_cache={"page_size": PAGE, "num_pages": 20, "host_cache_gb": 0.05,
                                                 "disk_cache_dir": str(tmp_path)}))
    try:
        conversations = [[{"role": "system", "content": SYSTEM},     # ~12 pages each through a 20-page L1
                          {"role": "user", "content": "Which of these do you have? " + ", ".join(
                              f"book {i}-{j}" for j in range(30))}] for i in range(4)]
        for messages in conversations:
            chat(server.base_url, messages)
        stats = httpx.get(f"{server.url}/health").json()["radix_cache_stats"]
        for key in ("l1_pages", "l1_tokens", "l2_pages", "l2_tokens", "l3_pages", "l3_tokens",
                    "l1_hit_rate", "l2_hit_rate", "l3_hit_rate"):
            assert key in stats, key
        assert stats["l2_pages"] > 0 and stats["l3_pages"] > 0 and stats["l3_tokens"] == stats["l3_pages"] * PAGE
        text, cached = chat(server.base_url, conversations[0])       # its pages were pushed out of L1
        assert cached > 0
        stats = httpx.get(f"{server.url}/health").json()["radix_cache_stats"]
        assert stats["l2_hit_rate"] + stats["l3_hit_rate"] > 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'radixgate_radix_cache_l2_pages{model="smollm2-135m-instruct"}' in metrics
        assert "radixgate_radix_cache_l3_hit_rate" in metrics
        assert httpx.post(f"{server.url}/clear_radix_cache").status_code == 200
        stats = httpx.get(f"{server.url}/health").json()["radix_cache_stats"]
        assert (stats["l1_pages"], stats["l2_pages"], stats["l3_pages"]) == (0, 0, 0)
        assert not list(tmp_path.rglob("*.kv"))
        again, cached = chat(server.base_url, conversations[0])
        assert cached == 0                                           # nothing old is served
        # the same text computed cold as from the tiers where prefill does not depend on the chunk
        # (the default dtype's CPU kernels: AVX-512 BF16, or AVX2 and FMA; docs/cpu.md)
        assert again == text or not quant_linear.available()
    finally:
        assert server.engine.fatal_error is None, server.engine.fatal_error
        server.stop()


def test_restart_continues_a_conversation_from_disk(tmp_path):
    """A real server process, stopped and started again over the same disk_cache_dir."""
    model = {"name": MODEL, "backend": "cpu", "source": "packaged:smollm2-135m-instruct",
             "kv_cache": {"page_size": PAGE, "num_pages": 256, "host_cache_gb": 0.1, "disk_cache_dir": str(tmp_path)}}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Can I borrow three books?"}]
    with radixgate_server(model) as url:
        answer, cached = chat(url, messages)
        assert cached == 0
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And for how long?"}]
    with radixgate_server(model) as url:
        health = httpx.get(url.removesuffix("/v1") + "/health").json()["radix_cache_stats"]
        assert health["l3_pages"] > 0 and health["l1_pages"] == 0
        again, cached = chat(url, messages[:2])            # the first turn again: served from disk
        assert again == answer and cached > 0
        _, cached = chat(url, messages)                    # the conversation goes on
        assert cached > 0
        health = httpx.get(url.removesuffix("/v1") + "/health").json()["radix_cache_stats"]
        assert health["l3_hit_rate"] > 0


def test_mlx_store_round_trip_moves_k_v_and_summaries_exactly():
    mx = pytest.importorskip("mlx.core")
    from backends.mlx.kv_cache import PagedKVCache as MlxCache
    from backends.mlx.kv_store import MlxKVStore

    cache = MlxCache(2, 10, 8, 2, 16, mx.bfloat16, summary_tokens=4)
    names = ("k", "v", "kmin", "kmax", "pmin", "pmax")
    for name in names:
        arrays = getattr(cache, name)
        for layer in range(len(arrays)):
            arrays[layer] = mx.random.normal(arrays[layer].shape, key=mx.random.key(layer)).astype(mx.bfloat16)

    def pages_of(ids):
        return [np.array(getattr(cache, n)[layer].reshape(11, -1)[mx.array(ids)].astype(mx.float32))
                for n in names for layer in range(2)]

    layout = KVLayout(model="m", weights="w", kv_dtype="bfloat16", device="mlx-cpu", attention="a", page_size=8,
                      num_layers=2, kv_heads=2, head_dim=16, summary_tokens=4,
                      page_bytes=MlxKVStore.bytes_per_page(cache))
    store = MlxKVStore(cache, 4, layout)
    before = pages_of([2, 5, 6])
    store.copy_pages(Tier.DEVICE, Tier.HOST, [2, 5, 6], [3, 0, 1])
    store.write_host_page(2, bytes(store.read_host_page(3)))
    store.copy_pages(Tier.HOST, Tier.DEVICE, [2, 0, 1], [9, 1, 0])
    after = pages_of([9, 1, 0])
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
