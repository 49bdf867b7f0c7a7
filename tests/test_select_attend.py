"""The one-launch selection and attention (kernels/triton/select_attend.py: for few rows, and one
program a row for about a wave of rows) against the launches they replace (combine_select, then
split_k_decode over its pages with splits over the table's capacity) and against the reference
selector and attention, on CPU under the Triton interpreter (the triton_interpreter fixture,
tests/conftest.py)."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels import centroid_reference as cref  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels.triton.centroid_scores import centroid_group_logits  # noqa: E402
from kernels.triton.decode import split_k_decode  # noqa: E402
from kernels.triton.select_attend import select_attend, select_then_attend  # noqa: E402
from kernels.triton.selection import combine_select  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _inputs():
    """Rows longer than the budget (one ending inside a group, one on a group boundary) and one
    within it (every group kept, the splits past its end empty)."""
    page_size, group_pages, kv_heads, group, head_dim, clusters = 8, 2, 2, 2, 64, 4
    span = page_size * group_pages
    budget_tokens, sink_tokens, recent_tokens = 6 * span, span, span
    lens = [20 * span + 5, 3 * span - 2, 13 * span]
    gen = torch.Generator().manual_seed(7)
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
    logits = centroid_group_logits(q, cents, stats, table, seq_lens, page_size, group_pages, scale, interpreted=True)
    return dict(q=q, k=k, v=v, cents=cents, stats=stats, table=table, lens=lens, seq_lens=seq_lens, scale=scale,
                force=force, logits=logits, page_size=page_size, group_pages=group_pages, span=span,
                kv_heads=kv_heads, tokens=(budget_tokens, sink_tokens, recent_tokens))


def _check_reference(x, got):
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"],
                                          x["group_pages"], x["scale"], *x["tokens"])
        torch.testing.assert_close(got[i], ref.attend_pages(x["q"][i], x["k"], x["v"], x["table"][i], n, want,
                                                            x["scale"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split_groups,sort", [(1, None), (2, None), (2, "sort"), (2, "topk")])
def test_select_attend_matches_the_three_launches_and_the_reference(split_groups, sort):
    x = _inputs()
    q, k, v, table, seq_lens, span, force, scale = (x[n] for n in (
        "q", "k", "v", "table", "seq_lens", "span", "force", "scale"))
    got = select_attend(q, k, v, x["logits"], table, seq_lens, span, force, scale, split_groups=split_groups,
                        sort=sort)
    _, physical, vlens = combine_select(x["logits"], table, seq_lens, span, x["kv_heads"], force, scale, force[0],
                                        expand=x["group_pages"])
    three = split_k_decode(q, k, v, physical, vlens, scale, num_splits=force[0] // split_groups,
                           block_n=span * split_groups, fixed_splits=True)
    assert torch.equal(got, three)
    _check_reference(x, got)


@pytest.mark.parametrize("sort,block_n,per_head", [(None, 16, False), ("topk", 32, False), ("topk", 16, True)])
def test_select_then_attend_matches_the_two_launches_and_the_reference(sort, block_n, per_head):
    """One program a row: the selection's pages stored and read back after a barrier, then the
    single split's attention; the same output, bit for bit, as combine_select then split_k_decode
    with one split over the table's capacity (block_n 32: a last block past the chosen pages).
    per_head: each KV head reads its own table (a shortlist's compact tables): here the sequence's
    table for head 0 and a copy of its pages at other physical ids for head 1, whose K/V are
    swapped in, so that a head reading the other's table reads the wrong keys."""
    x = _inputs()
    q, k, v, table, seq_lens, span, force, scale = (x[n] for n in (
        "q", "k", "v", "table", "seq_lens", "span", "force", "scale"))
    if per_head:
        num_pages = k.shape[0]
        moved = torch.stack([table, table + num_pages], dim=1)          # head 1's pages copied past the pool
        k = torch.cat([k, k.clone()]).index_fill_(2, torch.tensor([1]), 0).clone()
        v = torch.cat([v, v.clone()]).index_fill_(2, torch.tensor([1]), 0).clone()
        k[num_pages:, :, 1], v[num_pages:, :, 1] = x["k"][:, :, 1], x["v"][:, :, 1]
        k[num_pages:, :, 0], v[num_pages:, :, 0] = float("nan"), float("nan")
        table = moved.contiguous()
    out = torch.full_like(q, float("nan"))
    got = select_then_attend(q, k, v, x["logits"], table, seq_lens, span, force, scale, out=out, sort=sort,
                             block_n=block_n, num_warps=4, num_stages=2)
    assert got is out
    _, physical, vlens = combine_select(x["logits"], table, seq_lens, span, x["kv_heads"], force, scale, force[0],
                                        expand=x["group_pages"], sort=sort)
    two = split_k_decode(q, k, v, physical, vlens, scale, num_splits=1, block_n=block_n, fixed_splits=True)
    assert torch.equal(got, two)
    _check_reference(x, got)


def _check_reference_per_head(x, got, budgets):
    """Each row's output against the reference's choice with a budget per KV head, each head attended
    over its own pages."""
    group = x["q"].shape[1] // x["kv_heads"]
    for i, n in enumerate(x["lens"]):
        want = cref.centroid_select_pages(x["q"][i], x["cents"], x["stats"], x["table"][i], n, x["page_size"],
                                          x["group_pages"], x["scale"], *x["tokens"],
                                          head_budgets=[b * x["span"] for b in budgets])
        for h in range(x["kv_heads"]):
            heads = slice(h * group, (h + 1) * group)
            expected = ref.attend_pages(x["q"][i, heads], x["k"][:, :, h:h + 1], x["v"][:, :, h:h + 1], x["table"][i],
                                        n, want[h].unsqueeze(0), x["scale"])
            torch.testing.assert_close(got[i, heads], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split_groups,sort", [(1, None), (2, "topk")])
def test_select_attend_with_a_budget_per_kv_head(split_groups, sort):
    """Budgets of 6 and 3 groups: the smaller head's later splits are empty (with 2 groups a split,
    its second split half so) and its choice is the reference's for 3 groups; bit for bit the
    selection launch with the same budgets then split_k_decode over lengths per KV head."""
    x = _inputs()
    q, k, v, table, seq_lens, span, force, scale = (x[n] for n in (
        "q", "k", "v", "table", "seq_lens", "span", "force", "scale"))
    budgets = [force[0], 3]
    each = torch.tensor(budgets, dtype=torch.int32)
    got = select_attend(q, k, v, x["logits"], table, seq_lens, span, force, scale, split_groups=split_groups,
                        sort=sort, head_budgets=each)
    _, physical, vlens = combine_select(x["logits"], table, seq_lens, span, x["kv_heads"], force, scale, force[0],
                                        expand=x["group_pages"], head_budgets=each)
    three = split_k_decode(q, k, v, physical, vlens, scale, num_splits=force[0] // split_groups,
                           block_n=span * split_groups, fixed_splits=True)
    assert torch.equal(got, three)
    _check_reference_per_head(x, got, budgets)


def test_select_then_attend_with_a_budget_per_kv_head():
    """The same for one program a row: the smaller head stores and attends 3 groups, its virtual
    length its own; bit for bit the two launches with the same budgets."""
    x = _inputs()
    q, k, v, table, seq_lens, span, force, scale = (x[n] for n in (
        "q", "k", "v", "table", "seq_lens", "span", "force", "scale"))
    budgets = [force[0], 3]
    each = torch.tensor(budgets, dtype=torch.int32)
    got = select_then_attend(q, k, v, x["logits"], table, seq_lens, span, force, scale, sort="topk", block_n=16,
                             head_budgets=each)
    _, physical, vlens = combine_select(x["logits"], table, seq_lens, span, x["kv_heads"], force, scale, force[0],
                                        expand=x["group_pages"], sort="topk", head_budgets=each)
    two = split_k_decode(q, k, v, physical, vlens, scale, num_splits=1, block_n=16, fixed_splits=True)
    assert torch.equal(got, two)
    _check_reference_per_head(x, got, budgets)
