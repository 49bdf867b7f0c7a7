"""The MLX backend's paged attention pieces against kernels/reference.py on random inputs: the paged
decode (MLX-ops mirror, and the Metal kernel where there is a Metal GPU), the key summaries (block
and page), and Quest scoring and page selection, one stage and coarse to fine."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")
import mlx.core as mx  # noqa: E402

from backends.base import SequenceChunk, SparseSettings  # noqa: E402
from backends.mlx.attention import PagedAttention, extend_attention, plan_step  # noqa: E402
from backends.mlx.kv_cache import PagedKVCache  # noqa: E402
from backends.mlx.sparse import choose_pages, quest_scores  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.metal.paged_decode import paged_decode_metal, paged_decode_ops  # noqa: E402

PAGE, KV_HEADS, HEADS, D, PAGES = 8, 2, 6, 32, 48
SPARSE = SparseSettings(enabled=True, token_budget=6 * PAGE, dense_layers=0, sink_tokens=PAGE,
                        recent_tokens=PAGE, summary_tokens=4)
SCALE = D ** -0.5


def random_cache(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (PAGES + 1, PAGE, KV_HEADS, D)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def as_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy())


def tables_and_lengths(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pages = rng.permutation(PAGES)
    out, at = [], 0
    for n in lengths:
        used = -(-n // PAGE)
        out.append(pages[at:at + used].tolist())
        at += used
    return out


def test_write_and_summaries_match_reference():
    k_ref, v_ref = torch.zeros(PAGES + 1, PAGE, KV_HEADS, D), torch.zeros(PAGES + 1, PAGE, KV_HEADS, D)
    kmin_ref, kmax_ref = torch.zeros(PAGES + 1, 2, KV_HEADS, D), torch.zeros(PAGES + 1, 2, KV_HEADS, D)
    pmin_ref, pmax_ref = torch.zeros(PAGES + 1, KV_HEADS, D), torch.zeros(PAGES + 1, KV_HEADS, D)
    cache = PagedKVCache(1, PAGES, PAGE, KV_HEADS, D, mx.float32, summary_tokens=4)
    tables = tables_and_lengths(1, [21, 13])
    g = torch.Generator().manual_seed(2)
    # a prefill of two sequences, then a decode token for each, then a 3-token extend of the first
    for starts, counts in (([0, 0], [18, 13]), ([18, 13], [1, 1]), ([19], [2])):
        chunks = [SequenceChunk([1] * n, s, tables[i], seq_slot=i)
                  for i, (s, n) in enumerate(zip(starts, counts, strict=True))]
        rows = np.full((len(chunks), PAGES), PAGES, dtype=np.int32)
        for i, c in enumerate(chunks):
            rows[i, :len(c.page_table)] = c.page_table
        step = plan_step(chunks, rows, PAGE, PAGES, SPARSE)
        k = torch.randn(sum(counts), KV_HEADS, D, generator=g)
        v = torch.randn(sum(counts), KV_HEADS, D, generator=g)
        cache.write(0, step.slots, as_mx(k), as_mx(v))
        cache.update_summaries(0, step.summary_pages, step.summary_unwritten)
        at = 0
        for i, (s, n) in enumerate(zip(starts, counts, strict=True)):
            table = torch.tensor(tables[i])
            reference.write_kv(k_ref, v_ref, table, s, k[at:at + n], v[at:at + n])
            reference.update_page_summaries(kmin_ref, kmax_ref, k_ref, table, s, s + n, pmin_ref, pmax_ref)
            at += n
    np.testing.assert_array_equal(np.array(cache.k[0]).reshape(k_ref.shape), k_ref.numpy())
    np.testing.assert_array_equal(np.array(cache.v[0]).reshape(v_ref.shape), v_ref.numpy())
    np.testing.assert_array_equal(np.array(cache.kmin[0]), kmin_ref.numpy())
    np.testing.assert_array_equal(np.array(cache.kmax[0]), kmax_ref.numpy())
    np.testing.assert_array_equal(np.array(cache.pmin[0]), pmin_ref.numpy())
    np.testing.assert_array_equal(np.array(cache.pmax[0]), pmax_ref.numpy())


def dense_case(seed: int):
    k, v = random_cache(seed)
    lengths = [37, 5, 64, 16]
    tables = tables_and_lengths(seed, lengths)
    width = max(len(t) for t in tables)
    pages = np.array([t + [PAGES] * (width - len(t)) for t in tables], dtype=np.int32)
    q = torch.randn(len(lengths), HEADS, D, generator=torch.Generator().manual_seed(seed + 1))
    want = torch.stack([reference.paged_attention(q[i:i + 1], k, v, torch.tensor(tables[i]), n - 1, SCALE)[0]
                        for i, n in enumerate(lengths)])
    per_head = np.repeat(pages[:, None, :], KV_HEADS, axis=1)
    per_head_lengths = np.repeat(np.array(lengths, dtype=np.int32)[:, None], KV_HEADS, axis=1)
    args = (as_mx(q), as_mx(k).reshape(-1, KV_HEADS, D), as_mx(v).reshape(-1, KV_HEADS, D), mx.array(per_head),
            mx.array(per_head_lengths), PAGE, SCALE)
    return args, want.numpy()


def test_dense_paged_decode_ops_matches_reference():
    args, want = dense_case(3)
    np.testing.assert_allclose(np.array(paged_decode_ops(*args)), want, atol=2e-5)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs MLX on a Metal GPU (Apple silicon); "
                    "elsewhere the MLX-ops mirror runs and is tested")
def test_metal_paged_decode_matches_reference_and_ops():
    args, want = dense_case(4)
    with mx.stream(mx.gpu):
        got = np.array(paged_decode_metal(*args))
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got, np.array(paged_decode_ops(*args)), atol=2e-5)


def test_extend_attention_matches_reference():
    k, v = random_cache(5)
    table = tables_and_lengths(5, [45])[0]
    q = torch.randn(12, HEADS, D, generator=torch.Generator().manual_seed(6))
    want = reference.paged_attention(q, k, v, torch.tensor(table), 33, SCALE)
    from backends.mlx.attention import Extend
    ext = Extend(0, 12, 33, mx.array(np.array(table, dtype=np.int32)))
    got = extend_attention(as_mx(q), as_mx(k).reshape(-1, KV_HEADS, D), as_mx(v).reshape(-1, KV_HEADS, D), ext,
                           PAGE, SCALE)
    np.testing.assert_allclose(np.array(got), want.numpy(), atol=2e-5)


def sparse_cache(k: torch.Tensor, v: torch.Tensor, tables: list[list[int]], lengths: list[int]):
    """The reference's summaries of these sequences, and a one-layer MLX cache holding the same."""
    kmin, kmax = torch.zeros(PAGES + 1, 2, KV_HEADS, D), torch.zeros(PAGES + 1, 2, KV_HEADS, D)
    pmin, pmax = torch.zeros(PAGES + 1, KV_HEADS, D), torch.zeros(PAGES + 1, KV_HEADS, D)
    for table, n in zip(tables, lengths, strict=True):
        reference.update_page_summaries(kmin, kmax, k, torch.tensor(table), 0, n, pmin, pmax)
    cache = PagedKVCache(1, PAGES, PAGE, KV_HEADS, D, mx.float32, summary_tokens=4)
    cache.k[0], cache.v[0] = as_mx(k).reshape(-1, KV_HEADS, D), as_mx(v).reshape(-1, KV_HEADS, D)
    cache.kmin[0], cache.kmax[0], cache.pmin[0], cache.pmax[0] = map(as_mx, (kmin, kmax, pmin, pmax))
    return cache, (kmin, kmax, pmin, pmax)


