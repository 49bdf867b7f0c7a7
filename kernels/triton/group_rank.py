"""Group selection by rank: the centroid selector's top-k (kernels/triton/centroids.py) without a
serial chain, for rows few enough that one program per row would leave the GPU idle.

selection.combine_select finds a row's k-th best score by a radix search: up to 32 dependent
whole-row reductions in one program per (sequence, KV head). At batch 1 that is 8 programs on a
132-SM GPU, each a long chain (H200: 8.7 us at 32k, 15.3 at 128k, more than the attention after
it). Here a row is spread over many programs, each owning BLOCK_I groups: it takes each q head's
log-sum-exp over the row, the row's scores as combine_select computes them (log-softmax at the
attention scale, max over the GQA group, sink groups +inf), and the rank of each of its groups, the
number of candidates that beat it (a higher score, or an equal one at a lower index; the recent
groups are no candidates). A group is kept when its rank is below the budget left after the recent
groups, and written at slot = rank; the recent groups take the row's last slots in order, so
that the partial last group closes the virtual sequence as split_k_decode reads it (vlens). The
work is rows x groups^2 comparisons, so this pays for few rows (batch 1, long contexts) and the
radix search for many (selection_plan chooses from the shapes, once).

The kept set is select_pages's (reference) for distinct scores, as combine_select's; only the order
of the kept groups in the output differs (best first instead of ascending), which the attention
does not see beyond the order of its float sums. Static-shaped and sync-free (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.selection import selection_outputs


@triton.jit
def _head_lse(Row, s_h, n_groups, scale, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_J: tl.constexpr):
    """Each q head's log-sum-exp of its logits (times scale) over the row's n_groups groups."""
    offs_g = tl.arange(0, GROUP_P)
    mask_g = offs_g < GROUP
    top = tl.full([GROUP_P], -3.0e38, tl.float32)       # finite: exp(top - new_top) stays a number
    total = tl.zeros([GROUP_P], tl.float32)
    for j0 in range(0, n_groups, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        m2 = mask_g[:, None] & (offs_j < n_groups)[None, :]
        x = tl.load(Row + offs_g[:, None] * s_h + offs_j[None, :], mask=m2, other=float("-inf")) * scale
        new_top = tl.maximum(top, tl.max(x, 1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[:, None]), 1)
        top = new_top
    return tl.where(mask_g, top + tl.log(total), 0.0)     # padding heads: 0, never a NaN downstream


@triton.jit
def _rank_keys(Row, s_h, offs, cand, sink, lse, scale, GROUP: tl.constexpr, GROUP_P: tl.constexpr):
    """Order keys (int64, distinct) of the groups offs: the score's float order in the high word
    (sink groups +inf, non-candidates -inf), the index reversed in the low word, so that a larger
    key is a better group and equal scores go to the lower index."""
    offs_g = tl.arange(0, GROUP_P)
    valid = offs < cand
    m2 = (offs_g < GROUP)[:, None] & valid[None, :]
    x = tl.load(Row + offs_g[:, None] * s_h + offs[None, :], mask=m2, other=0.0) * scale
    score = tl.max(tl.where(m2, x - lse[:, None], float("-inf")), 0)
    score = tl.where(offs < sink, float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)      # -0.0 ties with +0.0
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)                                  # signed, in float order
    return (order.to(tl.int64) << 32) + (2147483647 - offs).to(tl.int64)


@triton.jit
def _rank_select(Logits, PT, SeqLens, Logical, Physical, VLens, s_lb, s_lh, s_pb, s_xb, s_xh, s_yb, s_yh,
                 scale, budget, sink, recent, k_sel, max_groups, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, SPAN: tl.constexpr, EXPAND: tl.constexpr):
    """One program per (sequence, KV head, BLOCK_I groups): their ranks, kept groups written at
    their slots (the module docstring)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    blk = tl.program_id(2)
    offs_i = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, EXPAND)
    # the pages of this program's groups, loaded with the length (not once the ranks are known:
    # one dependent memory trip fewer; groups past the sequence are never stored)
    pages = tl.load(PT + b.to(tl.int64) * s_pb + offs_i[:, None] * EXPAND + offs_r[None, :],
                    mask=(offs_i < max_groups)[:, None], other=0)                        # [BLOCK_I, EXPAND]
    seq_len = tl.load(SeqLens + b)
    n = tl.cdiv(seq_len, SPAN)
    k = tl.minimum(n, budget)
    logical_row = Logical + b * s_xb + kvh * s_xh
    physical_row = Physical + b * s_yb + kvh * s_yh
    if blk == 0:
        for p0 in range(k, k_sel, BLOCK_I):       # padding past a short row's groups (never read)
            offs_p = p0 + tl.arange(0, BLOCK_I)
            pad = offs_p < k_sel
            tl.store(logical_row + offs_p, -1, mask=pad)
            for r in tl.static_range(EXPAND):
                tl.store(physical_row + offs_p * EXPAND + r, 0, mask=pad)
        if kvh == 0:
            tl.store(VLens + b, seq_len - tl.maximum(n - budget, 0) * SPAN)
    if blk * BLOCK_I >= n:
        return
    if n <= budget:                     # the whole row, in order
        take = offs_i < n
        slot = offs_i
    else:
        row = Logits + b * s_lb + kvh * GROUP * s_lh
        lse = _head_lse(row, s_lh, n, scale, GROUP, GROUP_P, BLOCK_J)
        cand = n - recent
        key_i = _rank_keys(row, s_lh, offs_i, cand, sink, lse, scale, GROUP, GROUP_P)
        rank = tl.zeros([BLOCK_I], tl.int32)
        for j0 in range(0, cand, BLOCK_J):
            key_j = _rank_keys(row, s_lh, j0 + tl.arange(0, BLOCK_J), cand, sink, lse, scale, GROUP, GROUP_P)
            rank += tl.sum((key_j[None, :] > key_i[:, None]).to(tl.int32), 1)
        is_recent = (offs_i >= cand) & (offs_i < n)
        take = is_recent | ((offs_i < cand) & (rank < k - recent))
        slot = tl.where(is_recent, k - (n - offs_i), rank)
    tl.store(logical_row + slot, offs_i, mask=take)
    tl.store(physical_row + slot[:, None] * EXPAND + offs_r[None, :], pages, mask=take[:, None])


