"""The centroid selector (sparse_attention.selector: centroids) in the torch, CPU-kernel and Triton
paths against kernels/reference.py, and its write path.

Random paged caches with ragged lengths (rows within the budget, rows ending on a group boundary,
inside a group and inside a page), shuffled page tables, summaries written the engine's way
(attention/centroids.write_group_summaries, for the groups complete before each row's token); every
path must choose centroid_reference.centroid_select_pages's pages and give reference.attend_pages's output,
in one stage and coarse to fine (SHORTLIST: runs of two groups, rows longer and shorter than the
shortlist).
"""
from __future__ import annotations

import pytest
import torch

from backends.base import SparseSettings
from backends.cuda.attention import centroids as ca
from backends.cuda.attention.cpu_fused import fused_decode_attention
from backends.cuda.attention.torch_attention import decode_attention
from backends.cuda.attention.torch_metadata import build_metadata
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.kv_store import TorchKVStore
from kernels import centroid_reference as cref
from kernels import reference
from kernels.cpu import build as cpu_kernels

PAGE, GROUP_PAGES, CLUSTERS = 4, 2, 4
SPAN = PAGE * GROUP_PAGES
LENGTHS = [30 * SPAN + 3, 14 * SPAN + 2, 4 * SPAN + 1, 9 * SPAN + 6, 5 * SPAN]
# coarse to fine: runs of 4 groups, 3 of them shortlisted (the least there is: twice the budget's
# groups), so that only one run beside the forced sink and recent runs is free and the choice
# differs from the one-stage rule's: the first two rows are longer than the shortlist, the fourth is
# past the budget within it
RUN_PAGES = 4 * GROUP_PAGES
SHORTLIST = SparseSettings(True, token_budget=5 * SPAN, dense_layers=0, sink_tokens=SPAN, recent_tokens=SPAN,
                           shortlist_tokens=3 * RUN_PAGES * PAGE, selector="centroids", centroids=CLUSTERS,
                           group_tokens=SPAN, run_tokens=RUN_PAGES * PAGE)
# ... and without one
SETTINGS = SparseSettings(True, token_budget=5 * SPAN, dense_layers=0, sink_tokens=SPAN, recent_tokens=SPAN,
                          shortlist_tokens=0, selector="centroids", centroids=CLUSTERS, group_tokens=SPAN)


