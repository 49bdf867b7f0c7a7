"""Group selection and the attention over the chosen groups in one launch, for few rows.

At batch 1 the centroid decode is a chain of latencies, not of bytes: the selection kernel (one
row's top k, its pages written out) and the attention kernel (those pages read back, then K/V)
each pay a launch and their own dependent memory trips. Here every attention program (sequence,
KV head, split) runs the row's selection itself, in registers: the group scores of
selection.group_scores, the exact top k of top_k.keep_top_k, the kept groups compacted in
ascending order as combine_select compacts them. A split covers SPLIT_GROUPS consecutive kept
groups of that order (the virtual sequence split_k_decode(fixed_splits=True) reads from
combine_select's output, so the keys, their order and the partials are the same), looks up their
pages in the sequence's own table and attends to them in one block; decode.merge_splits merges the
splits. The selection is repeated by every split of a row: that costs no time while the rows are
few (its latency is paid once either way), and for many rows the three-launch path stays
(kernels/triton/centroids.centroid_sparse_decode chooses).

About a wave of rows of few groups (select_then_attend, the coarse-to-fine shortlist's 128): one
program per (sequence, KV head) does what combine_select(expand=...) does for its row, stores the
chosen pages, and after a barrier attends to them as split_k_decode's single split does
(decode.attend_split, the output written directly): the selection's launch and the attention's
wait for it are gone, and every step of the arithmetic is the two kernels' own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.decode import LOG2E, attend_split, check_kv, dot_upcast, merge_splits, mma
from kernels.triton.selection import (
    group_scores,
    row_budget,
    row_group_pages,
    selection_outputs,
    store_selection,
)
from kernels.triton.top_k import keep_top_k, sort_width


@triton.jit
def _select_attend(Q, K, V, Logits, PT, SeqLens, MidO, MidL, Budgets, qk_scale, scale, budget, sink, recent,
                   max_groups, s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_lb, s_lh, s_pb, s_ph, s_ob, s_oh,
                   s_os, s_mb, s_mh, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, SPAN: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   SPLIT_GROUPS: tl.constexpr, UPCAST: tl.constexpr, SORT: tl.constexpr, HEADS: tl.constexpr):
    """One program per (KV head, sequence, split): the row's selection, then this split's keys
    (HEADS > 0: each KV head's own budget, Budgets[kvh]; its splits past them are empty)."""
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    budget = row_budget(Budgets, kvh, budget, HEADS)
    BLOCK_N: tl.constexpr = SPLIT_GROUPS * SPAN
    offs = tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=mask_h[:, None], other=0.0)
    seq_len = tl.load(SeqLens + b)
    n = tl.cdiv(seq_len, SPAN)
    # the row's selection (combine_select's, to the compaction)
    score = group_scores(Logits, b, kvh, offs, offs < n, n, s_lb, s_lh, scale, budget, sink, recent, GROUP,
                         BLOCK_G, BLOCK_P, True, max_groups)
    take = keep_top_k(score, tl.minimum(n, budget), True, SORT)
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    vlen = seq_len - tl.maximum(n - budget, 0) * SPAN       # the kept groups' tokens, the last one partial
    # this split's virtual tokens and the kept group (its entry in the row) each belongs to
    offs_t = split * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_t = offs_t // SPAN
    entry_t = tl.zeros([BLOCK_N], tl.int32)
    for g in tl.static_range(SPLIT_GROUPS):
        slot = split * SPLIT_GROUPS + g
        entry = tl.sum(tl.where(take & (pos == slot), offs, 0), 0)
        entry_t = tl.where(slot_t == slot, entry, entry_t)
    mask_t = offs_t < vlen
    table = PT + b.to(tl.int64) * s_pb + kvh * s_ph        # the sequence's table, or its KV head's
    page = tl.load(table + entry_t * (SPAN // PAGE_SIZE) + (offs_t % SPAN) // PAGE_SIZE, mask=mask_t,
                   other=0).to(tl.int64)
    slot_in = offs_t % PAGE_SIZE
    k = tl.load(K + kvh * s_kh + (page * s_kp + slot_in * s_ks)[:, None] + offs_d[None, :], mask=mask_t[:, None],
                other=0.0)
    v = tl.load(V + kvh * s_vh + (page * s_vp + slot_in * s_vs)[:, None] + offs_d[None, :], mask=mask_t[:, None],
                other=0.0)
    # one block of decode._decode_stage1's online softmax from its start (the same arithmetic)
    qk = mma(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST) * qk_scale
    qk = tl.where(mask_t[None, :], qk, float("-inf"))
    m = tl.max(qk, 1)
    m_ref = tl.where(m > float("-inf"), m, 0.0)              # a split past the row's end: weights 0
    p = tl.exp2(qk - m_ref[:, None])
    l_i = tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, tl.zeros([BLOCK_H, HEAD_DIM], tl.float32), UPCAST)
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    tl.store(MidO + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out, mask=mask_h[:, None])
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(MidL + b * s_mb + heads * s_mh + split, lse, mask=mask_h)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, logits: torch.Tensor,
                  page_tables: torch.Tensor, seq_lens: torch.Tensor, span: int) -> tuple[int, ...]:
    """What both launchers take, checked -> (batch, q_heads, head_dim, page_size, kv_heads, groups)."""
    check_kv(q, k_cache, v_cache)
    page_size, kv_heads = k_cache.shape[1:3]
    max_groups = logits.shape[2]
    assert span % page_size == 0 and page_tables.shape[-1] >= max_groups * (span // page_size)
    assert page_tables.dim() == 2 or page_tables.shape[1] == kv_heads, "the sequence's table or each KV head's"
    assert logits.stride(2) == 1 and page_tables.stride(-1) == 1 and q.stride(2) == 1
    assert page_tables.dtype == seq_lens.dtype == torch.int32
    return (*q.shape, page_size, kv_heads, max_groups)


def _check_head_budgets(head_budgets: torch.Tensor | None, kv_heads: int) -> None:
    """A budget per KV head comes as int32 [kv_heads] groups, each within force[0] (not checked here:
    reading it would wait for the device; the caller validates its table once)."""
    assert head_budgets is None or (head_budgets.shape == (kv_heads,) and head_budgets.dtype == torch.int32)


def select_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, logits: torch.Tensor,
                  page_tables: torch.Tensor, seq_lens: torch.Tensor, span: int, force: tuple[int, int, int],
                  scale: float, split_groups: int = 2, num_warps: int = 8,
                  out: torch.Tensor | None = None, sort: str | None = None,
                  head_budgets: torch.Tensor | None = None) -> torch.Tensor:
    """combine_select(logits, ..., force[0], expand=span // page_size) then split_k_decode(...,
    fixed_splits=True) over its pages with force[0] / split_groups splits, in one launch plus the
    split merge. logits [batch, q_heads, G] (centroids.centroid_group_logits, / scale); q [batch,
    q_heads, d]; caches [num_pages, page_size, kv_heads, d]; page_tables int32 [batch, >= G *
    span / page_size]; force (budget, sink, recent) in groups -> out [batch, q_heads, d] (written
    and returned). head_budgets: int32 [kv_heads], each KV head's budget in groups (force[0] the
    largest: the splits cover it, a smaller head's last ones empty)."""
    batch, q_heads, head_dim, page_size, kv_heads, max_groups = _check_inputs(q, k_cache, v_cache, logits,
                                                                              page_tables, seq_lens, span)
    budget, sink, recent = force
    assert budget > sink + recent and budget % split_groups == 0, "whole splits of kept groups"
    _check_head_budgets(head_budgets, kv_heads)
    group = q_heads // kv_heads
    splits = budget // split_groups
    block_p = max(16, triton.next_power_of_2(max_groups))
    mid_o = torch.empty(batch, q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
    mid_l = torch.empty(batch, q_heads, splits, device=q.device, dtype=torch.float32)
    _select_attend[(kv_heads, batch, splits)](
        q, k_cache, v_cache, logits, page_tables, seq_lens, mid_o, mid_l,
        mid_l if head_budgets is None else head_budgets, scale * LOG2E, scale, budget, sink,
        recent, max_groups, q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        logits.stride(0), logits.stride(1), page_tables.stride(0),
        page_tables.stride(1) if page_tables.dim() == 3 else 0, *mid_o.stride()[:3], *mid_l.stride()[:2],
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_G=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, BLOCK_P=block_p, SPAN=span, PAGE_SIZE=page_size, SPLIT_GROUPS=split_groups,
        UPCAST=dot_upcast(q.dtype), num_warps=num_warps, SORT=sort_width(sort, budget, block_p),
        HEADS=0 if head_budgets is None else kv_heads)
    return merge_splits(mid_o, mid_l, torch.empty_like(q) if out is None else out)


@triton.jit
def _select_then_attend(Q, K, V, Logits, PT, SeqLens, Logical, Physical, VLens, Out, Budgets, qk_scale, scale,
                        budget, sink, recent, max_groups, k_sel, s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
                        s_lb, s_lh, s_pb, s_ph, s_xb, s_xh, s_yb, s_yh, s_ob, s_oh,
                        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, SPAN: tl.constexpr,
                        PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                        SORT: tl.constexpr, HEADS: tl.constexpr):
    """One program per (KV head, sequence): combine_select's row (_combine_select with EXPAND), then
    the chosen pages' attention (split_k_decode's one fixed split, DIRECT). HEADS > 0: each KV
    head's own budget, Budgets[kvh]."""
    GROUP_PAGES: tl.constexpr = SPAN // PAGE_SIZE
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    budget = row_budget(Budgets, kvh, budget, HEADS)
    groups = row_group_pages(PT, b, kvh, s_pb, s_ph, max_groups, BLOCK_P, GROUP_PAGES)
    seq_len = tl.load(SeqLens + b)
    n = tl.cdiv(seq_len, SPAN)
    offs = tl.arange(0, BLOCK_P)
    score = group_scores(Logits, b, kvh, offs, offs < n, n, s_lb, s_lh, scale, budget, sink, recent, GROUP,
                         BLOCK_G, BLOCK_P, True, max_groups)
    k = tl.minimum(n, budget)
    take = keep_top_k(score, k, True, SORT)
    store_selection(take, offs, b, kvh, seq_len, n, k, PT, Logical, Physical, VLens, s_pb, s_ph, s_xb, s_xh, s_yb,
                     s_yh, budget, k_sel, BLOCK_P, SPAN, GROUP_PAGES, groups, HEADS)
    tl.debug_barrier()      # the chosen pages are read back below by other threads of this program
    vlen = seq_len - tl.maximum(n - budget, 0) * SPAN
    tokens = k_sel * SPAN
    attend_split(Q, K, V, Physical + b * s_yb + kvh * s_yh, vlen, b, kvh, 0, Out, Out, qk_scale, 1,
                 tl.cdiv(tokens, BLOCK_N) * BLOCK_N, tokens, s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, 1,
                 s_ob, s_oh, 0, 0, 0, GROUP, BLOCK_H, HEAD_DIM, BLOCK_N, PAGE_SIZE, UPCAST, True, True, False,
                 False, True)


def select_then_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, logits: torch.Tensor,
                       page_tables: torch.Tensor, seq_lens: torch.Tensor, span: int, force: tuple[int, int, int],
                       scale: float, out: torch.Tensor | None = None, sort: str | None = None, block_n: int = 64,
                       num_warps: int = 4, num_stages: int = 2,
                       head_budgets: torch.Tensor | None = None) -> torch.Tensor:
    """combine_select(logits, ..., force[0], expand=span // page_size, sort=sort) then
    split_k_decode(..., num_splits=1, fixed_splits=True, block_n, num_warps, num_stages; the same
    defaults) over its pages, in one launch of one program per (sequence, KV head). logits [batch, q_heads, G]
    (centroid_scores.centroid_group_logits, / scale); q [batch, q_heads, d]; caches [num_pages,
    page_size, kv_heads, d]; page_tables int32 [batch, >= G * span / page_size], or per KV head
    [batch, kv_heads, ...] (a shortlist's compact tables); force (budget, sink, recent) in groups
    -> out [batch, q_heads, d] (written and returned). head_budgets: as select_attend's."""
    batch, q_heads, head_dim, page_size, kv_heads, max_groups = _check_inputs(q, k_cache, v_cache, logits,
                                                                              page_tables, seq_lens, span)
    budget, sink, recent = force
    group = q_heads // kv_heads
    _check_head_budgets(head_budgets, kv_heads)
    (logical, physical, vlens, _), strides, block_p, k_sel = selection_outputs(
        batch, kv_heads, max_groups, budget, page_tables, None, span // page_size, head_vlens=head_budgets is not None)
    out = torch.empty_like(q) if out is None else out
    _select_then_attend[(kv_heads, batch)](
        q, k_cache, v_cache, logits, page_tables, seq_lens, logical, physical, vlens, out,
        vlens if head_budgets is None else head_budgets, scale * LOG2E, scale,
        budget, sink, recent, max_groups, k_sel, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], logits.stride(0), logits.stride(1), *strides[:6], out.stride(0),
        out.stride(1), GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_P=block_p, SPAN=span, PAGE_SIZE=page_size,
        BLOCK_N=block_n, UPCAST=dot_upcast(q.dtype), SORT=sort_width(sort, budget, block_p),
        HEADS=0 if head_budgets is None else kv_heads, num_warps=num_warps, num_stages=num_stages)
    return out
