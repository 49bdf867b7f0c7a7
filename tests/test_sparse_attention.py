"""Quest sparse decode of the torch backend against kernels/reference.py, and its settings checks.

Random paged caches with ragged lengths, partial last pages and partial summary blocks, 1 to 4
summaries per page, GQA groups 1/3/4, lengths just below, at and just above the budget, shuffled
page tables; selection, output and page counts must match the reference per sequence. The
summaries of unwritten blocks hold garbage that would win every page if it were read. The write
path keeps summaries exact under chunked prefill, decode and page recycling, and writes none when
the cache has none (sparse attention off).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import SparseSettings
from backends.cuda.attention import sparse as sa
from backends.cuda.attention.base import AttentionShape
from backends.cuda.attention.cpu_fused import fused_decode_attention
from backends.cuda.attention.summaries import write_kv_and_summaries
from backends.cuda.attention.torch_attention import TorchAttention, attend, decode_attention
from backends.cuda.attention.torch_metadata import build_metadata
from backends.cuda.kv_cache import PagedKVCache
from gateway.config import ConfigError, parse_config
from kernels import reference

GARBAGE = 1e4     # what an unwritten block's summary holds here: it would win any page it scored


def random_cache(lengths: list[int], page_size: int, kv_heads: int, head_dim: int, seed: int,
                 dtype: torch.dtype = torch.float32, layers: int = 2, summary_tokens: int = 4):
    """A cache holding one sequence per length (own shuffled pages; spare pages hold junk), with
    exact summaries of the written blocks and garbage in the unwritten blocks of each last page."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-n // page_size) for n in lengths)
    num_pages = needed + 7
    cache = PagedKVCache(layers, num_pages, page_size, kv_heads, head_dim, dtype, "cpu", summary_tokens)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    # Give the keys some structure (a per-page offset) so that Quest bounds differ between pages.
    cache.k += torch.randn(layers, num_pages + 1, 1, kv_heads, head_dim, generator=gen).to(dtype) * 2
    # page 0 is the padding page; the last (num_pages, the scratch page) belongs to no sequence
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    tables, at = [], 0
    for n in lengths:
        used = -(-n // page_size)
        tables.append(order[at:at + used].tolist())
        at += used
    for layer in range(layers):
        for table, n in zip(tables, lengths, strict=True):
            reference.update_page_summaries(cache.kmin[layer], cache.kmax[layer], cache.k[layer],
                                            torch.tensor(table), 0, n, cache.pmin[layer], cache.pmax[layer])
            last, filled = table[(n - 1) // page_size], n - (n - 1) // page_size * page_size
            written = -(-filled // summary_tokens)
            cache.kmin[layer, last, written:] = -GARBAGE
            cache.kmax[layer, last, written:] = GARBAGE
    return cache, tables


def decode_meta(lengths, tables, page_size, settings):
    return build_metadata([(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)], page_size,
                          "cpu", settings)


def sparse_decode(q, cache, layer, meta, scale, fused=False):
    """Quest decode with the dense decode of its backend: torch's, or the CPU kernel's when fused."""
    dense = fused_decode_attention if fused else decode_attention
    return sa.sparse_decode_attention(q, cache, layer, meta, scale, dense, fused)


CASES = [
    # page_size, group, kv_heads, budget, sink, recent, lengths, summary_tokens
    (16, 1, 2, 64, 16, 16, [63, 64, 65, 80, 81, 200, 17, 1], 4),
    (16, 3, 3, 64, 16, 16, [65, 300, 129, 64, 48], 4),
    (16, 3, 3, 128, 16, 64, [127, 128, 129, 130, 203, 250, 145], 4),   # the defaults' shape, budget 8 pages
    (16, 4, 2, 96, 0, 20, [97, 96, 95, 250, 113, 33], 2),
    (4, 3, 1, 24, 5, 3, [25, 24, 23, 101, 57, 2], 1),
    (8, 4, 2, 70, 8, 8, [65, 64, 71, 72, 73, 160], 8),     # budget 70 -> 8 pages; 65 tokens are 9
    (16, 1, 1, 64, 16, 16, [66, 90, 71, 64], 16),          # one summary per page
]


@pytest.mark.parametrize("shortlist", [0, 2])       # coarse to fine past (a shortlist of) 2x the budget
@pytest.mark.parametrize("fused, head_dim", [(False, 32), (True, 32), (True, 64)])   # fused: CPU kernel
@pytest.mark.parametrize("page_size, group, kv_heads, budget, sink, recent, lengths, summary_tokens", CASES)
def test_matches_reference(page_size, group, kv_heads, budget, sink, recent, lengths, summary_tokens,
                           fused, head_dim, shortlist):
    if fused:
        from kernels.cpu.build import load
        assert load().available, load().detail
    cache, tables = random_cache(lengths, page_size, kv_heads, head_dim, seed=page_size + group,
                                 summary_tokens=summary_tokens)
    budget_pages = budget // page_size
    tokens = shortlist * budget_pages * page_size     # a shortlist of shortlist * budget_pages pages
    settings = SparseSettings(True, budget, 1, sink, recent, summary_tokens, tokens)
    meta = decode_meta(lengths, tables, page_size, settings)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1))
    scale = reference.default_scale(head_dim)
    layer = 1
    out = sparse_decode(q, cache, layer, meta, scale, fused)
    budget_pages, sink_pages, recent_pages = reference.sparse_page_counts(page_size, budget, sink, recent)

    plan = meta._quest_plan
    _, chosen = sa.sparse_rows_attention(q[plan.sparse_rows], cache.k[layer], cache.v[layer],
                                         cache.kmin[layer], cache.kmax[layer], plan, scale, fused,
                                         cache.pmin[layer], cache.pmax[layer])
    coarse_rows = 0
    chosen_by_row = dict(zip(plan.sparse_rows.tolist(), chosen, strict=True))
    read = skipped = 0
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        table_t = torch.tensor(table)
        expected, pages_read = reference.sparse_paged_decode(
            q[row], cache.k[layer], cache.v[layer], cache.kmin[layer], cache.kmax[layer], table_t, n,
            scale, budget, sink, recent, cache.pmin[layer], cache.pmax[layer], tokens)
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
        num_pages = -(-n // page_size)
        read += pages_read
        skipped += max(0, num_pages - budget_pages) * kv_heads
        if num_pages > budget_pages:
            if shortlist and num_pages > shortlist * budget_pages:
                coarse_rows += 1
                scores = reference.shortlist_page_scores(
                    q[row], cache.kmin[layer], cache.kmax[layer], cache.pmin[layer], cache.pmax[layer], table_t,
                    n, page_size, shortlist * budget_pages, sink_pages, recent_pages)
                scores = scores.masked_fill(scores == float("-inf"), 0.0)   # pages off the shortlist
            else:
                scores = reference.quest_page_scores(q[row], cache.kmin[layer], cache.kmax[layer], table_t,
                                                     n, page_size)
            assert scores.abs().max() < GARBAGE / 100       # no unwritten block was scored
            if not (shortlist and num_pages > shortlist * budget_pages):
                ref_pages = reference.select_pages(scores, budget_pages, sink_pages, recent_pages)
                assert torch.equal(chosen_by_row[row], ref_pages)
        else:
            assert row in plan.dense_rows.tolist()
    assert (meta.stats.pages_read, meta.stats.pages_skipped) == (read, skipped)
    assert skipped > 0 and len(plan.dense_rows) > 0
    assert coarse_rows > 0 or not shortlist or max(lengths) <= 2 * budget_pages * page_size


def test_quest_scores_equal_reference_bound():
    """Per-head bounds (best written block of each page), log-softmax over each row's own pages
    (padding kept out), max over the group."""
    gen = torch.Generator().manual_seed(3)
    kv_heads, group, d, pages, page_size, blocks = 3, 3, 16, 10, 8, 4
    lengths = [80, 43]                       # 43: 6 pages, the last one 3 of 8 slots (blocks 0, 1)
    q = torch.randn(2, kv_heads * group, d, generator=gen)
    kmin = torch.randn(2, pages, blocks, kv_heads, d, generator=gen)
    kmax = kmin + torch.rand(2, pages, blocks, kv_heads, d, generator=gen)
    first = torch.arange(0, pages * page_size, page_size // blocks)
    unwritten = (first >= torch.tensor(lengths).unsqueeze(1)).view(2, 1, 1, pages * blocks)
    kmax.view(2, -1, kv_heads, d)[unwritten.view(2, -1)] = GARBAGE
    got = sa.quest_scores(q, kmin, kmax, unwritten, 0.3)
    for b, n in enumerate(lengths):
        used = -(-n // page_size)
        expected = reference.quest_page_scores(q[b], kmin[b], kmax[b], torch.arange(pages), n, page_size, 0.3)
        assert expected.shape == (kv_heads, used) and expected.abs().max() < 100
        torch.testing.assert_close(got[b, :, :used], expected, atol=1e-5, rtol=1e-5)
    assert (got[1, :, 6:] == float("-inf")).all()


def test_reference_scores_normalise_each_head():
    """Two pages to keep: head 0 (small bounds) needs page 2, head 1 (large bounds) prefers page 5.
    Summed raw bounds let head 1 choose both; the per-head normalised scores keep one for each."""
    d, pages, page_size = 4, 6, 4
    kmin = torch.zeros(pages, 1, 1, d)
    kmax = torch.zeros(pages, 1, 1, d)
    kmax[2, 0, 0, 0] = 1.0
    kmax[:, 0, 0, 1] = torch.tensor([0.0, 0.5, 0.55, 0.7, 0.8, 0.9])
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    length = pages * page_size
    bounds = reference.quest_head_bounds(q, kmin, kmax, torch.arange(pages), length, page_size)
    assert set(bounds.sum(dim=1)[0].topk(2).indices.tolist()) == {4, 5}
    scores = reference.quest_page_scores(q, kmin, kmax, torch.arange(pages), length, page_size, scale=1.0)
    assert scores.shape == (1, pages)
    assert set(scores[0].topk(2).indices.tolist()) == {2, 5}


def test_block_summaries_bound_tighter_than_one_per_page():
    """q = (1, 1). Page 0 holds keys (1, 0) and (0, 1) (best q.k 1), page 1 holds (0.9, 0.9) (1.8).
    One min/max per page bounds page 0 by 2 and keeps it; one per 2-token block bounds it by 1 and
    keeps page 1, the one that matters. The torch path agrees with the reference."""
    page_size, d = 4, 2
    cache = PagedKVCache(1, 3, page_size, 1, d, torch.float32, "cpu", summary_tokens=page_size)
    fine = PagedKVCache(1, 3, page_size, 1, d, torch.float32, "cpu", summary_tokens=2)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.9, 0.9], [0.9, 0.9],
                         [0.9, 0.9], [0.9, 0.9]])
    q = torch.tensor([[1.0, 1.0]])
    table = torch.tensor([1, 2])
    for c in (cache, fine):
        c.k[0, 1:3] = keys.view(2, page_size, 1, d)
        reference.update_page_summaries(c.kmin[0], c.kmax[0], c.k[0], table, 0, 8)
    coarse = reference.quest_head_bounds(q, cache.kmin[0], cache.kmax[0], table, 8, page_size)
    tight = reference.quest_head_bounds(q, fine.kmin[0], fine.kmax[0], table, 8, page_size)
    assert coarse.flatten().tolist() == pytest.approx([2.0, 1.8])
    assert tight.flatten().tolist() == pytest.approx([1.0, 1.8])
    kmin, kmax = sa.gather_summaries(fine.kmin[0], fine.kmax[0], table.view(1, 2))
    got = sa.head_page_logits(q.view(1, 1, d), kmin, kmax, torch.zeros(1, 1, 1, 4, dtype=torch.bool), 1.0)
    torch.testing.assert_close(got.flatten(), tight.flatten())


def test_within_budget_is_exactly_dense():
    lengths, page_size = [10, 64, 33, 1], 16
    cache, tables = random_cache(lengths, page_size, 3, 32, seed=5)
    assert cache.kmin.shape == (2, cache.num_pages + 1, 4, 3, 32)         # + the scratch page
    settings = SparseSettings(True, 64, 1, 16, 16)
    q = torch.randn(len(lengths), 9, 32)
    dense = decode_attention(q, cache, 1, decode_meta(lengths, tables, page_size, None), 0.2)
    meta = decode_meta(lengths, tables, page_size, settings)
    assert torch.equal(sparse_decode(q, cache, 1, meta, 0.2), dense)
    assert meta.stats.pages_read == (1 + 4 + 3 + 1) * 3 and meta.stats.pages_skipped == 0


def test_dense_layers_and_stats_through_the_write_and_attend_path():
    """Layers below dense_layers never count (the torch backend's sparse_layer says which are
    sparse); each eligible layer adds the same plan counts."""
    lengths, page_size, kv_heads, d = [100, 40], 16, 2, 32
    cache, tables = random_cache(lengths, page_size, kv_heads, d, seed=9, layers=3)
    settings = SparseSettings(True, 48, 1, 0, 16)           # 3 pages: 1 recent + 2 selected
    backend = TorchAttention(cache, AttentionShape(kv_heads * 2, kv_heads, d), torch.empty(0), torch.empty(0),
                             settings)
    assert [backend.sparse_layer(layer) for layer in range(3)] == [False, True, True]
    meta = build_metadata([(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)], page_size,
                          "cpu", settings)
    k = torch.randn(2, kv_heads, d)
    v = torch.randn(2, kv_heads, d)
    for layer in range(3):
        q = torch.randn(2, kv_heads * 2, d)
        write_kv_and_summaries(cache, layer, k, v, meta)
        out = attend(layer, q, cache, meta, 0.2, backend.sparse_layer(layer))
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
    out = sparse_decode(q, cache, 0, decode_meta(lengths, tables, page_size, settings), 0.125)
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        expected, _ = reference.sparse_paged_decode(q[row], cache.k[0], cache.v[0], cache.kmin[0],
                                                    cache.kmax[0], torch.tensor(table), n, 0.125, 64, 16, 16)
        torch.testing.assert_close(out[row].float(), expected, atol=3e-2, rtol=3e-2)


def test_reads_only_selected_pages():
    """Poison every page the selection leaves out: the output must not change."""
    lengths, page_size = [160], 16
    cache, tables = random_cache(lengths, page_size, 2, 32, seed=13)
    settings = SparseSettings(True, 64, 0, 16, 16, shortlist_tokens=128)
    q = torch.randn(1, 4, 32)
    meta = decode_meta(lengths, tables, page_size, settings)
    before = sparse_decode(q, cache, 0, meta, 0.2)
    plan = meta._quest_plan
    assert plan.shortlist_pages == 8           # 10 pages, budget 4: the coarse stage runs
    _, chosen = sa.sparse_rows_attention(q, cache.k[0], cache.v[0], cache.kmin[0], cache.kmax[0], plan, 0.2,
                                         pmin_layer=cache.pmin[0], pmax_layer=cache.pmax[0])
    table = torch.tensor(tables[0])
    for head in range(2):
        skipped = torch.ones(len(table), dtype=torch.bool)
        skipped[chosen[0, head]] = False
        cache.k[0][table[skipped], :, head] = float("nan")
        cache.v[0][table[skipped], :, head] = float("nan")
    after = sparse_decode(q, cache, 0, decode_meta(lengths, tables, page_size, settings), 0.2)
    assert torch.equal(before, after)


# ---- the write path ------------------------------------------------------------------------------

@pytest.mark.parametrize("summary_tokens", [1, 2, 8])
def test_write_path_keeps_summaries_exact_under_chunks_decodes_and_recycling(summary_tokens):
    """Sequences come and go on a small pool; a freed page goes to the next sequence first, with the
    old owner's keys and summaries still in it. Each step writes a random batch (prefill chunks and
    decodes mixed, or decodes only, which take the in-place path) through write_kv_and_summaries.
    After every step each live page's summary rows equal reference.update_page_summaries over what
    its owner wrote: exact min/max per written block, 0 for every unwritten block."""
    page_size, kv_heads, d, layers, num_pages = 8, 2, 4, 2, 12
    rng = np.random.default_rng(summary_tokens)
    gen = torch.Generator().manual_seed(summary_tokens)
    cache = PagedKVCache(layers, num_pages, page_size, kv_heads, d, torch.float32, "cpu", summary_tokens)
    free = list(range(1, num_pages))                 # page 0 is the padding page; LIFO reuse
    ever_used: set[int] = set()
    live: dict[int, tuple[list[int], int]] = {}      # sequence -> (page table, tokens written)
    seen = {"decode_only": 0, "opened_in_place": 0, "mixed": 0, "recycled": 0}
    for step in range(160):
        if live and rng.random() < 0.15:
            table, _ = live.pop(int(rng.choice(list(live))))
            free.extend(table)
        if len(live) < 4 and rng.random() < 0.4:
            live[step] = ([], 0)
        decodes_only = rng.random() < 0.5
        chunks = []
        for sid, (table, length) in list(live.items()):
            if rng.random() < 0.3:
                continue
            n = 1 if decodes_only else int(rng.integers(1, 11))
            need = -(-(length + n) // page_size) - len(table)
            if need > len(free):
                continue
            for _ in range(need):
                page = free.pop()
                seen["recycled"] += page in ever_used
                ever_used.add(page)
                table.append(page)
            chunks.append((length, n, list(table)))
            live[sid] = (table, length + n)
        if not chunks:
            continue
        meta = build_metadata(chunks, page_size, "cpu")
        rows = sum(n for _, n, _ in chunks)
        for layer in range(layers):
            k, v = torch.randn(2, rows, kv_heads, d, generator=gen)
            write_kv_and_summaries(cache, layer, k, v, meta)
        if meta.decode_only:
            seen["decode_only"] += 1
            seen["opened_in_place"] += meta.summary_plan.opened_pages is not None
        else:
            seen["mixed"] += 1
        for table, length in live.values():
            if not length:
                continue
            used = table[:-(-length // page_size)]
            for layer in range(layers):
                kmin, kmax = torch.zeros_like(cache.kmin[layer]), torch.zeros_like(cache.kmax[layer])
                reference.update_page_summaries(kmin, kmax, cache.k[layer], torch.tensor(table), 0, length)
                assert torch.equal(cache.kmin[layer][used], kmin[used]), (step, table, length)
                assert torch.equal(cache.kmax[layer][used], kmax[used]), (step, table, length)
    assert min(seen.values()) > 0, seen


def test_no_summaries_when_sparse_is_off():
    """No summary_tokens: no kmin/kmax, none written, none counted in a page's bytes; sparse
    decode on such a cache is refused with a clear message."""
    cache = PagedKVCache(2, 6, 8, 2, 4, torch.float32, "cpu")
    assert cache.kmin is None and cache.kmax is None and cache.summary_tokens is None
    assert PagedKVCache.bytes_per_page(2, 8, 2, 4, 4) == 2 * 2 * 4 * 4 * (2 * 8)
    assert PagedKVCache.bytes_per_page(2, 8, 2, 4, 4, summary_tokens=2) == 2 * 2 * 4 * 4 * (2 * 8 + 2 * 4 + 2)
    for chunks in ([(0, 5, [1]), (0, 1, [2])], [(5, 1, [1]), (1, 1, [2])]):     # mixed, then decode only
        meta = build_metadata(chunks, 8, "cpu")
        k, v = torch.randn(2, sum(n for _, n, _ in chunks), 2, 4)
        write_kv_and_summaries(cache, 0, k, v, meta)
        assert meta.summary_plan is None
        assert torch.equal(cache.k[0].view(-1, 2, 4)[meta.slots], k)
    meta = build_metadata([(5, 1, [1])], 8, "cpu", SparseSettings(True, 16, 0, 0, 1, 4))
    with pytest.raises(AssertionError, match="needs key summaries"):
        sparse_decode(torch.randn(1, 4, 4), cache, 0, meta, 0.5)


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
    (SparseSettings(True, 64, 2, 16, 16, 3), 30, "summary_tokens 3 must divide kv_cache.page_size 16"),
    (SparseSettings(True, 64, 2, 16, 16, 32), 30, "summary_tokens 32 must divide"),
    (SparseSettings(True, 64, 2, 16, 16, 0), 30, "summary_tokens 0 must divide"),
    (SparseSettings(True, 64, 2, 16, 16, selector="oracle"), 30, "selector 'oracle' must be quest or centroids"),
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
    ({"enabled": True, "summary_tokens": 3}, 16, "models.0",
     "sparse_attention.summary_tokens 3 must divide kv_cache.page_size 16"),
    ({"enabled": True, "summary_tokens": 16, "token_budget": 256}, 8, "models.0",
     "sparse_attention.summary_tokens 16 must divide kv_cache.page_size 8"),
    ({"summary_tokens": 0}, 16, "models.0.sparse_attention.summary_tokens", "greater than or equal"),
    ({"selector": "oracle"}, 16, "models.0.sparse_attention.selector", "'quest' or 'centroids'"),
    ({"enabled": True, "selector": "centroids", "group_tokens": 40}, 16, "models.0",
     "sparse_attention.group_tokens 40 must be a multiple of kv_cache.page_size 16"),
    ({"enabled": True, "selector": "centroids", "centroids": 6}, 16, "models.0",
     "sparse_attention.centroids 6 must be a power of two"),
    ({"centroids": 128}, 16, "models.0.sparse_attention.centroids", "less than or equal"),
    ({"enabled": True, "selector": "centroids", "token_budget": 128}, 16, "models.0",
     "token_budget 128 is 2 groups of 64 tokens; it must exceed the sink + recent groups (2)"),
    ({"enabled": True, "selector": "centroids", "run_tokens": 96}, 16, "models.0",
     "sparse_attention.run_tokens 96 must be a multiple of group_tokens 64"),
    ({"enabled": True, "selector": "centroids", "run_tokens": 192, "group_tokens": 64}, 16, "models.0",
     "power-of-two number of kv_cache.page_size 16 pages"),
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
    settings = SparseSettings(True, sparse.token_budget, sparse.dense_layers, sparse.sink_tokens,
                              sparse.recent_tokens, sparse.summary_tokens)
    assert sa.page_counts(settings, 16) == (4, 1, 1) and sa.summary_blocks(settings, 16) == 4
    for tokens in (1, 16):
        cfg = parse_config({"models": [{"name": "m", "sparse_attention": {"enabled": True, "summary_tokens": tokens}}]})
        assert cfg.models[0].sparse_attention.summary_tokens == tokens


def test_config_defaults_match_runner_defaults():
    """gateway/config.py and backends/base.py document the same defaults."""
    sparse = parse_config({}).models[0].sparse_attention
    assert SparseSettings(sparse.enabled, sparse.token_budget, sparse.dense_layers, sparse.sink_tokens,
                          sparse.recent_tokens, sparse.summary_tokens, sparse.shortlist_tokens, sparse.selector,
                          sparse.centroids, sparse.group_tokens, sparse.run_tokens) == SparseSettings()


@pytest.mark.parametrize("settings, words", [
    (SparseSettings(True, 2048, selector="centroids", group_tokens=40), "group_tokens 40 must be a multiple"),
    (SparseSettings(True, 2048, selector="centroids", group_tokens=8), "group_tokens 8 must be a multiple"),
    (SparseSettings(True, 2048, selector="centroids", centroids=3), "centroids 3 must be a power of two"),
    (SparseSettings(True, 128, selector="centroids"), "token_budget 128 is 2 groups of 64 tokens"),
])
def test_bad_centroid_settings_rejected(settings, words):
    from backends.cuda.attention.centroids import group_counts
    with pytest.raises(ValueError, match=words):
        group_counts(settings, 16)


@pytest.mark.parametrize("run_tokens", [96, 192])
def test_bad_run_tokens_rejected_at_start_up(run_tokens):
    """What the runner checks at start-up (attention/centroids.shortlist_counts), as config does."""
    from backends.cuda.attention.centroids import shortlist_counts
    with pytest.raises(ValueError, match=f"sparse_attention.run_tokens {run_tokens} must be a multiple"):
        shortlist_counts(SparseSettings(True, selector="centroids", run_tokens=run_tokens), 16)
    assert shortlist_counts(SparseSettings(True, selector="centroids", run_tokens=run_tokens, shortlist_tokens=0),
                            16) is None


def test_centroid_shortlist_rounding():
    """Runs kept: shortlist_tokens' worth, at least twice the budget's groups and one more than
    forced; the recent groups' runs (one more when they may start in the run before)."""
    from backends.cuda.attention.centroids import shortlist_counts
    assert shortlist_counts(SparseSettings(True, selector="centroids"), 16) == (16, 32, 1, 1)
    assert shortlist_counts(SparseSettings(True, 8192, selector="centroids"), 16) == (16, 64, 1, 1)
    assert shortlist_counts(SparseSettings(True, 2048, recent_tokens=256, selector="centroids", run_tokens=512),
                            16) == (32, 16, 1, 2)


def test_centroid_group_rounding():
    from backends.cuda.attention.centroids import group_counts
    assert group_counts(SparseSettings(True, selector="centroids"), 16) == (4, 32, 1, 1)
    assert group_counts(SparseSettings(True, 2000, 2, 65, 64, selector="centroids", group_tokens=32), 16) == \
        (2, 62, 3, 2)
