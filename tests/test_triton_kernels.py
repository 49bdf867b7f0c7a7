"""Triton attention kernels vs kernels/reference.py, on CPU under the Triton interpreter.

Fresh random inputs (torch.randn) at small shapes: ragged lengths, partial last pages and partial
summary blocks, GQA 1/4/8, head_dim 64/128, page sizes 8..64, 1 to 16 summaries per page, sparse
lengths below and above the budget. Unused pages, page table padding, unwritten slots and the
summaries of unwritten blocks hold NaN, and outputs are NaN-filled before each launch, so a stray
read or an unwritten output shows up as NaN. Every test runs under the interpreter through the
triton_interpreter fixture (tests/conftest.py): the kernel modules are reloaded with
TRITON_INTERPRET=1 for that test only, never for the whole session.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels import reference as ref  # noqa: E402
from kernels.triton import (  # noqa: E402
    extend_attention,
    paged_decode,
    quest_scores,
    select_pages,
    sparse_decode,
    update_page_summaries,
    write_kv_and_summaries,
)
from kernels.triton.selection import combine_heads, combine_select  # noqa: E402
from kernels.triton.sparse import quest_bounds  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

F16, BF16 = torch.float16, torch.bfloat16
# ||out - ref|| / ||ref|| bounds (reference in fp32); docs/kernels.md lists what was measured.
TOL = {F16: 2e-3, BF16: 1.2e-2}
KV_HEADS = 2


def rel_err(out, expected):
    assert torch.isfinite(out).all(), "unwritten or poisoned output"
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def make_paged(lens, page_size, group, head_dim, dtype, seed, poison_v=True):
    """Random paged KV for sequences of `lens` tokens: shuffled pages, NaN in the spare page (table
    padding points there) and in K (and V if poison_v) of slots past each sequence's end."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-n // page_size) for n in lens]
    num_pages = sum(used) + 3
    k = torch.randn(num_pages, page_size, KV_HEADS, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_pages, page_size, KV_HEADS, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen)
    poison = int(perm[-1])
    k[poison] = float("nan")
    v[poison] = float("nan")
    table = torch.full((len(lens), max(used) + 1), poison, dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        table[i, :used[i]] = perm[at:at + used[i]].int()
        at += used[i]
        last, fill = int(table[i, used[i] - 1]), n - (used[i] - 1) * page_size
        k[last, fill:] = float("nan")
        if poison_v:
            v[last, fill:] = float("nan")
    q_heads = KV_HEADS * group
    return k, v, table, q_heads, gen


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


DECODE_CASES = [  # dtype, group, head_dim, page_size, num_splits (None: launcher's choice)
    (F16, 1, 64, 16, None),
    (BF16, 4, 128, 16, 3),
    (F16, 8, 128, 64, None),
    (BF16, 8, 64, 8, 7),
    (BF16, 1, 128, 32, 1),
]


@pytest.mark.parametrize("dtype,group,head_dim,page_size,num_splits", DECODE_CASES)
def test_paged_decode(dtype, group, head_dim, page_size, num_splits):
    lens = [1, 37, 100, 64, 129]
    k, v, table, q_heads, gen = make_paged(lens, page_size, group, head_dim, dtype, seed=len(lens) + group)
    q = torch.randn(len(lens), q_heads, head_dim, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, k, v, table, i32(lens), num_splits=num_splits, block_n=32, out=out,
                 evict_first=num_splits == 3)
    scale = ref.default_scale(head_dim)
    expected = torch.stack([ref.paged_attention(q[i:i + 1], k, v, table[i], n - 1, scale)[0]
                            for i, n in enumerate(lens)])
    assert rel_err(out, expected) < TOL[dtype]


def test_paged_decode_per_page_and_grid_order_match():
    """One page-id load per key block (block_n <= page_size) and the heads-inner grid order compute
    bitwise what the default per-row gather in (batch, head, split) order does."""
    lens = [1, 63, 64, 65, 200]
    k, v, table, q_heads, gen = make_paged(lens, 32, 4, 64, F16, seed=9)
    q = torch.randn(len(lens), q_heads, 64, generator=gen).to(F16)
    base = paged_decode(q, k, v, table, i32(lens), num_splits=3, block_n=32)
    for block_n, splits, kw in ((32, 3, dict(per_page=True)), (32, 3, dict(heads_inner=True)),
                                (32, 3, dict(per_page=True, heads_inner=True))):
        a = paged_decode(q, k, v, table, i32(lens), num_splits=splits, block_n=block_n, **kw)
        assert torch.isfinite(a).all() and torch.equal(a, base)
    a = paged_decode(q, k, v, table, i32(lens), num_splits=1, block_n=16, per_page=True, heads_inner=True)
    assert torch.equal(a, paged_decode(q, k, v, table, i32(lens), num_splits=1, block_n=16))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_paged_decode_fixed_splits(num_splits):
    """Splits over the table's capacity (whole splits and blocks past a short row's end, which
    must add nothing) match the reference."""
    lens = [1, 37, 100, 64, 129]
    k, v, table, q_heads, gen = make_paged(lens, 16, 4, 64, BF16, seed=11)
    q = torch.randn(len(lens), q_heads, 64, generator=gen).to(BF16)
    scale = ref.default_scale(64)
    expected = torch.stack([ref.paged_attention(q[i:i + 1], k, v, table[i], n - 1, scale)[0]
                            for i, n in enumerate(lens)])
    out = paged_decode(q, k, v, table, i32(lens), num_splits=num_splits, block_n=32, fixed_splits=True)
    assert rel_err(out, expected) < TOL[BF16]


EXTEND_CASES = [  # dtype, group, head_dim, page_size, tuning
    (F16, 1, 64, 16, dict(block_m=16, block_n=16)),
    (BF16, 4, 128, 16, dict(block_m=32, block_n=16)),
    (F16, 8, 64, 64, dict(block_m=16, block_n=32)),
    (BF16, 8, 128, 32, dict(block_m=32, block_n=64)),
    (F16, 4, 128, 16, {}),  # the GPU default tiles (128 x 128)
]


@pytest.mark.parametrize("dtype,group,head_dim,page_size,tuning", EXTEND_CASES)
def test_extend_attention(dtype, group, head_dim, page_size, tuning):
    prefix, new = [0, 21, 64, 5], [40, 1, 17, 70]
    lens = [p + n for p, n in zip(prefix, new, strict=True)]
    k, v, table, q_heads, gen = make_paged(lens, page_size, group, head_dim, dtype, seed=100 + group)
    q = torch.randn(sum(new), q_heads, head_dim, generator=gen).to(dtype)
    cu = i32([0] + torch.tensor(new).cumsum(0).tolist())
    out = torch.full_like(q, float("nan"))
    extend_attention(q, k, v, table, cu, i32(prefix), out=out, **tuning)
    scale = ref.default_scale(head_dim)
    expected = torch.cat([ref.paged_attention(q[cu[i]:cu[i + 1]], k, v, table[i], prefix[i], scale)
                          for i in range(len(lens))])
    assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype,summary_dtype,page_size,summary_tokens", [
    (F16, torch.float32, 16, 4), (BF16, BF16, 8, 8), (BF16, torch.float32, 64, 4), (F16, F16, 16, 1)])
