"""The k-means centroid group scores (kernels/triton/centroid_scores.py), the coarse stage
(shortlist_scores.py) and the launcher (centroids.py) vs kernels/centroid_reference.py, on CPU under
the Triton interpreter (the triton_interpreter fixture, tests/conftest.py).

Ragged lengths: some end on a group boundary, some inside the last group (which, holding the
row's last token, must score -inf) and inside its last page. Every page that holds no complete
group's summary has NaN centroids and stats, so a read of the wrong page shows up as NaN; the output
is NaN-filled past the rows' groups only by the launcher's torch.empty, and only the rows' groups
are compared."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels import centroid_reference as cref  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels.triton.centroid_scores import centroid_group_logits  # noqa: E402
from kernels.triton.centroids import centroid_sparse_decode  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("block_n, row_tile", [(None, False), (2, False), (None, True), (2, True)])
@pytest.mark.parametrize("clusters, group, group_pages", [(4, 4, 4), (8, 3, 4), (2, 1, 2)])
def test_centroid_group_logits(clusters, group, group_pages, block_n, row_tile):
    page_size, kv_heads, head_dim = 8, 2, 32
    span = page_size * group_pages
    lens = [5 * span, 3 * span + 1, 4 * span - 3, span - 1]
    gen = torch.Generator().manual_seed(clusters * 10 + group)
    used = [-(-n // page_size) for n in lens]
    num_pages = sum(used) + 2
    cents = torch.full((num_pages, kv_heads, clusters, head_dim), float("nan"))
    stats = torch.full((num_pages, kv_heads, clusters, 2), float("nan"))
    perm = torch.randperm(num_pages - 1, generator=gen)
    width = -(-max(used) // group_pages) * group_pages + group_pages
    table = torch.full((len(lens), width), num_pages - 1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        table[i, :used[i]] = perm[at:at + used[i]].int()
        at += used[i]
        last = table[i, group_pages - 1:(n // span) * group_pages:group_pages].long()
        cents[last] = torch.randn(len(last), kv_heads, clusters, head_dim, generator=gen)
        stats[last, ..., 0] = torch.rand(len(last), kv_heads, clusters, generator=gen) * 3
        stats[last, ..., 1] = torch.rand(len(last), kv_heads, clusters, generator=gen)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = centroid_group_logits(q, cents, stats, table, torch.tensor(lens, dtype=torch.int32), page_size,
                                group_pages, scale, block_n=block_n, interpreted=True, row_tile=row_tile)
    for i, n in enumerate(lens):
        want = cref.centroid_group_logits(q[i], cents, stats, table[i], n, page_size, group_pages, scale)
        got = out[i, :, :want.shape[-1]].view(want.shape)
        scored = (n - 1) // span                     # the groups complete before the row's last token
        assert torch.isfinite(got[..., :scored]).all(), "a wrong page was read or a group left unwritten"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert bool((got[..., -1] == float("-inf")).all()), "the last group (the token's own) must score -inf"


@pytest.mark.parametrize("streamed", [False, True])
def test_combine_select_expands_groups_to_pages(streamed):
    """combine_select(expand=N) keeps the same groups as without it and writes, for each kept group,
    the physical ids of its N pages from the sequence's table, in order; padding past the kept
    groups is 0 (never read: the virtual length stops before it)."""
    from kernels.triton.selection import combine_select
    group_pages, page_size, kv_heads, group = 4, 8, 2, 2
    span = group_pages * page_size
    lens = torch.tensor([20 * span, 7 * span + 3, 3 * span], dtype=torch.int32)
    width = 24 * group_pages
    gen = torch.Generator().manual_seed(3)
    table = torch.randperm(4 * width, generator=gen)[:3 * width].view(3, width).int().contiguous()
    bounds = torch.randn(3, kv_heads * group, width // group_pages, generator=gen)
    force, budget = (6, 1, 1), 6
    logical, physical, vlens = combine_select(bounds, table, lens, span, kv_heads, force, 0.5, budget,
                                              streamed=streamed, expand=group_pages)
    plain, _, plain_vlens = combine_select(bounds, table, lens, span, kv_heads, force, 0.5, budget, streamed=streamed)
    assert torch.equal(logical, plain) and torch.equal(vlens, plain_vlens)
    assert physical.shape == (3, kv_heads, budget * group_pages)
    for b in range(3):
        kept = int((logical[b, 0] >= 0).sum())
        for h in range(kv_heads):
            pages = (logical[b, h, :kept].long()[:, None] * group_pages + torch.arange(group_pages)).flatten()
            assert torch.equal(physical[b, h, :kept * group_pages], table[b, pages])
            assert bool((physical[b, h, kept * group_pages:] == 0).all())


def _pipeline_inputs(budget_groups: int = 6, groups: tuple[int, ...] = (20, 5, 13)):
    """Summaries from real k-means of the keys; rows of several lengths (one within the budget, one
    ending inside a group, one on a group boundary)."""
    page_size, group_pages, kv_heads, group, head_dim, clusters = 8, 2, 2, 2, 64, 4
    span = page_size * group_pages
    budget_tokens, sink_tokens, recent_tokens = budget_groups * span, span, span
    lens = [groups[0] * span + 5, *(g * span for g in groups[1:])]
    gen = torch.Generator().manual_seed(5)
    used = [-(-n // page_size) for n in lens]
    num_pages = sum(used) + 1
    k = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    width = -(-max(used) // group_pages) * group_pages
    table = torch.full((len(lens), width), num_pages - 1, dtype=torch.int32)
    perm, at = torch.randperm(num_pages - 1, generator=gen), 0
    cents = torch.zeros(num_pages, kv_heads, clusters, head_dim)
    stats = torch.zeros(num_pages, kv_heads, clusters, 2)
    for i, n in enumerate(lens):
        table[i, :used[i]] = perm[at:at + used[i]].int()
        at += used[i]
        cref.centroid_group_summaries(k, cents, stats, table[i], n, page_size, group_pages)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    force = ref.sparse_page_counts(span, budget_tokens, sink_tokens, recent_tokens)
    return dict(q=q, k=k, v=v, cents=cents, stats=stats, table=table, seq_lens=seq_lens, lens=lens, scale=scale,
                force=force, page_size=page_size, group_pages=group_pages, span=span,
                tokens=(budget_tokens, sink_tokens, recent_tokens))


@pytest.mark.parametrize("selection", ["radix", "radix top-k", "radix streamed"])
def test_centroid_pipeline_matches_the_reference_selector_and_decode(selection):
    """Scores (centroid_group_logits), the selection (combine_select(expand=group_pages), in
    registers, by the bitonic top-k or streamed) and the split-K decode over the chosen pages
    give centroid_reference.centroid_select_pages's pages and reference.attend_pages's output: summaries
    from real k-means of the keys, rows of several lengths (one within the budget, one ending
    inside a group, one on a group boundary)."""
    from kernels.triton.decode import split_k_decode
    from kernels.triton.selection import combine_select
    x = _pipeline_inputs()
    q, k, v, cents, stats, table, seq_lens, lens, scale, force = (x[n] for n in (
        "q", "k", "v", "cents", "stats", "table", "seq_lens", "lens", "scale", "force"))
    page_size, group_pages, span, kv_heads = x["page_size"], x["group_pages"], x["span"], k.shape[2]
    budget_tokens, sink_tokens, recent_tokens = x["tokens"]
    logits = centroid_group_logits(q, cents, stats, table, seq_lens, page_size, group_pages, scale, interpreted=True)
    logical, physical, vlens = combine_select(logits, table, seq_lens, span, kv_heads, force, scale, force[0],
                                              expand=group_pages, streamed=selection == "radix streamed",
                                              sort="topk" if selection == "radix top-k" else None)
    out = split_k_decode(q, k, v, physical, vlens, scale)
    for i, n in enumerate(lens):
        want = cref.centroid_select_pages(q[i], cents, stats, table[i], n, page_size, group_pages, scale,
                                          budget_tokens, sink_tokens, recent_tokens)
        kept = min(-(-n // span), force[0])
        chosen = logical[i, :, :kept].long()
        pages = (chosen[..., None] * group_pages + torch.arange(group_pages)).flatten(1)
        assert torch.equal(pages[:, :want.shape[1]], want)
        assert int(vlens[i]) == n - max(0, -(-n // span) - force[0]) * span
        expected = ref.attend_pages(q[i], k, v, table[i], n, want, scale)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("planned_batch", [None, 12, 64])
def test_centroid_sparse_decode_writes_out(planned_batch):
    """The launcher the engine calls writes its `out` (the engine reads nothing else), for few
    planned rows (the selection inside the attention, select_attend), more (a selection launch,
    then the split-K decode) and a wave (the selection at the start of each row's one-split
    attention, select_then_attend), and matches the reference selector and attention (a budget of
    8 groups: whole 128-key splits of 16-token groups, as select_attend takes them)."""
    x = _pipeline_inputs(budget_groups=8)
    out = torch.full_like(x["q"], float("nan"))
    got = centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["seq_lens"],
                                 *x["tokens"], x["group_pages"], x["scale"], interpreted=True,
                                 planned_batch=planned_batch, out=out)
    assert got is out
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"],
                                          x["group_pages"], x["scale"], *x["tokens"])
        expected = ref.attend_pages(x["q"][i], x["k"], x["v"], x["table"][i], n, want, x["scale"])
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


def _shortlist_inputs(groups: tuple[int, ...] = (20, 5, 19), run_groups: int = 2):
    """_pipeline_inputs's rows (budget 8 groups: whole 128-key splits for select_attend) with run
    summaries from real k-means of each run's keys (runs of run_groups groups: 4 pages by default)
    and a shortlist of 16 groups' worth of runs (twice the budget, the least there is): rows longer
    than it (41 and 38 pages, one ending inside a group, one on a group boundary) and one within
    it (10 pages), so that the coarse stage both narrows and keeps everything."""
    x = _pipeline_inputs(budget_groups=8, groups=groups)
    run_pages = run_groups * x["group_pages"]
    cents, stats = torch.zeros_like(x["cents"]), torch.zeros_like(x["stats"])
    for i, n in enumerate(x["lens"]):
        cref.centroid_group_summaries(x["k"], cents, stats, x["table"][i], n, x["page_size"], run_pages)
    shortlist = cref.CentroidShortlist(cents, stats, run_pages, 16 * x["group_pages"] * x["page_size"])
    return x, shortlist


def _reference_rows(x, shortlist):
    """Each row's pages and attention by centroid_reference.centroid_select_pages with the shortlist."""
    rows = []
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"],
                                          x["group_pages"], x["scale"], *x["tokens"], shortlist=shortlist)
        rows.append((want, ref.attend_pages(x["q"][i], x["k"], x["v"], x["table"][i], n, want, x["scale"])))
    return rows