def rank_select(logits: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor, span: int,
                kv_heads: int, force: tuple[int, int, int], scale: float, expand: int,
                block_i: int | None = None, block_j: int | None = None, num_warps: int = 4
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """combine_select(logits, ..., force[0], expand=expand)'s outputs, by rank: logits [batch,
    q_heads, G] (centroids.centroid_group_logits), page_tables int32 [batch, >= G * expand];
    force (budget, sink, recent) in groups -> (logical groups [batch, kv_heads, k], the physical ids
    of their pages [batch, kv_heads, k * expand], virtual lengths [batch]), k = min(budget, G):
    the kept groups best first, the recent ones last (padding -1 / 0 past a short row's groups)."""
    batch, q_heads, max_groups = logits.shape
    budget, sink, recent = force
    assert logits.stride(2) == 1 and page_tables.stride(1) == 1 and page_tables.shape[1] >= max_groups * expand
    assert page_tables.dtype == seq_lens.dtype == torch.int32 and budget > sink + recent
    assert expand & (expand - 1) == 0, "a group's pages are loaded as one power-of-two run"
    group = q_heads // kv_heads
    (logical, physical, vlens, _), _, _, k_sel = selection_outputs(batch, kv_heads, max_groups, budget, page_tables,
                                                                    None, expand)
    block_i = block_i or rank_block(batch * kv_heads, max_groups)
    group_p = triton.next_power_of_2(group)
    block_j = block_j or max(16, min(triton.next_power_of_2(max_groups), 8192 // block_i, 2048 // group_p))
    _rank_select[(batch, kv_heads, triton.cdiv(max_groups, block_i))](
        logits, page_tables, seq_lens, logical, physical, vlens, logits.stride(0), logits.stride(1),
        page_tables.stride(0), logical.stride(0), logical.stride(1), physical.stride(0), physical.stride(1),
        scale, budget, sink, recent, k_sel, max_groups, GROUP=group, GROUP_P=group_p, BLOCK_I=block_i, BLOCK_J=block_j,
        SPAN=span, EXPAND=expand, num_warps=num_warps)
    return logical, physical, vlens


def rank_block(rows: int, max_groups: int, programs: int = 256) -> int:
    """Groups per program: enough programs (about `programs`) to spread few rows over the GPU,
    at least 16 groups each (H200, b1 x 32k, a table of 1024 groups: 32 a program 5.8-6.3 us,
    16 6.0-7.1, 64 6.7-10.1; loading the whole row once instead of in two loops: no faster)."""
    per_row = max(1, programs // rows)
    return max(16, min(triton.next_power_of_2(max_groups), triton.next_power_of_2(-(-max_groups // per_row))))