def test_write_kv_and_summaries(dtype, summary_dtype, page_size, summary_tokens):
    """Old random summaries stand for a page's earlier owner: every block of every touched page must
    come out exact (0 where no slot is written yet), untouched pages unchanged."""
    head_dim, starts, new = 64, [0, 13, 40, 7], [35, 1, 24, 0]
    ends = [s + n for s, n in zip(starts, new, strict=True)]
    k, v, table, _, gen = make_paged([max(e, 1) for e in ends], page_size, 1, head_dim, dtype, seed=7)
    k_new = torch.randn(sum(new), KV_HEADS, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(sum(new), KV_HEADS, head_dim, generator=gen).to(dtype)
    blocks = page_size // summary_tokens
    kmin = torch.randn(k.shape[0], blocks, KV_HEADS, head_dim, generator=gen).to(summary_dtype)
    kmax = torch.randn_like(kmin)
    pmin = torch.randn(k.shape[0], KV_HEADS, head_dim, generator=gen).to(summary_dtype)   # page summaries
    pmax = torch.randn_like(pmin)
    k_ref, v_ref, kmin_ref, kmax_ref = k.clone(), v.clone(), kmin.clone(), kmax.clone()
    pmin_ref, pmax_ref = pmin.clone(), pmax.clone()
    cu = [0] + torch.tensor(new).cumsum(0).tolist()
    for i in range(len(new)):
        rows = slice(cu[i], cu[i + 1])
        ref.write_kv(k_ref, v_ref, table[i], starts[i], k_new[rows], v_new[rows])
        if new[i]:
            ref.update_page_summaries(kmin_ref, kmax_ref, k_ref, table[i], starts[i], ends[i], pmin_ref, pmax_ref)
    write_kv_and_summaries(k, v, kmin, kmax, table, i32(cu), i32(starts), k_new, v_new, pmin=pmin, pmax=pmax)
    for got, want in ((k, k_ref), (v, v_ref), (kmin, kmin_ref), (kmax, kmax_ref), (pmin, pmin_ref), (pmax, pmax_ref)):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    kmin2, kmax2 = torch.randn_like(kmin), torch.randn_like(kmax)  # summary-only refresh
    kmin2_ref, kmax2_ref = kmin2.clone(), kmax2.clone()
    for i in range(len(new)):
        if new[i]:
            ref.update_page_summaries(kmin2_ref, kmax2_ref, k_ref, table[i], starts[i], ends[i])
    update_page_summaries(kmin2, kmax2, k, table, i32(starts), i32(ends))
    assert torch.equal(kmin2, kmin2_ref) and torch.equal(kmax2, kmax2_ref)


def sparse_inputs(lens, page_size, group, head_dim, dtype, seed, summary_tokens=4, pages=False):
    """make_paged, plus summaries: exact for written blocks, NaN everywhere else (spare pages and the
    unwritten blocks of each last page), so that reading or selecting on them shows; with pages,
    the page summaries too (exact for the sequences' pages, NaN for spare pages)."""
    k, v, table, q_heads, gen = make_paged(lens, page_size, group, head_dim, dtype, seed, poison_v=False)
    blocks = page_size // summary_tokens
    kmin = torch.full((k.shape[0], blocks, KV_HEADS, head_dim), float("nan"))
    kmax = torch.full_like(kmin, float("nan"))
    pmin = torch.full((k.shape[0], KV_HEADS, head_dim), float("nan"))
    pmax = torch.full_like(pmin, float("nan"))
    for i, n in enumerate(lens):
        ref.update_page_summaries(kmin, kmax, k, table[i], 0, n, pmin, pmax)
        last = int(table[i, (n - 1) // page_size])
        first_unwritten = -(-(n - (n - 1) // page_size * page_size) // summary_tokens)
        kmin[last, first_unwritten:] = kmax[last, first_unwritten:] = float("nan")
    q = torch.randn(len(lens), q_heads, head_dim, generator=gen).to(dtype)
    if pages:
        return q, k, v, kmin.to(dtype), kmax.to(dtype), table, pmin.to(dtype), pmax.to(dtype)
    return q, k, v, kmin.to(dtype), kmax.to(dtype), table


@pytest.mark.parametrize("group,tuning,summary_tokens", [
    (1, {}, 4), (4, {}, 4), (8, {}, 2), (4, {}, 16), (4, dict(all_heads=False), 4), (2, dict(all_heads=False), 1),
    (8, dict(block_p=4, pages_per_prog=6), 4), (4, dict(block_p=2), 8), (4, dict(dot=False), 4),
    (2, dict(dot=False, block_p=4), 1)])
def test_quest_scores(group, tuning, summary_tokens):
    lens = [200, 17, 96, 35]            # last pages: 8, 1, 16 and 3 of 16 slots written
    q, _, _, kmin, kmax, table = sparse_inputs(lens, 16, group, 64, BF16, seed=30 + group,
                                               summary_tokens=summary_tokens)
    scores = quest_scores(q, kmin, kmax, table, i32(lens), 16, **tuning)
    for i, n in enumerate(lens):
        used = -(-n // 16)
        expected = ref.quest_page_scores(q[i], kmin, kmax, table[i], n, 16)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(scores[i, :, :used], expected, rtol=1e-5, atol=1e-4)
        assert (scores[i, :, used:] == float("-inf")).all()


SPARSE_CASES = [  # dtype, group, head_dim, page_size, budget/sink/recent tokens, summary_tokens
    (BF16, 1, 64, 16, (128, 16, 32), 4),
    (F16, 4, 128, 16, (160, 1, 16), 2),
    (BF16, 8, 64, 8, (64, 8, 20), 8),
    (F16, 4, 64, 32, (256, 32, 33), 4),
]


@pytest.mark.parametrize("shortlist", [0, 2])     # coarse to fine past a shortlist of 2x the budget
@pytest.mark.parametrize("dtype,group,head_dim,page_size,budget,summary_tokens", SPARSE_CASES)
def test_sparse_decode(dtype, group, head_dim, page_size, budget, summary_tokens, shortlist):
    budget_tokens, sink, recent = budget
    budget_pages = budget_tokens // page_size
    counts = ref.sparse_page_counts(page_size, budget_tokens, sink, recent)
    # above the budget (partial and full last pages), just above, exactly at and below it
    lens = [7 * budget_tokens // 2 + 5, budget_tokens + page_size + 1, budget_tokens,
            budget_tokens // 3, 3 * budget_tokens]
    q, k, v, kmin, kmax, table, pmin, pmax = sparse_inputs(lens, page_size, group, head_dim, dtype,
                                                           seed=50 + group, summary_tokens=summary_tokens,
                                                           pages=True)
    out, chosen, vlens = sparse_decode(q, k, v, kmin, kmax, table, i32(lens), budget_tokens, sink,
                                       recent, num_splits=3, block_n=16, return_selection=True,
                                       pmin=pmin, pmax=pmax, shortlist_tokens=shortlist * budget_pages * page_size)
    scale = ref.default_scale(head_dim)
    coarse = 0
    for i, n in enumerate(lens):
        expected, pages_read = ref.sparse_paged_decode(q[i], k, v, kmin, kmax, table[i], n, scale,
                                                       budget_tokens, sink, recent, pmin, pmax,
                                                       shortlist * budget_pages * page_size)
        used = min(-(-n // page_size), budget_pages)
        if shortlist and -(-n // page_size) > shortlist * budget_pages:
            coarse += 1
            scores = ref.shortlist_page_scores(q[i], kmin, kmax, pmin, pmax, table[i], n, page_size,
                                               shortlist * budget_pages, counts[1], counts[2])
        else:
            scores = ref.quest_page_scores(q[i], kmin, kmax, table[i], n, page_size)
        assert torch.equal(chosen[i, :, :used], ref.select_pages(scores, *counts))
        assert used * KV_HEADS == pages_read
        assert rel_err(out[i], expected) < TOL[dtype]
    # a sequence within the budget reads its own page table: bitwise dense decode (same splits)
    dense = paged_decode(q, k, v, table, i32(lens), num_splits=3, block_n=16)
    below = [i for i, n in enumerate(lens) if -(-n // page_size) <= budget_pages]
    assert below and torch.equal(out[below], dense[below])
    assert torch.equal(vlens[below], i32(lens)[below])
    assert coarse == (2 if shortlist else 0)


def test_sparse_decode_all_below_budget_is_dense():
    lens = [33, 90, 5]
    q, k, v, kmin, kmax, table = sparse_inputs(lens, 16, 4, 64, BF16, seed=77)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, k, v, kmin, kmax, table, i32(lens), 256, 16, 16, out=out)
    assert torch.equal(out, paged_decode(q, k, v, table, i32(lens)))


@pytest.mark.parametrize("early_exit", [True, False])
def test_select_pages_exact_top_k_with_ties(early_exit):
    """Integer-valued scores (many ties, negatives, -0.0) and forced +inf pages: the kept set is an
    exact top-k (ties to the lower index), ascending, and the virtual lengths drop whole pages."""
    gen = torch.Generator().manual_seed(5)
    lens, page_size, budget = [16 * 40 - 3, 16 * 9, 16 * 25 + 1], 16, 10
    max_pages = 41
    scores = torch.randint(-4, 4, (3, KV_HEADS, max_pages), generator=gen).float()
    scores[0, 0, 2:30:2] = -0.0
    scores[0, 0, 3:30:2] = 0.0
    scores[:, :, [0, 1]] = float("inf")
    for i, n in enumerate(lens):
        scores[i, :, -(-n // page_size):] = float("-inf")
        scores[i, :, -(-n // page_size) - 1] = float("inf")
    table = torch.randperm(200, generator=gen)[:3 * max_pages].view(3, max_pages).int()
    logical, physical, vlens = select_pages(scores, table, i32(lens), page_size, budget, early_exit=early_exit)
    for i, n in enumerate(lens):
        used = min(-(-n // page_size), budget)
        for h in range(KV_HEADS):
            expected = scores[i, h].double().neg().sort(stable=True).indices[:used].sort().values
            assert torch.equal(logical[i, h, :used], expected)
            assert torch.equal(physical[i, h, :used], table[i, expected.long()])
            assert (logical[i, h, used:] == -1).all()
        assert vlens[i] == n - max(0, -(-n // page_size) - budget) * page_size


@pytest.mark.parametrize("listed,chunk,ties,sort", [
    (False, None, False, None), (True, None, False, None), (False, 8, False, None), (True, 4, False, None),
    (False, 8, True, None), (True, 4, True, None), (False, None, True, "sort"), (True, None, True, "topk")])
def test_combine_select_equals_combine_then_select(listed, chunk, ties, sort):
    """The fused kernel keeps the same pages as combine_heads + select_pages, for a sequence's own
    pages and for a shortlist (its physical pages per KV head); forced, padding and partial rows;
    with the bounds in registers and streamed in chunks (the kernel for wide rows); ties: bounds
    rounded to whole numbers, so that many pages tie (kept by the lower index); sort: the k-th
    score read from the sorted row (keep_top_k's SORT)."""
    lens, page_size, group = [300, 40, 129], 16, 4
    q, _, _, kmin, kmax, table = sparse_inputs(lens, page_size, group, 64, BF16, seed=91)
    force, scale, keep = (6, 1, 2), 0.125, 6
    bounds = quest_bounds(q, kmin, kmax, table, i32(lens), page_size)
    tables, lst = table, None
    if listed:      # a shortlist of 12 entries per head: every third page, -1 past each sequence
        entries = torch.arange(0, 36, 3, dtype=torch.int32)
        lst = torch.stack([torch.where(entries < -(-n // page_size), entries, -1) for n in lens])
        lst = lst[:, None, :].expand(len(lens), KV_HEADS, 12).contiguous()
        tables = torch.stack([table[i][lst[i].clamp(min=0).long()] for i in range(len(lens))]).contiguous()
        bounds = bounds.gather(2, lst.clamp(min=0).long().repeat_interleave(group, 1))
    if ties:
        bounds = bounds.round().contiguous()
    fused = combine_select(bounds, tables, i32(lens), page_size, KV_HEADS, force, scale, keep, listed=lst,
                           streamed=chunk is not None, chunk=chunk, sort=sort)
    scores = combine_heads(bounds, i32(lens), page_size, KV_HEADS, force, scale, lst)
    plain = select_pages(scores, tables, i32(lens), page_size, keep, listed=lst)
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
