"""Quest sparse decode of the torch backend against kernels/reference.py, and its settings checks.

Random paged caches with ragged lengths, partial last pages, GQA groups 1/3/4, lengths just below,
at and just above the budget, shuffled page tables; selection, output and page counts must match
the reference per sequence.
"""
from __future__ import annotations

import pytest
import torch

from backends.base import SparseSettings
from backends.cuda import sparse_attention as sa
from backends.cuda.attention import (
    PagedKVCache,
    build_metadata,
    decode_attention,
    paged_attention,
)
from gateway.config import ConfigError, parse_config
from kernels import reference


def random_cache(lengths: list[int], page_size: int, kv_heads: int, head_dim: int, seed: int,
                 dtype: torch.dtype = torch.float32, layers: int = 2):
    """A cache holding one sequence per length (own shuffled pages; spare pages hold junk)."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-n // page_size) for n in lengths)
    num_pages = needed + 7
    cache = PagedKVCache(layers, num_pages, page_size, kv_heads, head_dim, dtype, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    # Give the keys some structure (a per-page offset) so that Quest bounds differ between pages.
    cache.k += torch.randn(layers, num_pages, 1, kv_heads, head_dim, generator=gen).to(dtype) * 2
    order = torch.randperm(num_pages - 1, generator=gen) + 1      # page 0 is the padding page
    tables, at = [], 0
    for n in lengths:
        used = -(-n // page_size)
        tables.append(order[at:at + used].tolist())
        at += used
    for layer in range(layers):
        for table, n in zip(tables, lengths, strict=True):
            reference.update_page_summaries(cache.kmin[layer], cache.kmax[layer], cache.k[layer],
                                            torch.tensor(table), 0, n)
    return cache, tables


def decode_meta(lengths, tables, page_size, settings):
    return build_metadata([(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)], page_size,
                          "cpu", settings)


CASES = [
    # page_size, group, kv_heads, budget, sink, recent, lengths
    (16, 1, 2, 64, 16, 16, [63, 64, 65, 80, 81, 200, 17, 1]),
    (16, 3, 3, 64, 16, 16, [65, 300, 129, 64, 48]),
    (16, 4, 2, 96, 0, 20, [97, 96, 95, 250, 113, 33]),
    (4, 3, 1, 24, 5, 3, [25, 24, 23, 101, 57, 2]),
    (8, 4, 2, 70, 8, 8, [65, 64, 71, 72, 73, 160]),     # budget 70 -> 8 pages; 65 tokens are 9
]


@pytest.mark.parametrize("page_size, group, kv_heads, budget, sink, recent, lengths", CASES)
def test_matches_reference(page_size, group, kv_heads, budget, sink, recent, lengths):
    head_dim = 32
    cache, tables = random_cache(lengths, page_size, kv_heads, head_dim, seed=page_size + group)
    settings = SparseSettings(True, budget, 1, sink, recent)
    meta = decode_meta(lengths, tables, page_size, settings)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1))
    scale = reference.default_scale(head_dim)
    layer = 1
    out = sa.sparse_decode_attention(q, cache, layer, meta, scale)
    budget_pages, _, _ = reference.sparse_page_counts(page_size, budget, sink, recent)

    plan = meta._quest_plan
    _, chosen = sa.sparse_rows_attention(q[plan.sparse_rows], cache.k[layer], cache.v[layer],
                                         cache.kmin[layer], cache.kmax[layer], plan, scale)
    chosen_by_row = dict(zip(plan.sparse_rows.tolist(), chosen, strict=True))
    read = skipped = 0
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        table_t = torch.tensor(table)
        expected, pages_read = reference.sparse_paged_decode(
            q[row], cache.k[layer], cache.v[layer], cache.kmin[layer], cache.kmax[layer], table_t, n,
            scale, budget, sink, recent)
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
        num_pages = -(-n // page_size)
        read += pages_read
        skipped += max(0, num_pages - budget_pages) * kv_heads
        if num_pages > budget_pages:
            scores = reference.quest_page_scores(q[row], cache.kmin[layer], cache.kmax[layer], table_t,
                                                 num_pages)
            ref_pages = reference.select_pages(scores, *reference.sparse_page_counts(
                page_size, budget, sink, recent))
            assert torch.equal(chosen_by_row[row], ref_pages)
        else:
            assert row in plan.dense_rows.tolist()
    assert (meta.stats.pages_read, meta.stats.pages_skipped) == (read, skipped)
    assert skipped > 0 and len(plan.dense_rows) > 0


def test_quest_scores_equal_reference_bound():
    """Per-head bounds, log-softmax over each row's own pages (padding kept out), max over the group."""
    gen = torch.Generator().manual_seed(3)
    kv_heads, group, d, pages = 3, 3, 16, 10
    used = [10, 6]
    q = torch.randn(2, kv_heads * group, d, generator=gen)
    kmin = torch.randn(2, pages, kv_heads, d, generator=gen)
    kmax = kmin + torch.rand(2, pages, kv_heads, d, generator=gen)
    padding = torch.zeros(2, 1, 1, pages)
    padding[1, ..., used[1]:] = float("-inf")
    got = sa.quest_scores(q, kmin, kmax, padding, 0.3)
    for b, n in enumerate(used):
        expected = reference.quest_page_scores(q[b], kmin[b], kmax[b], torch.arange(pages), n, 0.3)
        torch.testing.assert_close(got[b, :, :n], expected, atol=1e-5, rtol=1e-5)
    assert (got[1, :, used[1]:] == float("-inf")).all()