@pytest.mark.parametrize("shortlist_factor", [0, 2])      # shortlist_tokens: this many budgets' worth
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_quest_selection_and_sparse_decode_match_reference(seed, shortlist_factor):
    """Rows past the budget choose the same pages per KV head as kernels/reference.py and
    PagedAttention's sparse decode returns reference.sparse_paged_decode's output (rows within the
    budget: reference dense attention). With shortlist_factor 2 the step is coarse to fine: the
    19- and 13-page rows are past the 12-page shortlist, the 9-page row is past the budget of 6
    but within the shortlist (the reference scores it in one stage)."""
    sparse = dataclasses.replace(SPARSE, shortlist_tokens=shortlist_factor * SPARSE.token_budget)
    k, v = random_cache(seed)
    lengths = [150, 99, 30, 70]                  # 19, 13, 4 (within the budget) and 9 pages
    tables = tables_and_lengths(seed, lengths)
    cache, (kmin, kmax, pmin, pmax) = sparse_cache(k, v, tables, lengths)
    q = torch.randn(len(lengths), HEADS, D, generator=torch.Generator().manual_seed(seed + 10))
    rows = np.full((len(lengths), PAGES), PAGES, dtype=np.int32)
    for i, t in enumerate(tables):
        rows[i, :len(t)] = t
    chunks = [SequenceChunk([1], n - 1, tables[i], seq_slot=i) for i, n in enumerate(lengths)]
    step = plan_step(chunks, rows, PAGE, PAGES, sparse)
    plan = step.quest
    assert plan is not None and np.array(plan.sparse_rows).tolist() == [0, 1, 3]
    budget, sink, recent = reference.sparse_page_counts(PAGE, sparse.token_budget, sparse.sink_tokens,
                                                        sparse.recent_tokens)
    assert plan.shortlist_pages == shortlist_factor * budget     # the coarse stage runs (or is off)
    qs = as_mx(q)[plan.sparse_rows]
    chosen = choose_pages(qs, cache.kmin[0], cache.kmax[0], cache.pmin[0], cache.pmax[0], plan, SCALE)
    attention = PagedAttention(cache, HEADS, D, paged_decode_ops, sparse)
    attention.plan(step)
    out = np.array(attention.sparse_decode(0, as_mx(q)))
    two_stage_differs = False
    for r, row in enumerate(np.array(plan.sparse_rows).tolist()):
        table, n = torch.tensor(tables[row]), lengths[row]
        one_stage = reference.select_pages(reference.quest_page_scores(q[row], kmin, kmax, table, n, PAGE, SCALE),
                                           budget, sink, recent)
        want_pages = one_stage
        if plan.shortlist_pages and len(tables[row]) > plan.shortlist_pages:
            want_scores = reference.shortlist_page_scores(q[row], kmin, kmax, pmin, pmax, table, n, PAGE,
                                                          plan.shortlist_pages, sink, recent, SCALE)
            want_pages = reference.select_pages(want_scores, budget, sink, recent)
            two_stage_differs |= bool((want_pages != one_stage).any())
        assert np.array(chosen[r]).tolist() == want_pages.tolist()
        want_out, _ = reference.sparse_paged_decode(q[row], k, v, kmin, kmax, table, n, SCALE, sparse.token_budget,
                                                    sparse.sink_tokens, sparse.recent_tokens, pmin, pmax,
                                                    sparse.shortlist_tokens)
        np.testing.assert_allclose(out[row], want_out.numpy(), atol=2e-5)
    # on these seeds the shortlist changes the 19-page row's choice: matching it means it ran
    assert two_stage_differs == bool(shortlist_factor)
    want_dense = reference.paged_attention(q[2:3], k, v, torch.tensor(tables[2]), lengths[2] - 1, SCALE)[0]
    np.testing.assert_allclose(out[2], want_dense.numpy(), atol=2e-5)


