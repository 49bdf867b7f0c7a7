"""The centroid selector on the MLX backend (backends/mlx/centroids.py) against
kernels/centroid_reference.py: the pages chosen (one stage, and coarse to fine on data where the
shortlist changes the long rows' choice), the attention over them, the tie rule, the summaries the
MLX upkeep writes, their round trip through the host tier (the torch store's page bytes), the
embedded model decoding through the MLX runner as the torch runner does with the same selector,
and budgets per (layer, KV head) (sparse_attention.head_budgets): each head's pages and attention
as centroid_select_pages(head_budgets=...) chooses them, the pages counted exactly, a table that
does not fit the model refused at start-up.

Tiny shapes: MLX runs on the CPU here. Groups of 2 pages of 4 tokens, 4 centroids; coarse to fine
over runs of 4 groups with 3 runs shortlisted (the least the rule allows: twice the budget's groups),
so that one run beside the forced sink and recent runs is free and long rows choose otherwise than
in one stage.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")
import mlx.core as mx  # noqa: E402

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings  # noqa: E402
from backends.cuda.attention.centroids import completed_groups, count_group_pages, shortlist_counts  # noqa: E402
from backends.cuda.kv_cache import PagedKVCache as TorchCache  # noqa: E402
from backends.cuda.kv_store import TorchKVStore  # noqa: E402
from backends.cuda.kv_store import create_kv_store as create_torch_store  # noqa: E402
from backends.head_budgets import HeadGroups, head_groups, read_weights  # noqa: E402
from backends.kv_store import Tier  # noqa: E402
from backends.mlx.attention import PagedAttention, plan_step  # noqa: E402
from backends.mlx.centroids import (  # noqa: E402
    best_units,
    centroid_budgets,
    choose_pages,
    chosen_lists,
    write_group_summaries,
)
from backends.mlx.kv_cache import PagedKVCache  # noqa: E402
from backends.mlx.kv_store import MlxKVStore, create_kv_store  # noqa: E402
from backends.sampling_params import SamplingParams  # noqa: E402
from kernels import centroid_reference as cref  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.metal.paged_decode import paged_decode_ops  # noqa: E402

PAGE, GROUP_PAGES, RUN_PAGES, CLUSTERS = 4, 2, 8, 4
SPAN = PAGE * GROUP_PAGES
KV_HEADS, HEADS, D, PAGES = 2, 6, 16, 136
SCALE = D ** -0.5
# 8 and 4 runs (longer than the shortlist), 5 groups (within the budget: dense), 10 groups in 3
# runs (past the budget, within the shortlist), 5 groups ending on a group boundary (dense)
LENGTHS = [30 * SPAN + 3, 14 * SPAN + 2, 4 * SPAN + 1, 9 * SPAN + 6, 5 * SPAN]
ONE_STAGE = SparseSettings(True, token_budget=5 * SPAN, dense_layers=0, sink_tokens=SPAN, recent_tokens=SPAN,
                           shortlist_tokens=0, selector="centroids", centroids=CLUSTERS, group_tokens=SPAN)
SHORTLIST = dataclasses.replace(ONE_STAGE, shortlist_tokens=3 * RUN_PAGES * PAGE, run_tokens=RUN_PAGES * PAGE)


def as_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy())


def shuffled_tables(seed: int, lengths: list[int]) -> list[list[int]]:
    pages = np.random.default_rng(seed).permutation(PAGES).tolist()
    out, at = [], 0
    for n in lengths:
        out.append(pages[at:at + -(-n // PAGE)])
        at += len(out[-1])
    return out


def reference_case(seed: int, runs: bool, lengths: list[int] = LENGTHS, layers: int = 1):
    """K/V with structure per page (so groups differ) on shuffled pages, the reference's summaries
    of the groups (runs) complete before each row's last token, and an MLX cache holding the same
    bytes in each of its layers."""
    g = torch.Generator().manual_seed(seed)
    shape = (PAGES + 1, PAGE, KV_HEADS, D)
    k = torch.randn(shape, generator=g) + torch.randn(PAGES + 1, 1, KV_HEADS, D, generator=g) * 2
    v = torch.randn(shape, generator=g)
    tables = shuffled_tables(seed, lengths)
    summaries = {}
    for name, unit_pages in [("groups", GROUP_PAGES)] + ([("runs", RUN_PAGES)] if runs else []):
        cents = torch.zeros(PAGES + 1, KV_HEADS, CLUSTERS, D, dtype=torch.float8_e4m3fn)
        stats = torch.zeros(PAGES + 1, KV_HEADS, CLUSTERS, 2)
        for table, n in zip(tables, lengths, strict=True):
            cref.centroid_group_summaries(k, cents, stats, torch.tensor(table), n - 1, PAGE, unit_pages)
        summaries[name] = cents, stats
    cache = PagedKVCache(layers, PAGES, PAGE, KV_HEADS, D, mx.float32,
                         centroids=(CLUSTERS, GROUP_PAGES, RUN_PAGES if runs else None))
    for layer in range(layers):
        cache.k[layer], cache.v[layer] = as_mx(k).reshape(-1, KV_HEADS, D), as_mx(v).reshape(-1, KV_HEADS, D)
        cache.cents[layer] = as_mx(summaries["groups"][0].view(torch.uint8))
        cache.cstats[layer] = as_mx(summaries["groups"][1])
        if runs:
            cache.run_cents[layer] = as_mx(summaries["runs"][0].view(torch.uint8))
            cache.run_cstats[layer] = as_mx(summaries["runs"][1])
    return cache, k, v, tables, summaries


def decode_step(tables: list[list[int]], settings: SparseSettings, lengths: list[int] = LENGTHS, layers: int = 1):
    """One decode step of every row, planned as the runner plans it (the counts built once first)."""
    rows = np.full((len(tables), PAGES), PAGES, dtype=np.int32)
    for i, t in enumerate(tables):
        rows[i, :len(t)] = t
    chunks = [SequenceChunk([1], n - 1, tables[i], seq_slot=i) for i, n in enumerate(lengths)]
    budgets = centroid_budgets(settings, PAGE, layers, KV_HEADS, head_groups(settings, layers, KV_HEADS))
    return plan_step(chunks, rows, PAGE, PAGES, settings, budgets)


def reference_pages(q, summaries, table, n, settings, head_counts: tuple[int, ...] | None = None):
    """centroid_select_pages's pages per KV head; with head_counts (groups per KV head of one layer)
    each head's own list, the layer's largest count as the budget (it sizes the shortlist)."""
    shortlist = None
    if settings.shortlist_tokens:
        shortlist = cref.CentroidShortlist(*summaries["runs"], RUN_PAGES, settings.shortlist_tokens)
    budget = settings.token_budget if head_counts is None else max(head_counts) * SPAN
    return cref.centroid_select_pages(q, *summaries["groups"], torch.tensor(table), n, PAGE, GROUP_PAGES, SCALE,
                                      budget, settings.sink_tokens, settings.recent_tokens, shortlist=shortlist,
                                      head_budgets=None if head_counts is None else [c * SPAN for c in head_counts])


@pytest.mark.parametrize("settings", [ONE_STAGE, SHORTLIST], ids=["one stage", "coarse to fine"])
@pytest.mark.parametrize("seed", [1, 2])
def test_choice_and_decode_match_the_reference(seed, settings):
    """Rows past the budget choose centroid_select_pages's pages per KV head (the MLX list runs on
    past the sequence only inside its last group, where attention stops) and PagedAttention's
    sparse decode returns reference.attend_pages's output over them; rows within the budget are
    dense. Coarse to fine, the two rows longer than the shortlist choose otherwise than in one
    stage (so matching the reference checks the coarse stage) and the others do not."""
    runs = settings.shortlist_tokens > 0
    cache, k, v, tables, summaries = reference_case(seed, runs)
    q = torch.randn(len(LENGTHS), HEADS, D, generator=torch.Generator().manual_seed(seed + 10))
    step = decode_step(tables, settings)
    plan = step.centroids
    assert step.quest is None and plan is not None and np.array(plan.sparse_rows).tolist() == [0, 1, 3]
    assert (plan.shortlist is not None) == runs
    chosen = np.array(choose_pages(as_mx(q)[plan.sparse_rows], cache, 0, plan, SCALE))
    attention = PagedAttention(cache, HEADS, D, paged_decode_ops, settings)
    attention.plan(step)
    out = np.array(attention.sparse_decode(0, as_mx(q)))
    keep = shortlist_counts(SHORTLIST, PAGE)[1]
    changed = []            # the rows whose choice the shortlist changes
    for r, row in enumerate(np.array(plan.sparse_rows).tolist()):
        n, table = LENGTHS[row], tables[row]
        want = reference_pages(q[row], summaries, table, n, settings)
        assert chosen[r].shape == (KV_HEADS, 5 * GROUP_PAGES)
        assert chosen[r][:, :want.shape[1]].tolist() == want.tolist(), row
        assert (chosen[r][:, want.shape[1]:] >= len(table)).all()            # the last group's pages past the end
        if runs:
            if not torch.equal(want, reference_pages(q[row], summaries, table, n, ONE_STAGE)):
                changed.append(row)
        want_out = reference.attend_pages(q[row], k, v, torch.tensor(table), n, want, SCALE)
        np.testing.assert_allclose(out[row], want_out.numpy(), atol=2e-5)
    if runs:    # only rows of more runs than the shortlist keeps can change; on these seeds the longest does
        assert 0 in changed and all(-(-LENGTHS[row] // (RUN_PAGES * PAGE)) > keep for row in changed), changed
    for row in (2, 4):
        want_dense = reference.paged_attention(q[row:row + 1], k, v, torch.tensor(tables[row]), LENGTHS[row] - 1,
                                               SCALE)[0]
        np.testing.assert_allclose(out[row], want_dense.numpy(), atol=2e-5)
    # pages read and skipped over the KV heads (one layer): whole groups, a chosen last group partial
    dropped = [max(0, -(-n // SPAN) - 5) * GROUP_PAGES for n in LENGTHS]
    read = sum(-(-n // PAGE) for n in LENGTHS) - sum(dropped)
    assert (plan.stats.pages_read, plan.stats.pages_skipped) == (read * KV_HEADS, sum(dropped) * KV_HEADS)
    assert count_group_pages(LENGTHS, PAGE, GROUP_PAGES, 5) == (read, sum(dropped))


def test_equal_scores_go_to_the_lower_index():
    """best_units keeps the forced units (+inf bias, even over an unscored -inf score), never a unit
    past the row (-inf bias), and among equal scores the lower index, as the kernels' selection
    does (the reference's torch.topk leaves that order open)."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, (4, KV_HEADS, 24)).astype(np.float32)        # many exact ties
    scores[..., 23] = -np.inf                                                # the unscored last unit
    bias = np.zeros((4, 1, 24), np.float32)
    bias[..., [0, 23]] = np.inf
    bias[1, :, 20:] = -np.inf                                                # a shorter row
    bias[1, :, 19] = np.inf
    keep, unit_pages = 7, 2
    got = np.array(best_units(mx.array(scores), mx.array(bias), keep, unit_pages, keep))
    ranked = np.where(bias == 0, scores, bias)
    for b in range(4):
        for h in range(KV_HEADS):
            units = np.sort(np.lexsort((np.arange(24), -ranked[b, h]))[:keep])    # by score, then index
            assert got[b, h].tolist() == (units[:, None] * unit_pages + np.arange(unit_pages)).ravel().tolist()


@pytest.mark.parametrize("runs", [False, True])
def test_upkeep_writes_the_reference_summaries(runs):
    """Prefill chunks of several sizes and decodes: after each step every group (run) the sequence
    has completed holds centroid_reference.centroid_group_summaries's summary of its keys, at its
    last page of a shuffled table, in every layer, and no other page holds one. Bytes and log
    counts are equal; spreads to float32 rounding (a run's 32 keys take torch.cdist's matmul form,
    whose sums MLX orders otherwise)."""
    layers = 2
    cache = PagedKVCache(layers, PAGES, PAGE, KV_HEADS, D, mx.float32,
                         centroids=(CLUSTERS, GROUP_PAGES, RUN_PAGES if runs else None))
    table = shuffled_tables(5, [PAGES * PAGE])[0]
    k_ref = [torch.zeros(PAGES + 1, PAGE, KV_HEADS, D) for _ in range(layers)]
    g = torch.Generator().manual_seed(6)
    written = 0
    for count in [13, 1, 1, 2, 9, 1, 1, 1, 16, 3, 1, 19]:
        positions = np.arange(written, written + count)
        slots = mx.array((np.array(table)[positions // PAGE] * PAGE + positions % PAGE).astype(np.int32))
        for layer in range(layers):
            k = torch.randn(count, KV_HEADS, D, generator=g) + layer
            cache.write(layer, slots, as_mx(k), as_mx(k))
            reference.write_kv(k_ref[layer], torch.zeros_like(k_ref[layer]), torch.tensor(table), written, k, k)
        chunk = [(written, count, table)]
        write_group_summaries(cache, completed_groups(chunk, PAGE, GROUP_PAGES))
        if runs:
            write_group_summaries(cache, completed_groups(chunk, PAGE, RUN_PAGES), runs=True)
        mx.eval(cache.arrays())
        written += count
        stores = [(cache.cents, cache.cstats, GROUP_PAGES)] + ([(cache.run_cents, cache.run_cstats, RUN_PAGES)]
                                                              if runs else [])
        for cents, cstats, unit_pages in stores:
            for layer in range(layers):
                want_cents = torch.zeros(PAGES + 1, KV_HEADS, CLUSTERS, D, dtype=torch.float8_e4m3fn)
                want_stats = torch.zeros(PAGES + 1, KV_HEADS, CLUSTERS, 2)
                cref.centroid_group_summaries(k_ref[layer], want_cents, want_stats, torch.tensor(table), written,
                                              PAGE, unit_pages)
                np.testing.assert_array_equal(np.array(cents[layer]), want_cents.view(torch.uint8).numpy())
                got_stats = np.array(cstats[layer])
                np.testing.assert_array_equal(got_stats[..., 0], want_stats[..., 0].numpy())
                np.testing.assert_allclose(got_stats[..., 1], want_stats[..., 1].numpy(), rtol=1e-5, atol=0)
    assert written // (RUN_PAGES * PAGE) >= 2


@pytest.mark.parametrize("runs", [False, True])
def test_host_tier_carries_the_summaries_as_the_torch_store(runs):
    """A page's K/V and centroid summaries go to the host tier and back to another page unchanged,
    its host bytes are the torch store's for the same page (the same layout, e4m3 centroids as
    their bytes), and the L3 layout key names the centroids as the torch store does."""
    cache, *_ = reference_case(seed=4, runs=runs)
    torch_cache = TorchCache(1, PAGES, PAGE, KV_HEADS, D, torch.float32, "cpu",
                             centroids=(CLUSTERS, GROUP_PAGES, RUN_PAGES if runs else None))
    for part, torch_part in zip(cache.page_parts(), torch_cache.page_parts(), strict=True):
        flat = torch_part[0].view(torch.uint8) if torch_part.element_size() == 1 else torch_part[0]
        flat.copy_(torch.from_numpy(np.array(part[0])).view(flat.shape))
    settings = RunnerSettings("random", "tiny", "tiny", page_size=PAGE, host_cache_bytes=1 << 20)
    store = create_kv_store(settings, cache, "float32", "mlx_ops")
    torch_store = create_torch_store(settings, torch_cache, "float32", "torch")
    assert isinstance(store, MlxKVStore) and isinstance(torch_store, TorchKVStore)
    assert store.layout.centroids == torch_store.layout.centroids == f"{CLUSTERS}x{GROUP_PAGES}" + (
        f"+runs{RUN_PAGES}" if runs else "")
    assert store.page_bytes == torch_store.page_bytes == PagedKVCache.bytes_per_page(
        1, PAGE, KV_HEADS, D, 4, centroids=CLUSTERS, runs=runs)
    last = shuffled_tables(4, LENGTHS)[0][RUN_PAGES - 1]          # a run's last page is its last group's too
    assert float(np.abs(np.array(cache.cstats[0][last])).sum()) > 0
    store.copy_pages(Tier.DEVICE, Tier.HOST, [last], [3]).wait()
    torch_store.copy_pages(Tier.DEVICE, Tier.HOST, [last], [3]).wait()
    assert bytes(store.read_host_page(3)) == bytes(torch_store.read_host_page(3))
    before = [np.array(part[0][last]) for part in cache.page_parts()[2:]]
    spare = PAGES - 1
    store.copy_pages(Tier.HOST, Tier.DEVICE, [3], [spare]).wait()
    after = [np.array(part[0][spare]) for part in cache.page_parts()[2:]]
    assert len(after) == (4 if runs else 2)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    slots = slice(last * PAGE, (last + 1) * PAGE), slice(spare * PAGE, (spare + 1) * PAGE)
    assert np.array_equal(np.array(cache.k[0][slots[0]]), np.array(cache.k[0][slots[1]]))


# ---- budgets per (layer, KV head) ---------------------------------------------------------------

# three sparse layers of the two KV heads, mean 1: of the budget's 5 groups layer 0's heads keep 4
# and 6, layer 1's 6 and 4, layer 2's 5 each (the fewest 4; the largest 6, which the shortlist's 3
# runs of 4 groups hold twice, as head_groups requires)
HEAD_WEIGHTS = ((0, (0.8, 1.2)), (1, (1.2, 0.8)), (2, (1.0, 1.0)))
HEAD_COUNTS = {0: (4, 6), 1: (6, 4), 2: (5, 5)}
# LENGTHS and a row of 3 groups, within the fewest count (dense in every layer); the rows of 5
# groups are sparse, cut by a head of 4 and kept whole by a head of 5 or 6 in the same layer
TABLE_LENGTHS = [*LENGTHS, 2 * SPAN + 5]


@pytest.mark.parametrize("settings", [ONE_STAGE, SHORTLIST], ids=["one stage", "coarse to fine"])
@pytest.mark.parametrize("seed", [1, 2])
def test_head_budgets_choose_attend_and_count_as_the_reference(seed, settings):
    """With a per-head table, every sparse layer chooses each KV head's pages of
    centroid_select_pages(head_budgets=...) first in the head's list (padded to the layer's largest
    head), reads exactly their tokens (its virtual length), and PagedAttention's sparse decode
    returns reference.attend_pages's output over them head by head; the row within the fewest count
    decodes densely. The plan's pages read are those lists' pages summed over every layer, KV head
    and row (a dense row's every page), the rest of the rows' pages skipped. Coarse to fine, the
    long rows choose among shortlists sized by each layer's largest head, as the reference's."""
    settings = dataclasses.replace(settings, head_budget_weights=HEAD_WEIGHTS)
    layers = len(HEAD_COUNTS)
    assert head_groups(settings, layers, KV_HEADS) == HeadGroups(HEAD_COUNTS)
    runs = settings.shortlist_tokens > 0
    cache, k, v, tables, summaries = reference_case(seed, runs, TABLE_LENGTHS, layers)
    q = torch.randn(len(TABLE_LENGTHS), HEADS, D, generator=torch.Generator().manual_seed(seed + 10))
    step = decode_step(tables, settings, TABLE_LENGTHS, layers)
    plan = step.centroids
    sparse_rows = np.array(plan.sparse_rows).tolist()
    assert sparse_rows == [0, 1, 2, 3, 4] and (plan.shortlist is not None) == runs
    attention = PagedAttention(cache, HEADS, D, paged_decode_ops, settings)
    attention.plan(step)
    group = HEADS // KV_HEADS
    read = covered_and_cut = 0
    for layer, counts in HEAD_COUNTS.items():
        chosen = choose_pages(as_mx(q)[plan.sparse_rows], cache, layer, plan, SCALE)
        lengths = np.array(chosen_lists(plan, chosen, layer)[1])
        chosen = np.array(chosen)
        assert chosen.shape == (len(sparse_rows), KV_HEADS, max(counts) * GROUP_PAGES)
        out = np.array(attention.sparse_decode(layer, as_mx(q)))
        for r, row in enumerate(sparse_rows):
            n, table = TABLE_LENGTHS[row], tables[row]
            covered_and_cut += min(counts) < -(-n // SPAN) <= max(counts)
            for h, pages in enumerate(reference_pages(q[row], summaries, table, n, settings, counts)):
                assert chosen[r, h, :len(pages)].tolist() == pages.tolist(), (layer, row, h)
                # the tokens of the head's own pages, the last one's up to the row's end
                assert lengths[r, h] == sum(min(PAGE, n - p * PAGE) for p in pages.tolist()), (layer, row, h)
                heads = slice(h * group, (h + 1) * group)
                want = reference.attend_pages(q[row, heads], k[:, :, h:h + 1], v[:, :, h:h + 1], torch.tensor(table),
                                              n, pages[None], SCALE)
                np.testing.assert_allclose(out[row, heads], want.numpy(), atol=2e-5, err_msg=f"{layer, row, h}")
                read += len(pages)
        dense = TABLE_LENGTHS[5]
        want_dense = reference.paged_attention(q[5:6], k, v, torch.tensor(tables[5]), dense - 1, SCALE)[0]
        np.testing.assert_allclose(out[5], want_dense.numpy(), atol=2e-5)
        read += KV_HEADS * -(-dense // PAGE)
    assert covered_and_cut == 4             # the rows of 5 groups in layers 0 and 1
    every = layers * KV_HEADS * sum(-(-n // PAGE) for n in TABLE_LENGTHS)
    assert (plan.stats.pages_read, plan.stats.pages_skipped) == (read, every - read)


def test_head_budgets_of_equal_weights_choose_as_the_uniform_budget():
    """A table whose every weight is 1 keeps the budget in every head: the same pages, virtual
    lengths and page counts as no table, coarse to fine, on the same plan layout."""
    settings = SHORTLIST
    equal = dataclasses.replace(settings, head_budget_weights=tuple((layer, (1.0,) * KV_HEADS) for layer in range(2)))
    cache, _, _, tables, _ = reference_case(3, True, layers=2)
    q = as_mx(torch.randn(len(LENGTHS), HEADS, D, generator=torch.Generator().manual_seed(13)))
    plans = [decode_step(tables, s, layers=2).centroids for s in (settings, equal)]
    assert plans[0].stats == plans[1].stats
    for layer in range(2):
        lists = [chosen_lists(plan, choose_pages(q[plan.sparse_rows], cache, layer, plan, SCALE), layer)
                 for plan in plans]
        for uniform, table in zip(*lists, strict=True):
            np.testing.assert_array_equal(np.array(uniform), np.array(table))


# ---- the embedded model through the runner -----------------------------------------------------

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
           "polished the great lens and wrote the weather in a worn leather logbook. Ships passing the "
           "rocky headland relied on the steady beam to find the harbour entrance, and the keeper took "
           "pride in never letting the light fail, not even during the worst winter storms. ")
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
GREEDY_GAP = 0.5        # as tests/test_mlx_model.py: a differing pick must be a near tie of the torch run


def greedy_batch(runner, prompts: list[list[int]], tables: list[list[int]], steps: int):
    """Every prompt prefilled in one batch, then `steps` - 1 batched greedy decodes -> (tokens [B][steps],
    logits [steps, B, vocab], (pages read, skipped) of each decode step)."""
    def chunks(tokens: list[list[int]], starts: list[int]) -> ForwardBatch:
        return ForwardBatch([SequenceChunk(t, s, table, seq_slot=i, table_epoch=1, sample=GREEDY)
                             for i, (t, s, table) in enumerate(zip(tokens, starts, tables, strict=True))],
                            return_logits=True)

    result = runner.forward(chunks(prompts, [0] * len(prompts)))
    tokens, logits, stats = [[t.token_id] for t in result.tokens], [result.logits], []
    for i in range(steps - 1):
        result = runner.forward(chunks([[seq[-1]] for seq in tokens], [len(p) + i for p in prompts]))
        for seq, drawn in zip(tokens, result.tokens, strict=True):
            seq.append(drawn.token_id)
        logits.append(result.logits)
        stats.append((result.attention.pages_read, result.attention.pages_skipped))
    return tokens, np.stack(logits), stats


def assert_greedy_alike(got, got_logits, want, want_logits, steps: int) -> None:
    """MLX's greedy rows against torch's: the same tokens but for a pick at a near tie (within
    GREEDY_GAP of torch's max), and the same logits for every step fed the same tokens (after a
    near tie the runs are different texts)."""
    for row, (got_row, want_row) in enumerate(zip(got, want, strict=True)):
        end = steps
        if got_row != want_row:
            end = next(i for i, (a, b) in enumerate(zip(got_row, want_row, strict=True)) if a != b)
            gap = float(want_logits[end, row].max() - want_logits[end, row, got_row[end]])
            assert gap <= GREEDY_GAP, f"row {row} step {end}: MLX picked {got_row[end]}, {gap:.3f} below torch's max"
        np.testing.assert_allclose(got_logits[:end + 1, row], want_logits[:end + 1, row], atol=0.01, rtol=0)


def test_embedded_model_decodes_as_the_torch_runner():
    """SmolLM2-135M with selector: centroids, coarse to fine, at sizes MLX's CPU prefills quickly:
    pages of 8 tokens, groups of one page, 4 in the budget, runs of 2 groups with 4 shortlisted.
    One batch of a 77-token prompt (5 runs: every decode runs both stages), a 50-token one (past
    the budget, its own shortlist) and a 20-token one (within the budget: dense); the decode
    completes a group and a run of the longest, so the upkeep runs between decode steps too. The
    MLX runner decodes torch's greedy tokens (a differing pick only at a near tie, as the dense MLX
    test allows) with its logits and page counts, and every completed group and run holds the
    reference's summary of the MLX cache's own keys."""
    from backends.cuda.runner import TorchRunner
    from backends.mlx.runner import MlxRunner
    from backends.source import resolve_source
    from gateway.templating import load_tokenizer

    source = resolve_source("packaged:smollm2-135m-instruct")
    long = load_tokenizer(source).encode(PASSAGE + "Where did the keeper record the weather?")
    prompts = [long, long[:50], long[:20]]
    page, run = 8, 16
    assert 4 * run < len(long) <= 5 * run
    steps = run - len(long) % run + 2              # the decode completes the longest prompt's last run
    sparse = SparseSettings(True, token_budget=4 * page, dense_layers=2, sink_tokens=page, recent_tokens=page,
                            shortlist_tokens=2 * run, selector="centroids", centroids=4, group_tokens=page,
                            run_tokens=run)
    assert shortlist_counts(sparse, page)[1] == 4 and 50 + steps <= 4 * run and 20 + steps <= 4 * page
    used = [-(-(len(p) + steps) // page) for p in prompts]
    tables = [list(range(1 + sum(used[:i]), 1 + sum(used[:i + 1]))) for i in range(len(prompts))]
    common = dict(page_size=page, num_pages=sum(used) + 2, context_length=256, max_sequences=4, sparse=sparse,
                  validate_batches=True)
    mlx_runner = MlxRunner(RunnerSettings(source.kind, source.path, "smollm2", device="mlx", **common))
    assert mlx_runner.cache.kmin is None and mlx_runner.cache.run_cents is not None
    got, got_logits, got_stats = greedy_batch(mlx_runner, prompts, tables, steps)
    plan = mlx_runner.attention.step.centroids
    assert plan.shortlist is not None and np.array(plan.sparse_rows).tolist() == [0, 1]     # both stages ran
    cache = mlx_runner.cache
    for cents, cstats, unit_pages in [(cache.cents, cache.cstats, 1), (cache.run_cents, cache.run_cstats, 2)]:
        for layer in range(len(cache.k)):
            k = torch.from_numpy(np.array(cache.k[layer])).view(-1, page, *cache.k[layer].shape[1:])
            want_cents = torch.zeros(k.shape[0], cache.kv_heads, 4, cache.head_dim, dtype=torch.float8_e4m3fn)
            want_stats = torch.zeros(k.shape[0], cache.kv_heads, 4, 2)
            for prompt, table in zip(prompts, tables, strict=True):
                cref.centroid_group_summaries(k, want_cents, want_stats, torch.tensor(table), len(prompt) + steps - 1,
                                              page, unit_pages)
            np.testing.assert_array_equal(np.array(cents[layer]), want_cents.view(torch.uint8).numpy())
            np.testing.assert_allclose(np.array(cstats[layer]), want_stats.numpy(), rtol=1e-4, atol=1e-5)
    del mlx_runner
    torch_runner = TorchRunner(RunnerSettings(source.kind, source.path, "smollm2", dtype="float32", threads=1,
                                              **common))
    want, want_logits, want_stats = greedy_batch(torch_runner, prompts, tables, steps)
    assert got_stats == want_stats and all(skipped > 0 for _, skipped in got_stats)
    assert_greedy_alike(got, got_logits, want, want_logits, steps)


def packaged_runner_settings(sparse: SparseSettings, prompts: list[list[int]], steps: int, page: int):
    """The MLX runner's settings for the packaged model and the prompts' page tables."""
    from backends.source import resolve_source

    source = resolve_source("packaged:smollm2-135m-instruct")
    used = [-(-(len(p) + steps) // page) for p in prompts]
    tables = [list(range(1 + sum(used[:i]), 1 + sum(used[:i + 1]))) for i in range(len(prompts))]
    return RunnerSettings(source.kind, source.path, "smollm2", device="mlx", page_size=page,
                          num_pages=sum(used) + 2, context_length=256, max_sequences=4, sparse=sparse,
                          validate_batches=True), tables


def test_embedded_model_counts_the_shipped_table_exactly():
    """SmolLM2-135M with its shipped per-head table (28 sparse layers x 3 KV heads): at a budget of
    4 one-page groups its heads keep 3 to 9 groups, so the decode rows (11, 7 and 4 groups at the
    end; the last dense until it outgrows 3) are cut by some heads and kept whole by others of the
    same layer. The runner builds head_groups's counts once; every decode step reports
    count_group_pages at each (layer, KV head)'s own count, summed over them all, which is also what
    the heads' virtual lengths read (dense rows: every page)."""
    from backends.mlx.runner import MlxRunner
    from backends.source import resolve_source
    from gateway.templating import load_tokenizer

    long = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct")).encode(
        PASSAGE + "Where did the keeper record the weather?")
    prompts, page, steps = [long, long[:50], long[:20]], 8, 6
    sparse = SparseSettings(True, token_budget=4 * page, dense_layers=2, sink_tokens=page, recent_tokens=page,
                            shortlist_tokens=0, selector="centroids", centroids=4, group_tokens=page,
                            head_budget_weights=read_weights("smollm2-135m-instruct-per-head"))
    settings, tables = packaged_runner_settings(sparse, prompts, steps, page)
    runner = MlxRunner(settings)
    counts = head_groups(sparse, runner.config.num_layers, runner.config.num_kv_heads)
    assert runner.centroid_budgets.per_layer == counts.per_layer and len(counts.per_layer) == 28
    assert (counts.fewest, max(map(counts.largest, counts.per_layer))) == (3, 9)
    groups = [-(-(len(p) + steps) // page) for p in prompts]
    assert groups == [11, 7, 4] and all(any(min(heads) < n <= max(heads) for heads in counts.per_layer.values())
                                        for n in groups[1:])
    _, _, stats = greedy_batch(runner, prompts, tables, steps)
    for i, got in enumerate(stats):
        lengths = [len(p) + i + 1 for p in prompts]
        want = np.sum([count_group_pages(lengths, page, 1, c) for heads in counts.per_layer.values() for c in heads],
                      axis=0)
        assert got == tuple(want), (i, got, want)
    assert all(skipped > 0 for _, skipped in stats)
    plan, lengths = runner.attention.step.centroids, [len(p) + steps for p in prompts]
    sparse_rows = np.array(plan.sparse_rows).tolist()
    dense_pages = sum(-(-lengths[r] // page) for r in range(len(prompts)) if r not in sparse_rows)
    read = sum(int((-(-np.array(choice.virtual_lengths) // page)).sum()) + dense_pages * len(heads)
               for choice, heads in ((plan.layers[layer], heads) for layer, heads in counts.per_layer.items()))
    assert sparse_rows == [0, 1, 2] and stats[-1][0] == read


def test_embedded_model_with_the_shipped_table_decodes_as_the_torch_runner():
    """The same table through the MLX runner and the torch runner (the CUDA backends' reference
    path): the same greedy tokens (a differing pick only at a near tie), logits and per-(layer, KV
    head) page counts, with rows each layer's heads cut differently."""
    from backends.cuda.runner import TorchRunner
    from backends.mlx.runner import MlxRunner
    from backends.source import resolve_source
    from gateway.templating import load_tokenizer

    long = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct")).encode(
        PASSAGE + "Where did the keeper record the weather?")
    prompts, page, steps = [long, long[:50], long[:20]], 8, 6
    sparse = SparseSettings(True, token_budget=4 * page, dense_layers=2, sink_tokens=page, recent_tokens=page,
                            shortlist_tokens=0, selector="centroids", centroids=4, group_tokens=page,
                            head_budget_weights=read_weights("smollm2-135m-instruct-per-head"))
    settings, tables = packaged_runner_settings(sparse, prompts, steps, page)
    got, got_logits, got_stats = greedy_batch(MlxRunner(settings), prompts, tables, steps)
    torch_settings = dataclasses.replace(settings, device="cpu", dtype="float32", threads=1)
    want, want_logits, want_stats = greedy_batch(TorchRunner(torch_settings), prompts, tables, steps)
    assert got_stats == want_stats and all(skipped > 0 for _, skipped in got_stats)
    assert_greedy_alike(got, got_logits, want, want_logits, steps)


@pytest.mark.parametrize("change, message", [
    (dict(dense_layers=3), "the model's sparse layers are 3-29 of 3 KV heads"),
    (dict(head_budget_weights=tuple((layer, (1.0, 1.0)) for layer in range(2, 30))), "of 3 KV heads"),
    (dict(shortlist_tokens=64), "must hold twice the largest head budget"),
    (dict(selector="quest"), "needs selector: centroids"),
], ids=["layers", "KV heads", "shortlist", "quest"])
def test_a_table_that_does_not_fit_is_refused_at_start_up(change, message):
    """The runner turns the table into counts for its model once, at start-up: a table of other
    layers or KV heads than the model's, one whose largest head the shortlist cannot hold twice,
    or one with the Quest selector is a ValueError naming the setting, before any step."""
    from backends.mlx.runner import MlxRunner

    page = 8
    sparse = SparseSettings(True, token_budget=4 * page, dense_layers=2, sink_tokens=page, recent_tokens=page,
                            shortlist_tokens=0, selector="centroids", centroids=4, group_tokens=page,
                            run_tokens=2 * page, head_budget_weights=read_weights("smollm2-135m-instruct-per-head"))
    settings, _ = packaged_runner_settings(dataclasses.replace(sparse, **change), [[1] * 8], 1, page)
    with pytest.raises(ValueError, match="sparse_attention.") as raised:
        MlxRunner(settings)
    assert message in str(raised.value)