def test_reference_scores_normalise_each_head():
    """Two pages to keep: head 0 (small bounds) needs page 2, head 1 (large bounds) prefers page 5.
    Summed raw bounds let head 1 choose both; the per-head normalised scores keep one for each."""
    d, pages = 4, 6
    kmin = torch.zeros(pages, 1, d)
    kmax = torch.zeros(pages, 1, d)
    kmax[2, 0, 0] = 1.0
    kmax[:, 0, 1] = torch.tensor([0.0, 0.5, 0.55, 0.7, 0.8, 0.9])
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    bounds = reference.quest_head_bounds(q, kmin, kmax, torch.arange(pages), pages)
    assert set(bounds.sum(dim=1)[0].topk(2).indices.tolist()) == {4, 5}
    scores = reference.quest_page_scores(q, kmin, kmax, torch.arange(pages), pages, scale=1.0)
    assert scores.shape == (1, pages)
    assert set(scores[0].topk(2).indices.tolist()) == {2, 5}


def test_within_budget_is_exactly_dense():
    lengths, page_size = [10, 64, 33, 1], 16
    cache, tables = random_cache(lengths, page_size, 3, 32, seed=5)
    settings = SparseSettings(True, 64, 1, 16, 16)
    q = torch.randn(len(lengths), 9, 32)
    dense = decode_attention(q, cache, 1, decode_meta(lengths, tables, page_size, None), 0.2)
    meta = decode_meta(lengths, tables, page_size, settings)
    assert torch.equal(sa.sparse_decode_attention(q, cache, 1, meta, 0.2), dense)
    assert meta.stats.pages_read == (1 + 4 + 3 + 1) * 3 and meta.stats.pages_skipped == 0


def test_dense_layers_and_stats_through_paged_attention():
    """Layers below dense_layers never count; each eligible layer adds the same plan counts."""
    lengths, page_size, kv_heads, d = [100, 40], 16, 2, 32
    cache, tables = random_cache(lengths, page_size, kv_heads, d, seed=9, layers=3)
    settings = SparseSettings(True, 48, 1, 0, 16)           # 3 pages: 1 recent + 2 selected
    meta = build_metadata([(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)], page_size,
                          "cpu", settings)
    k = torch.randn(2, kv_heads, d)
    v = torch.randn(2, kv_heads, d)
    for layer in range(3):
        q = torch.randn(2, kv_heads * 2, d)
        out = paged_attention(layer, q, k, v, cache, meta, 0.2)
        if layer == 0:
            assert (meta.stats.pages_read, meta.stats.pages_skipped) == (0, 0)
        for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
            t = torch.tensor(table)
            if layer == 0:
                expected = reference.paged_attention(q[row:row + 1], cache.k[layer], cache.v[layer], t,
                                                     n - 1, 0.2)[0]
            else:
                expected, _ = reference.sparse_paged_decode(
                    q[row], cache.k[layer], cache.v[layer], cache.kmin[layer], cache.kmax[layer], t, n,
                    0.2, 48, 0, 16)
            torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
    # 100 tokens = 7 pages (3 read, 4 skipped), 40 tokens = 3 pages (dense); 2 eligible layers.
    assert meta.stats.pages_read == 2 * (3 + 3) * kv_heads
    assert meta.stats.pages_skipped == 2 * 4 * kv_heads


def test_bfloat16_cache_close_to_reference():
    lengths, page_size = [150, 90, 30], 16
    cache, tables = random_cache(lengths, page_size, 3, 64, seed=11, dtype=torch.bfloat16)
    settings = SparseSettings(True, 64, 0, 16, 16)
    q = torch.randn(3, 9, 64).to(torch.bfloat16)
    out = sa.sparse_decode_attention(q, cache, 0, decode_meta(lengths, tables, page_size, settings), 0.125)
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        expected, _ = reference.sparse_paged_decode(q[row], cache.k[0], cache.v[0], cache.kmin[0],
                                                    cache.kmax[0], torch.tensor(table), n, 0.125, 64, 16, 16)
        torch.testing.assert_close(out[row].float(), expected, atol=3e-2, rtol=3e-2)