def test_one_stage_scores_match_reference():
    """quest_scores (the scoring both stages share) equals reference.quest_page_scores per page."""
    k, v = random_cache(11)
    lengths = [150, 99]
    tables = tables_and_lengths(11, lengths)
    cache, (kmin, kmax, _, _) = sparse_cache(k, v, tables, lengths)
    q = torch.randn(len(lengths), HEADS, D, generator=torch.Generator().manual_seed(12))
    rows = np.full((len(lengths), PAGES), PAGES, dtype=np.int32)
    for i, t in enumerate(tables):
        rows[i, :len(t)] = t
    chunks = [SequenceChunk([1], n - 1, tables[i], seq_slot=i) for i, n in enumerate(lengths)]
    plan = plan_step(chunks, rows, PAGE, PAGES, SPARSE).quest
    scores = quest_scores(as_mx(q), cache.kmin[0][plan.sparse_pages], cache.kmax[0][plan.sparse_pages],
                          plan.unwritten, SCALE)
    for r, n in enumerate(lengths):
        want = reference.quest_page_scores(q[r], kmin, kmax, torch.tensor(tables[r]), n, PAGE, SCALE)
        np.testing.assert_allclose(np.array(scores[r])[:, :want.shape[1]], want.numpy(), atol=1e-4)