def random_cache(lengths: list[int], kv_heads: int, head_dim: int, seed: int, layers: int = 2, runs: bool = False):
    """One sequence per length on its own shuffled pages, keys with structure per page (so groups
    differ), summaries of the groups (and with runs, of the runs) complete before each row's last
    token written as the engine writes them."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-n // PAGE) for n in lengths]
    num_pages = sum(used) + 5
    cache = PagedKVCache(layers, num_pages, PAGE, kv_heads, head_dim, torch.float32, "cpu",
                         centroids=(CLUSTERS, GROUP_PAGES, RUN_PAGES if runs else None))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.k += torch.randn(layers, num_pages + 1, 1, kv_heads, head_dim, generator=gen) * 2
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables, at = [], 0
    for count in used:
        tables.append(order[at:at + count])
        at += count
    written = [(0, n - 1, t) for n, t in zip(lengths, tables, strict=True)]
    ca.write_group_summaries(cache, ca.completed_groups(written, PAGE, GROUP_PAGES))
    if runs:
        ca.write_group_summaries(cache, ca.completed_groups(written, PAGE, RUN_PAGES), runs=True)
    return cache, tables


def chosen_pages(q, cache, layer, n, table, scale, settings=SETTINGS):
    """centroid_reference.centroid_select_pages of one row, coarse to fine when the settings say so."""
    shortlist = None
    if settings.shortlist_tokens:
        shortlist = cref.CentroidShortlist(cache.run_cents[layer], cache.run_cstats[layer], RUN_PAGES,
                                           settings.shortlist_tokens)
    return cref.centroid_select_pages(q, cache.cents[layer], cache.cstats[layer], table, n, PAGE, GROUP_PAGES,
                                      scale, settings.token_budget, settings.sink_tokens,
                                      settings.recent_tokens, shortlist=shortlist)


def expected(q, cache, layer, lengths, tables, scale, settings=SETTINGS):
    rows = []
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        t = torch.tensor(table)
        chosen = chosen_pages(q[row], cache, layer, n, t, scale, settings)
        rows.append(reference.attend_pages(q[row], cache.k[layer], cache.v[layer], t, n, chosen, scale))
    return torch.stack(rows)


@pytest.mark.parametrize("settings", [SETTINGS, SHORTLIST], ids=["one stage", "coarse to fine"])
@pytest.mark.parametrize("fused, head_dim", [(False, 16), (True, 32)])
@pytest.mark.parametrize("group", [1, 3])
def test_torch_and_cpu_paths_match_the_reference(fused, head_dim, group, settings):
    if fused and not cpu_kernels.load().available:
        pytest.skip("the CPU kernels are not built here")
    kv_heads, scale = 2, 0.3
    runs = settings.shortlist_tokens > 0
    cache, tables = random_cache(LENGTHS, kv_heads, head_dim, seed=head_dim + group, runs=runs)
    q = torch.randn(len(LENGTHS), kv_heads * group, head_dim)
    for layer in range(2):
        meta = build_metadata([(n - 1, 1, t) for n, t in zip(LENGTHS, tables, strict=True)], PAGE, "cpu", settings)
        dense = fused_decode_attention if fused else decode_attention
        got = ca.centroid_decode_attention(q, cache, layer, meta, scale, dense, fused)
        assert (meta._centroid_plan.shortlist is not None) == runs
        torch.testing.assert_close(got, expected(q, cache, layer, LENGTHS, tables, scale, settings), atol=1e-5,
                                   rtol=1e-5)
        # pages read and skipped: whole groups; a chosen last group may be partial
        plan = meta._centroid_plan
        read = skipped = 0
        for n in LENGTHS:
            pages, groups = -(-n // PAGE), -(-n // SPAN)
            dropped = max(0, groups - 5) * GROUP_PAGES
            read, skipped = read + pages - dropped, skipped + dropped
        assert (plan.pages_read, plan.pages_skipped) == (read * kv_heads, skipped * kv_heads)


def test_the_shortlist_changes_only_long_rows():
    """The coarse-to-fine data above tells the stages apart: the rows longer than the shortlist
    choose other pages than the one-stage rule (and only from their shortlisted runs, which
    tests/test_centroid_kernel.py checks), the others the same."""
    cache, tables = random_cache(LENGTHS, 2, 16, seed=17, runs=True)
    q = torch.randn(len(LENGTHS), 4, 16, generator=torch.Generator().manual_seed(1))
    keep = ca.shortlist_counts(SHORTLIST, PAGE)[1]
    for row, n in enumerate(LENGTHS):
        table = torch.tensor(tables[row])
        one, two = (chosen_pages(q[row], cache, 0, n, table, 0.3, s) for s in (SETTINGS, SHORTLIST))
        assert torch.equal(one, two) == (-(-n // (RUN_PAGES * PAGE)) <= keep), n


def test_reads_only_the_chosen_groups():
    """Poison every page of the groups the selection leaves out: the output must not change."""
    lengths, kv_heads, head_dim = [20 * SPAN + 5], 2, 16
    cache, tables = random_cache(lengths, kv_heads, head_dim, seed=3)
    q = torch.randn(1, kv_heads * 2, head_dim)
    meta = build_metadata([(lengths[0] - 1, 1, tables[0])], PAGE, "cpu", SETTINGS)
    before = ca.centroid_decode_attention(q, cache, 0, meta, 0.3, decode_attention)
    chosen = cref.centroid_select_pages(q[0], cache.cents[0], cache.cstats[0], torch.tensor(tables[0]),
                                        lengths[0], PAGE, GROUP_PAGES, 0.3, SETTINGS.token_budget,
                                        SETTINGS.sink_tokens, SETTINGS.recent_tokens)
    table = torch.tensor(tables[0])
    for head in range(kv_heads):
        skipped = torch.ones(len(table), dtype=torch.bool)
        skipped[chosen[head]] = False
        assert int(skipped.sum()) == len(table) - chosen.shape[1] > 0
        cache.k[0][table[skipped], :, head] = float("nan")
        cache.v[0][table[skipped], :, head] = float("nan")
    meta = build_metadata([(lengths[0] - 1, 1, tables[0])], PAGE, "cpu", SETTINGS)
    assert torch.equal(before, ca.centroid_decode_attention(q, cache, 0, meta, 0.3, decode_attention))


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("settings", [SETTINGS, SHORTLIST], ids=["one stage", "coarse to fine"])
@pytest.mark.parametrize("planned_batch", [None, 12, 40, 300])
def test_triton_path_matches_the_reference(planned_batch, settings):
    """kernels/triton/centroids.centroid_sparse_decode (the Triton backend's) under the interpreter,
    with a page-table width that is not a whole number of groups, along each path its shape
    choices take: few rows (the reshaped scoring tile, the selection inside one-block attention
    splits: select_attend), a fifth of a wave (a selection launch, then split-K attention), a
    wave of rows planned (the 2D tile, the run selection inside the fine scorer, the selection at
    the start of each row's one-split attention: select_then_attend), and many (16-group 2D tiles,
    the run selection a launch of its own, select_then_attend)."""
    pytest.importorskip("triton")
    from kernels.triton.centroids import centroid_sparse_decode
    kv_heads, group, head_dim, scale = 2, 2, 64, 0.125
    cache, tables = random_cache(LENGTHS, kv_heads, head_dim, seed=7, layers=1, runs=settings.shortlist_tokens > 0)
    width = max(len(t) for t in tables) | 1         # odd: not a whole number of groups
    assert width % GROUP_PAGES
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(LENGTHS), kv_heads * group, head_dim)
    shortlist = None if cache.run_cents is None else cref.CentroidShortlist(
        cache.run_cents[0], cache.run_cstats[0], RUN_PAGES, settings.shortlist_tokens)
    got = centroid_sparse_decode(q, cache.k[0], cache.v[0], cache.cents[0], cache.cstats[0], table,
                                 torch.tensor(LENGTHS, dtype=torch.int32), settings.token_budget,
                                 settings.sink_tokens, settings.recent_tokens, GROUP_PAGES, scale, interpreted=True,
                                 planned_batch=planned_batch, shortlist=shortlist)
    torch.testing.assert_close(got, expected(q, cache, 0, LENGTHS, tables, scale, settings), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("runs", [False, True])
def test_write_path_summarises_each_completed_group_as_the_reference(runs):
    """Prefill chunks of several sizes and decodes: after each step every group the sequence has
    completed holds the reference's summary of its keys (kernels/centroid_reference.centroid_group_summaries),
    and no other page holds one; the page table is shuffled, so a summary at a wrong page shows.
    runs: the coarse stage's runs too, each in its own store at its last page."""
    kv_heads, head_dim, layers = 2, 8, 2
    gen = torch.Generator().manual_seed(11)
    num_pages = 40
    cache = PagedKVCache(layers, num_pages, PAGE, kv_heads, head_dim, torch.float32, "cpu",
                         centroids=(CLUSTERS, GROUP_PAGES, RUN_PAGES if runs else None))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    table = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    written = 0
    for count in [13, 1, 1, 2, 9, 1, 1, 1, 16, 3, 1]:
        groups = ca.completed_groups([(written, count, table)], PAGE, GROUP_PAGES)
        assert len(groups) == (written + count) // SPAN - written // SPAN
        ca.write_group_summaries(cache, groups)
        if runs:
            ca.write_group_summaries(cache, ca.completed_groups([(written, count, table)], PAGE, RUN_PAGES), runs=True)
        written += count
        lasts = [table[(g + 1) * GROUP_PAGES - 1] for g in range(written // SPAN)]
        for layer in range(layers):
            cents = torch.zeros_like(cache.cents[layer])
            stats = torch.zeros_like(cache.cstats[layer])
            cref.centroid_group_summaries(cache.k[layer], cents, stats, torch.tensor(table), written, PAGE,
                                          GROUP_PAGES)
            assert torch.equal(cache.cents[layer].view(torch.uint8), cents.view(torch.uint8))
            assert torch.equal(cache.cstats[layer], stats)
            assert bool((cache.cstats[layer, lasts, :, :, 0] > -1).all())        # log counts: written
            if runs:
                cents.zero_(), stats.zero_()
                cref.centroid_group_summaries(cache.k[layer], cents, stats, torch.tensor(table), written, PAGE,
                                              RUN_PAGES)
                assert torch.equal(cache.run_cents[layer].view(torch.uint8), cents.view(torch.uint8))
                assert torch.equal(cache.run_cstats[layer], stats)
    assert written // SPAN >= 6


@pytest.mark.parametrize("runs", [False, True])
def test_summaries_move_with_their_pages_between_tiers(runs):
    """The host tier carries a page's centroid summaries (the group's, and the run's with a
    shortlist) with its K/V (TorchKVStore.page_parts)."""
    from backends.kv_store import KVLayout, Tier
    cache, tables = random_cache(LENGTHS[:2], 2, 16, seed=13, runs=runs)
    per_page = PagedKVCache.bytes_per_page(2, PAGE, 2, 16, 4, centroids=CLUSTERS, runs=runs)
    assert TorchKVStore.bytes_per_page(cache) == per_page
    shape = dict(model="m", weights="w", kv_dtype="float32", device="cpu", attention="torch", page_size=PAGE,
                 num_layers=2, kv_heads=2, head_dim=16, summary_tokens=None, page_bytes=per_page)
    layout = KVLayout(**shape, centroids=f"{CLUSTERS}x{GROUP_PAGES}")
    # an L3 file of pages without centroids keeps its key; pages with them get another
    assert "centroids" not in KVLayout(**shape).key() and layout.key() != KVLayout(**shape).key()
    store = TorchKVStore(cache, 8, layout)
    last = tables[0][RUN_PAGES - 1]          # a run's last page is its last group's too
    before = [t[:, last].clone() for t in cache.page_parts()]
    assert cache.cstats[:, last].abs().sum() > 0 and (not runs or cache.run_cstats[:, last].abs().sum() > 0)
    assert len(before) == (6 if runs else 4)
    store.copy_pages(Tier.DEVICE, Tier.HOST, [last], [3]).wait()
    spare = cache.num_pages - 1
    store.copy_pages(Tier.HOST, Tier.DEVICE, [3], [spare]).wait()
    for part, was in zip(cache.page_parts(), before, strict=True):
        assert torch.equal(part[:, spare].view(torch.uint8), was.view(torch.uint8))


@pytest.mark.parametrize("budget_groups, prompt_len, shortlist", [(3, 70, 0), (8, 150, 0), (3, 150, 96)])
def test_attention_backends_agree_through_the_runner(request, budget_groups, prompt_len, shortlist):
    """A random tiny model with the centroid selector on every attention backend here (torch;
    cpu_fused when its C++ ops build; triton under the interpreter): a prefill in chunks, then
    greedy decodes across group boundaries past the budget give the same tokens and logits, the
    stats count whole groups, and every completed group carries its summary. A budget of 8 groups
    is whole 128-key splits, which the Triton launcher serves for few rows by the selection inside
    the attention (select_attend), writing the engine's output buffer. shortlist: coarse to fine
    over runs of 32 tokens (3 of the 6 the sequence reaches), every completed run summarised."""
    import importlib.util

    import numpy as np

    from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
    from backends.cuda.runner import TorchRunner
    from backends.sampling_params import SamplingParams

    names = ["torch"] + (["cpu_fused"] if cpu_kernels.load().available else [])
    if importlib.util.find_spec("triton") is not None:
        request.getfixturevalue("triton_interpreter")
        names.append("triton")
    sparse = SparseSettings(True, token_budget=16 * budget_groups, dense_layers=1, sink_tokens=8, recent_tokens=8,
                            shortlist_tokens=shortlist, selector="centroids", centroids=4, group_tokens=16,
                            run_tokens=32)
    greedy = SampleSpec(SamplingParams(temperature=0), 0.5)
    prompt = np.random.default_rng(5).integers(0, 200, prompt_len).tolist()
    steps = 12          # past a group boundary (and a run's, at 160) from either prompt
    table = list(range(1, 1 + (prompt_len + steps) // 8 + 1))
    results = {}
    for name in names:
        runner = TorchRunner(RunnerSettings("random", "tiny", "tiny", dtype="float32", page_size=8, num_pages=48,
                                            threads=1, context_length=256, attention=name, max_sequences=2,
                                            sparse=sparse, validate_batches=True))
        assert runner.cache.cents is not None and runner.cache.kmin is None
        assert (runner.cache.run_cents is not None) == (shortlist > 0)
        out, logits, stats = [], [], []
        for start in range(0, prompt_len, 50):           # chunks across page and group boundaries
            chunk = prompt[start:start + 50]
            result = runner.forward(ForwardBatch([SequenceChunk(chunk, start, table, 0, 1, greedy)],
                                                 return_logits=True))
        for step in range(steps):
            out.append(result.tokens[0].token_id)
            logits.append(result.logits[0])
            result = runner.forward(ForwardBatch([SequenceChunk([out[-1]], prompt_len + step, table, 0, 1, greedy)],
                                                 return_logits=True))
            stats.append((result.attention.pages_read, result.attention.pages_skipped))
        length = prompt_len + steps
        lasts = torch.tensor(table[1:length // 16 * 2:2])
        assert bool((runner.cache.cstats[:, lasts, :, :, 0] > -1).all()), "a completed group has no summary"
        if shortlist:
            assert bool((runner.cache.run_cstats[:, torch.tensor(table[3:length // 32 * 4:4]), :, :, 0] > -1).all())
        results[name] = out, np.stack(logits), stats
        layers, kv_heads = runner.config.num_layers - 1, runner.config.num_kv_heads     # the first is dense
    want_tokens, want_logits, want_stats = results["torch"]
    for i, (read, skipped) in enumerate(want_stats):
        n = prompt_len + i + 1
        dropped = max(0, -(-n // 16) - budget_groups) * 2
        assert (read, skipped) == ((-(-n // 8) - dropped) * kv_heads * layers, dropped * kv_heads * layers)
    assert want_stats[-1][1] > 0
    for name in names[1:]:
        tokens, logits, stats = results[name]
        assert tokens == want_tokens and stats == want_stats, name
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4, err_msg=name)


# A budget per (layer, KV head) (backends/head_budgets.py): token_budget 5 groups as the mean; layer 0's
# heads keep 8 and 3 groups (the floor: sink, recent and one), layer 1's 4 and 6, so that a row of 4-8
# groups is cut for one head and whole for the other; coarse to fine with a shortlist of 4 runs, twice
# the largest head's budget
HEAD_WEIGHTS = ((0, (1.6, 0.4)), (1, (0.8, 1.2)))
HEADS = SparseSettings(True, token_budget=5 * SPAN, dense_layers=0, sink_tokens=SPAN, recent_tokens=SPAN,
                       shortlist_tokens=0, selector="centroids", centroids=CLUSTERS, group_tokens=SPAN,
                       head_budget_weights=HEAD_WEIGHTS)
HEADS_SHORTLIST = SparseSettings(True, token_budget=5 * SPAN, dense_layers=0, sink_tokens=SPAN, recent_tokens=SPAN,
                                 shortlist_tokens=4 * RUN_PAGES * PAGE, selector="centroids", centroids=CLUSTERS,
                                 group_tokens=SPAN, run_tokens=RUN_PAGES * PAGE, head_budget_weights=HEAD_WEIGHTS)
HEAD_GROUPS = {0: (8, 3), 1: (4, 6)}


def expected_per_head(q, cache, layer, lengths, tables, scale, settings):
    """Each row's reference output with each KV head keeping its own groups (attended over its own pages)."""
    counts = HEAD_GROUPS[layer]
    kv_heads = cache.k.shape[3]
    group = q.shape[1] // kv_heads
    shortlist = None
    if settings.shortlist_tokens:
        shortlist = cref.CentroidShortlist(cache.run_cents[layer], cache.run_cstats[layer], RUN_PAGES,
                                           settings.shortlist_tokens)
    rows = []
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        t = torch.tensor(table)
        chosen = cref.centroid_select_pages(q[row], cache.cents[layer], cache.cstats[layer], t, n, PAGE, GROUP_PAGES,
                                            scale, max(counts) * SPAN, settings.sink_tokens, settings.recent_tokens,
                                            shortlist=shortlist, head_budgets=[c * SPAN for c in counts])
        rows.append(torch.cat([reference.attend_pages(
            q[row, h * group:(h + 1) * group], cache.k[layer][:, :, h:h + 1], cache.v[layer][:, :, h:h + 1], t, n,
            chosen[h].unsqueeze(0), scale) for h in range(kv_heads)]))
    return torch.stack(rows)


def test_head_groups_from_the_table():
    from backends.head_budgets import head_groups
    assert head_groups(HEADS, 2, 2).per_layer == HEAD_GROUPS and head_groups(HEADS, 2, 2).fewest == 3
    with pytest.raises(ValueError, match="KV heads"):
        head_groups(HEADS, 2, 4)
    with pytest.raises(ValueError, match="twice the largest head budget"):
        head_groups(SHORTLIST.__class__(**{**SHORTLIST.__dict__, "head_budget_weights": HEAD_WEIGHTS}), 2, 2)


@pytest.mark.parametrize("settings", [HEADS, HEADS_SHORTLIST], ids=["one stage", "coarse to fine"])
@pytest.mark.parametrize("fused", [False, True])
def test_torch_and_cpu_paths_with_a_budget_per_kv_head(fused, settings):
    """Each layer's heads keep their own counts (HEAD_GROUPS): the reference's per-head choice and
    attention, rows within the fewest count dense, and the pages read and skipped counted per
    (layer, KV head) exactly."""
    if fused and not cpu_kernels.load().available:
        pytest.skip("the CPU kernels are not built here")
    kv_heads, group, head_dim, scale = 2, 2, 16, 0.3
    lengths = [*LENGTHS, 3 * SPAN - 1]         # the last row within every head's budget
    cache, tables = random_cache(lengths, kv_heads, head_dim, seed=23, runs=settings.shortlist_tokens > 0)
    q = torch.randn(len(lengths), kv_heads * group, head_dim)
    for layer in range(2):
        meta = build_metadata([(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)], PAGE, "cpu", settings)
        dense = fused_decode_attention if fused else decode_attention
        got = ca.centroid_decode_attention(q, cache, layer, meta, scale, dense, fused)
        assert (meta._centroid_plan.shortlist is not None) == (settings.shortlist_tokens > 0)
        torch.testing.assert_close(got, expected_per_head(q, cache, layer, lengths, tables, scale, settings),
                                   atol=1e-5, rtol=1e-5)
        read = skipped = 0
        for n in lengths:
            pages, groups = -(-n // PAGE), -(-n // SPAN)
            for count in HEAD_GROUPS[layer]:
                dropped = max(0, groups - count) * GROUP_PAGES
                read, skipped = read + pages - dropped, skipped + dropped
        assert (meta.stats.pages_read, meta.stats.pages_skipped) == (read, skipped)


def test_the_shipped_layer_table_gives_each_layer_its_largest_head():
    """backends/head_budget_tables: smollm2-135m-instruct is the per-head table's layer-max
    (bench/sparse_layer_budgets.py layer-max): every KV head of a layer at the layer's largest
    per-head weight, all rescaled by one factor to mean 1."""
    from backends.head_budgets import read_weights
    layers, per_head = dict(read_weights("smollm2-135m-instruct")), dict(read_weights("smollm2-135m-instruct-per-head"))
    assert layers.keys() == per_head.keys() and len(layers) == 28
    ratios = {round(heads[0] / max(per_head[layer]), 4) for layer, heads in layers.items() if len(set(heads)) == 1}
    assert len(ratios) == 1 and len(layers) == sum(len(set(heads)) == 1 for heads in layers.values())
