"""The coarse stage's run selection fused into the fine stage's group scorer (coarse to fine,
centroid_reference.centroid_select_pages(shortlist=...)).

Each program scores BLOCK_N of the groups its KV head shortlisted, so it needs only which runs the
head keeps: it recomputes the row's run selection (combine_select's, from the run logits: each q
head's log-softmax over the row's runs, the max over the GQA group, the sink and recent runs
forced, the exact top k) in registers, finds the runs that hold its slots of the shortlist, and
scores their groups as centroid_scores._centroid_group_logits scores a sequence's. The run
selection costs every program a little arithmetic and no memory trip (the run logits load with the
length; the page table is read once, as before, for the groups' last pages), and saves the
selection launch and the compact tables' write and read between the stages. The programs also
write the compact tables (each KV head's shortlisted pages in order) and the shortlists' lengths,
which the fine selection and the attention read as each KV head's own sequence.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.centroid_scores import score_tile, score_tile_rows
from kernels.triton.selection import group_scores
from kernels.triton.top_k import keep_top_k, sort_width


@triton.jit
def _slot_runs(take, pos, offs_r, slots, first_run, RUNS_SPANNED: tl.constexpr):
    """The run (its index in the sequence) holding each shortlist run slot of `slots`: the kept
    entry whose place in the ascending compaction is that slot."""
    entry = tl.zeros(slots.shape, tl.int32)
    for j in tl.static_range(RUNS_SPANNED):
        slot = first_run + j
        run = tl.sum(tl.where(take & (pos == slot), offs_r, 0), 0)
        entry = tl.where(slots == slot, run, entry)
    return entry


@triton.jit
def _shortlist_group_logits(Q, Cents, Stats, RunLogits, PT, SeqLens, Out, Compact, ShortLens,
                            s_qb, s_qh, s_cp, s_ch, s_cc, s_sp, s_sh, s_sc, s_rb, s_rh, s_pb, s_ob, s_oh, s_yb, s_yh,
                            max_runs, max_groups, keep, sink_runs, recent_runs, scale,
                            GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_G: tl.constexpr,
                            HEAD_DIM: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUP_PAGES: tl.constexpr, RUN_PAGES: tl.constexpr, PAGE_SIZE: tl.constexpr,
                            BLOCK_R: tl.constexpr, SORT: tl.constexpr, DOT_F32: tl.constexpr,
                            ROW_TILE: tl.constexpr):
    """One program per (sequence, KV head, BLOCK_N shortlisted groups): the row's run selection,
    the compact table's pages of its groups, their scores."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_N
    PER_RUN: tl.constexpr = RUN_PAGES // GROUP_PAGES
    RUN_SPAN: tl.constexpr = RUN_PAGES * PAGE_SIZE
    SPAN: tl.constexpr = GROUP_PAGES * PAGE_SIZE
    RUNS_SPANNED: tl.constexpr = (BLOCK_N - 1) // PER_RUN + 2     # runs a block of slots can touch
    offs_r = tl.arange(0, BLOCK_R)
    seq_len = tl.load(SeqLens + b)
    n_runs = tl.cdiv(seq_len, RUN_SPAN)
    # the run selection (combine_select's over the run logits; they load within the row's width,
    # alongside the length)
    score = group_scores(RunLogits, b, kvh, offs_r, offs_r < n_runs, n_runs, s_rb, s_rh, scale, keep, sink_runs,
                         recent_runs, GROUP, BLOCK_G, BLOCK_R, True, max_runs)
    short_len = seq_len - tl.maximum(n_runs - keep, 0) * RUN_SPAN   # the kept runs' tokens, the last partial
    if kvh == 0 and first == 0:     # (before any return: a padding row of no tokens has no group to score)
        tl.store(ShortLens + b, short_len)
    if first >= tl.cdiv(short_len, SPAN):
        return      # past the shortlist
    take = keep_top_k(score, tl.minimum(n_runs, keep), True, SORT)
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    # this program's slots: slot n is group n % PER_RUN of the (n // PER_RUN)-th kept run
    offs_n = first + tl.arange(0, BLOCK_N)
    run_n = _slot_runs(take, pos, offs_r, offs_n // PER_RUN, first // PER_RUN, RUNS_SPANNED)
    logical_n = run_n * RUN_PAGES + (offs_n % PER_RUN) * GROUP_PAGES        # each slot's first page
    table = PT + b.to(tl.int64) * s_pb
    in_table = offs_n < max_groups
    # pages are read within the row's table (page 0 past it, as combine_select's _group_pages does:
    # a row claiming more tokens than its table holds reads nothing outside it)
    listed = in_table & (logical_n < max_runs * RUN_PAGES)
    offs_p = tl.arange(0, GROUP_PAGES)
    pages = tl.load(table + logical_n[:, None] + offs_p[None, :], mask=listed[:, None], other=0)
    tl.store(Compact + b * s_yb + kvh * s_yh + offs_n[:, None] * GROUP_PAGES + offs_p[None, :], pages,
             mask=in_table[:, None])
    page = tl.load(table + logical_n + GROUP_PAGES - 1, mask=listed, other=0).to(tl.int64)   # summaries' page
    full_groups = (short_len - 1) // SPAN       # summarised before the row's last token
    if ROW_TILE:
        n_r = first + tl.arange(0, C * BLOCK_N) % BLOCK_N
        run_r = _slot_runs(take, pos, offs_r, n_r // PER_RUN, first // PER_RUN, RUNS_SPANNED)
        logical_r = run_r * RUN_PAGES + (n_r % PER_RUN) * GROUP_PAGES
        listed_r = (n_r < max_groups) & (logical_r < max_runs * RUN_PAGES)
        page_r = tl.load(table + logical_r + GROUP_PAGES - 1, mask=listed_r, other=0).to(tl.int64)
        score_tile_rows(Q, Cents, Stats, Out, page, page_r, b, kvh, first, full_groups, s_qb, s_qh, s_cp, s_ch,
                         s_cc, s_sp, s_sh, s_sc, s_ob, s_oh, max_groups, scale, GROUP, GROUP_P, HEAD_DIM, C, BLOCK_N,
                         DOT_F32)
        return
    score_tile(Q, Cents, Stats, Out, b, kvh, page, offs_n, offs_n < full_groups, s_qb, s_qh, s_cp, s_ch, s_cc,
                s_sp, s_sh, s_sc, s_ob, s_oh, max_groups, scale, GROUP, GROUP_P, HEAD_DIM, C, BLOCK_N, DOT_F32)


def shortlisted_group_logits(q: torch.Tensor, run_logits: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor,
                             page_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int, group_pages: int,
                             run_pages: int, runs: tuple[int, int, int], scale: float, sort: str | None = None,
                             block_n: int | None = None, num_warps: int | None = None, interpreted: bool = False,
                             row_tile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fine stage's group logits over each KV head's shortlist, its run selection recomputed by
    every program. run_logits fp32 [batch, q_heads, R] (centroid_group_logits over runs of
    run_pages pages); runs: (kept, sink, recent) runs (centroid_reference.shortlist_run_counts);
    cents, stats: the groups' summaries as centroid_group_logits takes them; page_tables int32
    [batch, >= R * run_pages] (whole runs) -> (logits fp32 [batch, q_heads, kept * run_pages //
    group_pages], -inf for the shortlist's last group, garbage past it; the compact tables int32
    [batch, kv_heads, kept * run_pages], each KV head's shortlisted runs' pages in order; the
    shortlists' lengths int32 [batch]): what combine_select(run_logits, ..., expand=run_pages)
    followed by centroid_group_logits over its tables gives. sort: the run top-k's
    (top_k.sort_width); block_n, num_warps, row_tile: the scorer's tile (score_tuning)."""
    batch, q_heads, head_dim = q.shape
    kv_heads, clusters = cents.shape[1:3]
    keep, sink, recent = runs
    max_runs = run_logits.shape[2]
    assert run_pages % group_pages == 0 and page_tables.shape[1] >= max_runs * run_pages
    assert q.stride(2) == 1 and cents.stride(3) == 1 and stats.stride(3) == 1 and run_logits.stride(2) == 1
    assert page_tables.stride(1) == 1 and page_tables.dtype == seq_lens.dtype == torch.int32
    assert run_logits.shape[:2] == (batch, q_heads) and stats.dtype == torch.float32 and keep > sink + recent
    max_groups = keep * run_pages // group_pages
    out = torch.empty(batch, q_heads, max_groups, device=q.device, dtype=torch.float32)
    compact = torch.empty(batch, kv_heads, keep * run_pages, device=q.device, dtype=torch.int32)
    short_lens = torch.empty_like(seq_lens)
    group = q_heads // kv_heads
    block_n = block_n or max(1, 64 // clusters)
    block_r = max(16, triton.next_power_of_2(max_runs))
    _shortlist_group_logits[(batch, kv_heads, triton.cdiv(max_groups, block_n))](
        q, cents, stats, run_logits, page_tables, seq_lens, out, compact, short_lens, q.stride(0), q.stride(1),
        *cents.stride()[:3], *stats.stride()[:3], run_logits.stride(0), run_logits.stride(1), page_tables.stride(0),
        out.stride(0), out.stride(1), compact.stride(0), compact.stride(1), max_runs, max_groups, keep, sink, recent,
        scale, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), BLOCK_G=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, C=clusters, BLOCK_N=block_n, GROUP_PAGES=group_pages, RUN_PAGES=run_pages,
        PAGE_SIZE=page_size, BLOCK_R=block_r, SORT=sort_width(sort, keep, block_r), DOT_F32=interpreted,
        ROW_TILE=row_tile, num_warps=num_warps or 1)
    return out, compact, short_lens