def test_reference_shortlist_narrows_only_long_rows():
    """The reference's coarse stage: a row within the shortlist selects exactly as without one; a
    longer row chooses only pages of its shortlisted runs, keeps its sink and recent groups, and
    differs from the one-stage choice somewhere (else the test would not tell the stages apart)."""
    x, shortlist = _shortlist_inputs()
    differs = False
    for i, n in enumerate(x["lens"]):
        args = (x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"], x["group_pages"], x["scale"],
                *x["tokens"])
        one_stage = cref.centroid_select_pages(*args)
        two_stage = cref.centroid_select_pages(*args, shortlist=shortlist)
        runs, short_len = cref.centroid_shortlist(x["q"][i], shortlist, x["table"][i], n, x["page_size"],
                                                  x["group_pages"], x["scale"], *x["tokens"])
        n_runs = -(-n // (shortlist.run_pages * x["page_size"]))
        if n_runs <= runs.shape[1]:
            assert torch.equal(one_stage, two_stage) and short_len == n
            continue
        assert short_len == n - (n_runs - runs.shape[1]) * shortlist.run_pages * x["page_size"]
        for h in range(runs.shape[0]):
            allowed = (runs[h].unsqueeze(1) * shortlist.run_pages + torch.arange(shortlist.run_pages)).flatten()
            assert bool(torch.isin(two_stage[h], allowed).all()), "a page outside the shortlist was chosen"
            assert two_stage[h][0] == 0 and two_stage[h][-1] == -(-n // x["page_size"]) - 1, "sink and recent kept"
        differs |= not torch.equal(one_stage, two_stage)
    assert differs


# a row with no scored group (the padding row, a row of one group): -inf - -inf, never kept nor stored
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("row_tile", [False, True])
@pytest.mark.parametrize("groups", [(20, 5, 19), (16, 16, 18, 1)])
def test_shortlisted_scores_equal_the_two_launches(row_tile, groups):
    """shortlisted_group_logits (the run selection recomputed in every scorer program) writes the
    compact tables, shortlist lengths and group logits that combine_select(expand=run_pages) over
    the run logits and then centroid_group_logits over its tables give, for rows longer and
    shorter than the shortlist, a padding row of no tokens and tiles of fewer groups than a run
    holds. groups: the rows' lengths in groups (_pipeline_inputs; runs are 2 groups, 8 kept): rows
    past, within and exactly at the shortlist, one a run and 5 tokens past it, one of one group."""
    from kernels.triton.selection import combine_select
    from kernels.triton.shortlist_scores import shortlisted_group_logits
    x, shortlist = _shortlist_inputs(groups)
    # and a padding row (no tokens, a table of page 0: what the engine's graphs run for empty slots)
    q = torch.cat([x["q"], x["q"][:1]])
    table = torch.cat([x["table"], torch.zeros_like(x["table"][:1])])
    seq_lens = torch.cat([x["seq_lens"], torch.zeros(1, dtype=torch.int32)])
    scale = x["scale"]
    page_size, group_pages, run_pages, kv_heads = x["page_size"], x["group_pages"], shortlist.run_pages, x["k"].shape[2]
    counts = cref.shortlist_run_counts(page_size, group_pages, run_pages, shortlist.shortlist_tokens, *x["tokens"])
    table = torch.nn.functional.pad(table, (0, -table.shape[1] % run_pages))
    run_logits = centroid_group_logits(q, shortlist.cents, shortlist.stats, table, seq_lens, page_size, run_pages,
                                       scale, interpreted=True)
    _, compact, short_lens = combine_select(run_logits, table, seq_lens, page_size * run_pages, kv_heads, counts,
                                            scale, counts[0], expand=run_pages)
    want = centroid_group_logits(q, x["cents"], x["stats"], compact, short_lens, page_size, group_pages, scale,
                                 interpreted=True)
    for block_n in (1, 4, None):    # a run is 2 groups: tiles within one run, across runs, the whole row
        logits, got_compact, got_lens = shortlisted_group_logits(
            q, run_logits, x["cents"], x["stats"], table, seq_lens, page_size, group_pages, run_pages, counts, scale,
            block_n=block_n, interpreted=True, row_tile=row_tile)
        assert torch.equal(got_lens, short_lens) and short_lens[-1] == 0
        for i, n in enumerate(short_lens[:-1].tolist()):
            pages, groups = -(-n // page_size), -(-n // (page_size * group_pages))
            assert torch.equal(got_compact[i, :, :pages], compact[i, :, :pages])
            torch.testing.assert_close(logits[i, :, :groups], want[i, :, :groups], rtol=1e-5, atol=1e-5)
            assert bool((logits[i, :, groups - 1] == float("-inf")).all()), "the shortlist's last group scores -inf"


@pytest.mark.parametrize("rows", [8, 1024])
@pytest.mark.parametrize("selection", ["launch", "fused"])
def test_shortlist_pipeline_matches_the_reference(selection, rows):
    """The coarse stage and the fine scores (centroid_shortlist_scores: each KV head's group
    logits over its shortlist, compact table and the shortlist's length; the run selection inside
    the scorer for few rows, a launch of its own for many), then the selection
    (combine_select over per-head tables, or inside the attention: select_attend) and the
    attention give centroid_reference.centroid_select_pages(shortlist=...)'s pages and output."""
    from kernels.triton.centroids import centroid_shortlist_scores
    from kernels.triton.decode import split_k_decode
    from kernels.triton.select_attend import select_attend
    from kernels.triton.selection import combine_select
    x, shortlist = _shortlist_inputs()
    q, k, v, table, seq_lens, scale, force = (x[n] for n in ("q", "k", "v", "table", "seq_lens", "scale", "force"))
    page_size, group_pages, span, kv_heads = x["page_size"], x["group_pages"], x["span"], k.shape[2]
    counts = cref.shortlist_run_counts(page_size, group_pages, shortlist.run_pages, shortlist.shortlist_tokens,
                                       *x["tokens"])
    logits, compact, short_lens = centroid_shortlist_scores(q, shortlist, x["cents"], x["stats"], table, seq_lens,
                                                            page_size, group_pages, scale, counts, rows=rows,
                                                            interpreted=True)
    assert compact.shape == (len(x["lens"]), kv_heads, 8 * shortlist.run_pages)
    if selection == "fused":
        out = select_attend(q, k, v, logits, compact, short_lens, span, force, scale, split_groups=128 // span)
    else:
        _, physical, vlens = combine_select(logits, compact, short_lens, span, kv_heads, force, scale, force[0],
                                            expand=group_pages)
        out = split_k_decode(q, k, v, physical, vlens, scale)
    for i, (want, expected) in enumerate(_reference_rows(x, shortlist)):
        if selection == "launch":
            assert torch.equal(physical[i, :, :want.shape[1]], table[i][want])
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("run_groups", [2, 4])
@pytest.mark.parametrize("planned_batch", [None, 12, 64, 600])
def test_centroid_sparse_decode_with_a_shortlist(planned_batch, run_groups):
    """The launcher with a shortlist, for few planned rows (select_attend), more (a selection
    launch), a wave (the run selection inside the fine scorer, select_then_attend) and more than
    a wave (the run selection a launch of its own), writes its `out` as
    the reference's two-stage selection and attention give it, with runs of 2 and 4 groups (the
    shortlist 8 runs or 4)."""
    x, shortlist = _shortlist_inputs(run_groups=run_groups)
    out = torch.full_like(x["q"], float("nan"))
    centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["seq_lens"], *x["tokens"],
                           x["group_pages"], x["scale"], interpreted=True, planned_batch=planned_batch, out=out,
                           shortlist=shortlist)
    for i, (_, expected) in enumerate(_reference_rows(x, shortlist)):
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


def test_the_launchers_forced_choices_give_the_same_output():
    """fuse_runs and select_first force the launcher's two launch-saving choices on or off (for
    benches that compare them): every combination writes the same output, bit for bit, and the
    reference's."""
    x, shortlist = _shortlist_inputs()
    outs = []
    for fuse_runs in (False, True):
        for select_first in (False, True):
            outs.append(centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"],
                                               x["seq_lens"], *x["tokens"], x["group_pages"], x["scale"],
                                               interpreted=True, planned_batch=64, shortlist=shortlist,
                                               fuse_runs=fuse_runs, select_first=select_first))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    for i, (_, expected) in enumerate(_reference_rows(x, shortlist)):
        torch.testing.assert_close(outs[0][i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choices", [dict(num_splits=1), dict(num_splits=3), dict(num_splits=4, fixed_splits=True),
                                     dict(split_keys=64), dict(split_keys=32, block_n=32)])
def test_split_k_decode_with_a_length_per_kv_head(choices):
    """Rows whose KV heads attend different numbers of chosen keys (a budget per head): seq_lens
    [batch, kv_heads], each head's keys the first seq_lens[b, h] of its own page table, against
    plain softmax attention per (row, head); a head of no keys is not part of any row here."""
    from kernels.triton.decode import split_k_decode
    page_size, kv_heads, group, head_dim, width = 8, 3, 2, 64, 12
    gen = torch.Generator().manual_seed(7)
    num_pages = 64
    k = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    lens = torch.tensor([[96, 40, 7], [1, 64, 95], [33, 33, 80]], dtype=torch.int32)
    tables = torch.stack([torch.randperm(num_pages, generator=gen)[:width] for _ in range(lens.numel())]).view(
        len(lens), kv_heads, width).int()
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = split_k_decode(q, k, v, tables, lens, scale, **choices)
    for b in range(len(lens)):
        for h in range(kv_heads):
            n = int(lens[b, h])
            pages = tables[b, h].long()
            keys = k[pages, :, h].flatten(0, 1)[:n]
            values = v[pages, :, h].flatten(0, 1)[:n]
            heads = q[b, h * group:(h + 1) * group]
            want = torch.softmax(heads @ keys.T * scale, dim=-1) @ values
            torch.testing.assert_close(out[b, h * group:(h + 1) * group], want, rtol=1e-4, atol=1e-4)


def _attend_each_head(x, i: int, chosen: list[torch.Tensor]) -> torch.Tensor:
    """reference.attend_pages of row i with each KV head's own list of chosen pages (of any length)."""
    kv_heads = x["k"].shape[2]
    group = x["q"].shape[1] // kv_heads
    n = x["lens"][i]
    return torch.cat([ref.attend_pages(x["q"][i, h * group:(h + 1) * group], x["k"][:, :, h:h + 1],
                                       x["v"][:, :, h:h + 1], x["table"][i], n, chosen[h].unsqueeze(0), x["scale"])
                      for h in range(kv_heads)])


@pytest.mark.parametrize("selection", ["radix", "radix top-k", "radix streamed"])
def test_combine_select_with_a_budget_per_kv_head(selection):
    """combine_select(head_budgets=...): each KV head keeps its own count of groups (here 6 and 3 of
    rows of 20, 5 and 13 groups: the 5-group row is whole for one head and cut for the other) as
    centroid_select_pages(head_budgets=...) chooses them, with a virtual length per (row, KV
    head) that split_k_decode attends as the reference does."""
    from kernels.triton.decode import split_k_decode
    from kernels.triton.selection import combine_select
    x = _pipeline_inputs()
    q, k, v, table, seq_lens, scale, force = (x[n] for n in ("q", "k", "v", "table", "seq_lens", "scale", "force"))
    page_size, group_pages, span, kv_heads = x["page_size"], x["group_pages"], x["span"], k.shape[2]
    budgets = [force[0], 3]
    logits = centroid_group_logits(q, x["cents"], x["stats"], table, seq_lens, page_size, group_pages, scale,
                                   interpreted=True)
    logical, physical, vlens = combine_select(logits, table, seq_lens, span, kv_heads, force, scale, force[0],
                                              expand=group_pages, streamed=selection == "radix streamed",
                                              sort="topk" if selection == "radix top-k" else None,
                                              head_budgets=torch.tensor(budgets, dtype=torch.int32))
    assert vlens.shape == (len(x["lens"]), kv_heads)
    out = split_k_decode(q, k, v, physical, vlens, scale)
    cut = False
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(q[i], x["cents"], x["stats"], table[i], n, page_size, group_pages, scale,
                                          *x["tokens"], head_budgets=[b * span for b in budgets])
        for h, budget in enumerate(budgets):
            kept = min(-(-n // span), budget)
            pages = (logical[i, h, :kept].long()[:, None] * group_pages + torch.arange(group_pages)).flatten()
            assert torch.equal(pages[:len(want[h])], want[h])
            assert int(vlens[i, h]) == n - max(0, -(-n // span) - budget) * span
        cut |= len(want[0]) != len(want[1])
        torch.testing.assert_close(out[i], _attend_each_head(x, i, want), rtol=1e-4, atol=1e-4)
    assert cut, "no row kept different counts for its heads"


@pytest.mark.parametrize("planned_batch,budgets", [(None, [8, 4]), (None, [7, 4]), (12, [8, 4]), (64, [8, 4])])
@pytest.mark.parametrize("coarse", [False, True])
def test_centroid_sparse_decode_with_a_budget_per_kv_head(planned_batch, budgets, coarse):
    """The launcher with HeadBudgets (8 and 4 groups), for few planned rows (select_attend: the
    smaller head's split half empty; with 7 and 4, the largest not a whole 8-group split either),
    more (a selection launch, then split_k_decode over lengths per KV head) and a wave
    (select_then_attend), in one stage and coarse to fine (the shortlist sized by the larger
    budget), writes the reference's per-head selection and attention."""
    from kernels.triton.centroids import HeadBudgets
    x, shortlist = _shortlist_inputs()
    heads = HeadBudgets(torch.tensor(budgets, dtype=torch.int32), min(budgets))
    out = torch.full_like(x["q"], float("nan"))
    tokens = (max(budgets) * x["span"], *x["tokens"][1:])
    centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["seq_lens"], *tokens,
                           x["group_pages"], x["scale"], interpreted=True, planned_batch=planned_batch, out=out,
                           shortlist=shortlist if coarse else None, head_budgets=heads)
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"],
                                          x["group_pages"], x["scale"], *tokens,
                                          shortlist=shortlist if coarse else None,
                                          head_budgets=[b * x["span"] for b in budgets])
        torch.testing.assert_close(out[i], _attend_each_head(x, i, want), rtol=1e-4, atol=1e-4)