def test_reads_only_selected_pages():
    """Poison every page the selection leaves out: the output must not change."""
    lengths, page_size = [160], 16
    cache, tables = random_cache(lengths, page_size, 2, 32, seed=13)
    settings = SparseSettings(True, 64, 0, 16, 16)
    q = torch.randn(1, 4, 32)
    meta = decode_meta(lengths, tables, page_size, settings)
    before = sa.sparse_decode_attention(q, cache, 0, meta, 0.2)
    plan = meta._quest_plan
    _, chosen = sa.sparse_rows_attention(q, cache.k[0], cache.v[0], cache.kmin[0], cache.kmax[0], plan, 0.2)
    table = torch.tensor(tables[0])
    for head in range(2):
        skipped = torch.ones(len(table), dtype=torch.bool)
        skipped[chosen[0, head]] = False
        cache.k[0][table[skipped], :, head] = float("nan")
        cache.v[0][table[skipped], :, head] = float("nan")
    after = sa.sparse_decode_attention(q, cache, 0, decode_meta(lengths, tables, page_size, settings), 0.2)
    assert torch.equal(before, after)


# ---- settings ----------------------------------------------------------------------------------

def test_page_rounding():
    assert sa.page_counts(SparseSettings(True, 2048, 2, 16, 256), 16) == (128, 1, 16)
    assert sa.page_counts(SparseSettings(True, 100, 2, 17, 1), 16) == (6, 2, 1)
    assert sa.page_counts(SparseSettings(True, 100, 2, 0, 1), 16) == (6, 0, 1)
    for args in [(True, 2048, 2, 16, 256), (True, 100, 2, 17, 1), (True, 70, 0, 5, 3)]:
        for page in (4, 8, 16):
            settings = SparseSettings(*args)
            try:
                expected = reference.sparse_page_counts(page, *args[1:2], *args[3:])
            except AssertionError:
                with pytest.raises(ValueError):
                    sa.page_counts(settings, page)
            else:
                assert sa.page_counts(settings, page) == expected


@pytest.mark.parametrize("settings, layers, words", [
    (SparseSettings(True, 32, 2, 16, 16), 30, "token_budget 32 is 2 pages"),
    (SparseSettings(True, 64, 30, 16, 16), 30, "dense_layers 30 leaves none"),
    (SparseSettings(True, 64, -1, 16, 16), 30, "dense_layers must be at least 0"),
    (SparseSettings(True, 64, 2, 16, 0), 30, "recent_tokens must be at least 1"),
    (SparseSettings(True, 0, 2, 16, 16), 30, "token_budget must be at least 1"),
])
def test_bad_settings_rejected(settings, layers, words):
    with pytest.raises(ValueError, match=words):
        sa.check_sparse_settings(settings, 16, layers)


def test_disabled_settings_not_checked():
    sa.check_sparse_settings(SparseSettings(False, 1, 99, 16, 16), 16, 30)


@pytest.mark.parametrize("sparse, page_size, key, words", [
    ({"enabled": True, "token_budget": 32, "sink_tokens": 16, "recent_tokens": 16}, 16, "models.0",
     "must exceed the sink + recent pages"),
    ({"enabled": True, "token_budget": 2048, "recent_tokens": 4096}, 16, "models.0", "token_budget"),
    ({"token_budget": 0}, 16, "models.0.sparse_attention.token_budget", "greater than or equal"),
    ({"recent_tokens": 0}, 16, "models.0.sparse_attention.recent_tokens", "greater than or equal"),
    ({"sink_tokens": -16}, 16, "models.0.sparse_attention.sink_tokens", "greater than or equal"),
    ({"enabled": "sometimes"}, 16, "models.0.sparse_attention.enabled", "boolean"),
    ({"window": 5}, 16, "models.0.sparse_attention.window", "Extra inputs"),
])
def test_bad_config_rejected_with_clear_message(sparse, page_size, key, words):
    data = {"models": [{"name": "m", "kv_cache": {"page_size": page_size}, "sparse_attention": sparse}]}
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert key in str(raised.value) and words in str(raised.value), str(raised.value)


def test_good_config_accepted():
    cfg = parse_config({"models": [{"name": "m", "kv_cache": {"page_size": 16}, "sparse_attention": {
        "enabled": True, "token_budget": 64, "sink_tokens": 16, "recent_tokens": 16, "dense_layers": 2}}]})
    sparse = cfg.models[0].sparse_attention
    assert sa.page_counts(SparseSettings(True, sparse.token_budget, sparse.dense_layers, sparse.sink_tokens,
                                         sparse.recent_tokens), 16) == (4, 1, 1)
