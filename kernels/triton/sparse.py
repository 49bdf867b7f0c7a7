"""Quest sparse decode: score pages by their key summaries, keep the best under a token budget (plus
sink and recent pages), and attend only to those.

A: a Triton kernel computes every used page's Quest bound for each q head: the best, over the
   page's written summary blocks, of sum_d max(q_d * kmin_d, q_d * kmax_d), reading only kmin/kmax
   (2 rows per summary_tokens keys); a second one scores each page per (sequence, KV head) as
   reference.quest_page_scores does: per q head a log-softmax of the bounds over the sequence's
   pages (attention scale), then the max over the GQA group. Sink and recent pages (and every page
   of a sequence that fits the budget) get +inf, pages past the sequence get -inf.
B (kernels/triton/selection.py, fused with A's scoring step): one program per (sequence, KV head)
   finds the k-th largest score exactly (radix search on the float bits), keeps the pages above it
   (ties: lower index first), and writes them in ascending order through the page table: a
   per-(sequence, KV head) page list whose last entry is the (possibly partial) last page, so it
   reads like a shorter sequence of length seq_len - dropped_pages * page_size. (One launch
   instead of topk + sort + gather.)
C: the dense split-K decode kernel (decode.py) over those per-head page lists.
Everything is static-shaped and sync-free (CUDA-graph safe). A sequence that fits the budget gets
its own page table back unchanged, so with the same num_splits its output is bitwise that of dense
decode; when no sequence can exceed the budget the launcher calls dense decode directly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import default_scale, shortlist_pages, sparse_page_counts
from kernels.triton.decode import check_kv, default_num_splits, num_sms, paged_decode, split_k_decode
from kernels.triton.selection import combine_heads, combine_select
from kernels.triton.top_k import prefers_top_k


@triton.jit
def _group_bounds(Q, b, kvh, s_qb, s_qh, lo, hi, written, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCKS: tl.constexpr, DOT: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """The Quest bound of each q head of a KV head's group over tiles lo, hi [BLOCK_P, BLOCKS, d]
    of summary rows (zero where unwritten): the best over each page's written blocks ->
    [BLOCK_P, GROUP_P] fp32 (columns past GROUP: garbage). DOT: since kmin <= kmax element-wise,
    max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo, so the bounds of the whole group are two small
    matmuls on the tensor cores (products of the summaries' dtype, exact, summed in fp32); else
    the same sums on the CUDA cores, one q head at a time. DOT_F32: the matmuls in fp32 (the same
    exact products; Triton's interpreter gets 16-bit float dots wrong)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_P)
    if DOT:
        q = tl.load(Q + b * s_qb + (kvh * GROUP + offs_g[None, :]) * s_qh + offs_d[:, None],
                    mask=(offs_g < GROUP)[None, :], other=0.0).to(tl.float32)             # [d, GROUP_P]
        rows_hi = tl.reshape(hi, [BLOCK_P * BLOCKS, HEAD_DIM])
        rows_lo = tl.reshape(lo, [BLOCK_P * BLOCKS, HEAD_DIM])
        if DOT_F32:
            rows_hi, rows_lo = rows_hi.to(tl.float32), rows_lo.to(tl.float32)
        elif rows_hi.dtype.primitive_bitwidth == 8:   # 8-bit summaries (bench/sparse_stages.py --summary-dtype)
            rows_hi, rows_lo = rows_hi.to(tl.bfloat16), rows_lo.to(tl.bfloat16)
        q_pos = tl.maximum(q, 0.0).to(rows_hi.dtype)
        q_neg = tl.minimum(q, 0.0).to(rows_hi.dtype)
        acc = tl.dot(rows_hi, q_pos, input_precision="ieee")
        acc = tl.dot(rows_lo, q_neg, acc, input_precision="ieee")
        bound = tl.reshape(acc, [BLOCK_P, BLOCKS, GROUP_P])
        best = tl.max(tl.where(written[:, :, None], bound, float("-inf")), 1)
    else:
        lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
        best = tl.full([BLOCK_P, GROUP_P], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qv = tl.load(Q + b * s_qb + (kvh * GROUP + g) * s_qh + offs_d).to(tl.float32)[None, None, :]
            bound = tl.sum(hi32 * tl.maximum(qv, 0.0) + lo32 * tl.minimum(qv, 0.0), 2)   # [BLOCK_P, BLOCKS]
            bound = tl.max(tl.where(written, bound, float("-inf")), 1)
            best = tl.where(offs_g[None, :] == g, bound[:, None], best)
    return best


@triton.jit
def _quest_head_bounds(Q, KMin, KMax, PT, SeqLens, Bounds, s_qb, s_qh, s_mp, s_mb, s_mh, s_xp, s_xb, s_xh,
                       s_pb, s_bb, s_bh, max_pages,
                       GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
                       PAGE_SIZE: tl.constexpr, BLOCKS: tl.constexpr, DOT: tl.constexpr,
                       DOT_F32: tl.constexpr):
    """One program per (sequence, KV head, block of pages): the Quest bound of each q head of the
    group, the best over each page's written summary blocks (_group_bounds)."""
    SUB: tl.constexpr = PAGE_SIZE // BLOCKS
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(SeqLens + b)
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    if tl.program_id(2) * BLOCK_P >= n_pages:
        return      # past the sequence: the table is wider than it (its entries are never read)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_j = tl.arange(0, BLOCKS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_P)
    valid = offs_p < n_pages
    written = (offs_p[:, None] * PAGE_SIZE + offs_j[None, :] * SUB) < seq_len       # [BLOCK_P, BLOCKS]
    page = tl.load(PT + b.to(tl.int64) * s_pb + offs_p, mask=valid, other=0).to(tl.int64)
    m3 = written[:, :, None]
    lo = tl.load(KMin + page[:, None, None] * s_mp + offs_j[None, :, None] * s_mb + kvh * s_mh
                 + offs_d[None, None, :], mask=m3, other=0.0)
    hi = tl.load(KMax + page[:, None, None] * s_xp + offs_j[None, :, None] * s_xb + kvh * s_xh
                 + offs_d[None, None, :], mask=m3, other=0.0)
    best = _group_bounds(Q, b, kvh, s_qb, s_qh, lo, hi, written, GROUP, GROUP_P, HEAD_DIM, BLOCK_P, BLOCKS, DOT,
                         DOT_F32)
    tl.store(Bounds + b * s_bb + (kvh * GROUP + offs_g[None, :]) * s_bh + offs_p[:, None], best,
             mask=(offs_p < max_pages)[:, None] & (offs_g < GROUP)[None, :])


@triton.jit
def _quest_head_bounds_all_heads(Q, KMin, KMax, PT, SeqLens, Bounds, s_qb, s_qh, s_mp, s_mb, s_mh,
                                 s_xp, s_xb, s_xh, s_pb, s_bb, s_bh, max_pages, pages_per_prog,
                                 KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_KVH: tl.constexpr,
                                 BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
                                 PAGE_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """One program per (sequence, block of pages), all KV heads at once: a summary block's rows for
    all heads are contiguous (and so are a page's blocks), read once for the whole group. Since
    kmin <= kmax element-wise, max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo. The best bound over a
    page's written blocks is kept per (page, KV head, group head) in registers."""
    SUB: tl.constexpr = PAGE_SIZE // BLOCKS
    b = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_KVH)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < KV_HEADS
    seq_len = tl.load(SeqLens + b)
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    hd_lo = offs_h[None, :, None] * s_mh + offs_d[None, None, :]
    hd_hi = offs_h[None, :, None] * s_xh + offs_d[None, None, :]
    out_heads = (offs_h[None, :, None] * GROUP + offs_g[None, None, :]) * s_bh     # [1, KVH, G]
    mask_hg = mask_h[None, :, None] & (offs_g < GROUP)[None, None, :]
    p_start = tl.program_id(1) * pages_per_prog
    for p0 in range(p_start, tl.minimum(p_start + pages_per_prog, tl.minimum(n_pages, max_pages)), BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        valid = offs_p < n_pages
        page = tl.load(PT + b.to(tl.int64) * s_pb + offs_p, mask=valid, other=0).to(tl.int64)
        best = tl.full([BLOCK_P, BLOCK_KVH, BLOCK_G], float("-inf"), tl.float32)
        for j in tl.static_range(BLOCKS):
            written = offs_p * PAGE_SIZE + j * SUB < seq_len                           # implies valid
            m3 = written[:, None, None] & mask_h[None, :, None]
            lo = tl.load(KMin + page[:, None, None] * s_mp + j * s_mb + hd_lo, mask=m3, other=0.0).to(tl.float32)
            hi = tl.load(KMax + page[:, None, None] * s_xp + j * s_xb + hd_hi, mask=m3, other=0.0).to(tl.float32)
            for g in tl.static_range(GROUP):
                qv = tl.load(Q + b * s_qb + (offs_h[:, None] * GROUP + g) * s_qh + offs_d[None, :],
                             mask=mask_h[:, None], other=0.0).to(tl.float32)[None, :, :]
                bound = tl.sum(hi * tl.maximum(qv, 0.0) + lo * tl.minimum(qv, 0.0), 2)  # [BLOCK_P, BLOCK_KVH]
                bound = tl.where(written[:, None], bound, float("-inf"))
                best = tl.where(offs_g[None, None, :] == g, tl.maximum(best, bound[:, :, None]), best)
        tl.store(Bounds + b * s_bb + out_heads + offs_p[:, None, None], best,
                 mask=(offs_p < max_pages)[:, None, None] & mask_hg)


# The per-head bounds kernels' group sums as tensor-core matmuls (_group_bounds); a tl.dot needs
# at least 16 rows, columns and reduction elements, so smaller tiles keep the CUDA-core sums.
DOT_BOUNDS = True
DOT_MIN = 16
# read when this module is (re)loaded, which is also when triton.jit picks compiled or interpreted
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_fits(dot: bool, block_p: int, blocks: int, head_dim: int) -> bool:
    return dot and block_p * blocks >= DOT_MIN and head_dim >= DOT_MIN


def _group_width(group: int, dot: bool) -> int:
    """Columns of a group's bounds tile: the group padded to a power of two (and to DOT_MIN for a dot)."""
    return max(DOT_MIN if dot else 1, triton.next_power_of_2(group))


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_tables: torch.Tensor,
                 seq_lens: torch.Tensor, page_size: int, force: tuple[int, int, int] | None = None,
                 scale: float | None = None, **tuning) -> torch.Tensor:
    """Stage A: quest_bounds, then combine_heads -> fp32 scores [batch, kv_heads, max_pages] (-inf
    past each sequence): reference.quest_page_scores, batched (summed in another order: equal to
    rounding), at the attention scale `scale` (default 1/sqrt(d)). force=(budget_pages, sink_pages,
    recent_pages) sets forced pages to +inf. tuning: quest_bounds's."""
    bounds = quest_bounds(q, kmin, kmax, page_tables, seq_lens, page_size, **tuning)
    scale = default_scale(q.shape[2]) if scale is None else scale
    return combine_heads(bounds, seq_lens, page_size, kmin.shape[2], force, scale)


def quest_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_tables: torch.Tensor,
                 seq_lens: torch.Tensor, page_size: int, block_p: int | None = None, num_warps: int | None = None,
                 pages_per_prog: int | None = None, all_heads: bool | None = None,
                 dot: bool | None = None) -> torch.Tensor:
    """The Quest bound of every q head for every page: q [batch, q_heads, d], kmin/kmax [num_pages,
    blocks, kv_heads, d] (reference.py's summaries) -> fp32 [batch, q_heads, max_pages] (entries
    past a sequence are garbage: combine_heads and combine_select never read them).
    all_heads: the bounds kernel runs one program per (sequence, pages_per_prog pages), block_p
    pages per step, every KV head at once (needs kmin <= kmax, true of written blocks);
    pages_per_prog defaults to about 8 programs per SM. Else one program per
    (sequence, KV head, block_p pages) summing max(q*lo, q*hi) directly (the original kernel).
    Default (None): per head. all_heads won with one summary per 64-token page on an H100
    (docs/kernels.md); with the 16-token pages the engine scores coarse to fine, per head with 32
    pages per program is faster on an H200 (bench/sparse_stages.py). dot (per head): the group's
    bounds as two matmuls on the tensor cores (_group_bounds); default DOT_BOUNDS."""
    batch, q_heads, head_dim = q.shape
    blocks, kv_heads = kmin.shape[1:3]
    max_pages = page_tables.shape[1]
    assert kmin.shape == kmax.shape and kmin.shape[2:] == (kv_heads, head_dim) and q_heads % kv_heads == 0
    assert page_size % blocks == 0, f"{blocks} summary blocks do not divide a page of {page_size}"
    assert q.stride(2) == 1 and kmin.stride(3) == 1 and kmax.stride(3) == 1 and page_tables.stride(1) == 1
    assert page_tables.dtype == seq_lens.dtype == torch.int32
    bounds = torch.empty(batch, q_heads, max_pages, device=q.device, dtype=torch.float32)
    group = q_heads // kv_heads
    if all_heads is None:
        all_heads = False
    args = (q, kmin, kmax, page_tables, seq_lens, bounds, q.stride(0), q.stride(1), *kmin.stride()[:3],
            *kmax.stride()[:3], page_tables.stride(0), bounds.stride(0), bounds.stride(1), max_pages)
    if all_heads:
        block_kvh = triton.next_power_of_2(kv_heads)
        # 4 pages x 8 heads x 128 (H100, one summary per page: 22 us vs 28 us per head at b16 x 32k;
        # 8 and 16 pages were slower). Each page's blocks are one more loop over the same tile.
        block_p = block_p or max(1, min(16, 4096 // (block_kvh * head_dim)))
        if pages_per_prog is None:
            per = -(-batch * max_pages // (8 * num_sms(q.device)))
            pages_per_prog = -(-per // block_p) * block_p
        pages_per_prog = max(block_p, -(-pages_per_prog // block_p) * block_p)
        _quest_head_bounds_all_heads[(batch, triton.cdiv(max_pages, pages_per_prog))](
            *args, pages_per_prog, KV_HEADS=kv_heads, GROUP=group, BLOCK_KVH=block_kvh,
            BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_P=block_p, PAGE_SIZE=page_size,
            BLOCKS=blocks, num_warps=num_warps or 4)
    else:
        # a [block_p, blocks, d] tile of 64 summary rows per program (the coarse stage: H200, b16 x
        # 32k at page 16 in a 4096-page table, bench/sparse_stages.py: 47 us with the dot, 59 us for
        # 32 pages without, 68 us for 32 with; all-heads 68-98 us). Programs past a sequence return
        # at once (93 us when they ran their masked loads); looping over several blocks per program
        # instead was slower (61-68 us).
        block_p = block_p or max(1, 64 // blocks)
        dot = _dot_fits(DOT_BOUNDS if dot is None else dot, block_p, blocks, head_dim)
        _quest_head_bounds[(batch, kv_heads, triton.cdiv(max_pages, block_p))](
            *args, GROUP=group, GROUP_P=_group_width(group, dot), HEAD_DIM=head_dim, BLOCK_P=block_p,
            PAGE_SIZE=page_size, BLOCKS=blocks, DOT=dot, DOT_F32=INTERPRETED, num_warps=num_warps or 4)
    return bounds


@triton.jit
def _shortlist_bounds(Q, KMin, KMax, Listed, Phys, SeqLens, Bounds, s_qb, s_qh, s_mp, s_mb, s_mh,
                      s_xp, s_xb, s_xh, s_lb, s_lh, s_yb, s_yh, s_bb, s_bh, width,
                      GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, BLOCKS: tl.constexpr, DOT: tl.constexpr,
                       DOT_F32: tl.constexpr):
    """The fine stage's bounds: one program per (sequence, KV head, BLOCK_P shortlist entries); each
    entry is a logical page (-1: padding) with its physical id; per q head of the group the best
    Quest bound over the page's written summary blocks (-inf for padding; _group_bounds)."""
    SUB: tl.constexpr = PAGE_SIZE // BLOCKS
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_j = tl.arange(0, BLOCKS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_P)
    seq_len = tl.load(SeqLens + b)
    in_row = offs_p < width
    logical = tl.load(Listed + b * s_lb + kvh * s_lh + offs_p, mask=in_row, other=-1)
    page = tl.load(Phys + b * s_yb + kvh * s_yh + offs_p, mask=in_row, other=0).to(tl.int64)
    written = (logical[:, None] >= 0) & ((logical[:, None] * PAGE_SIZE + offs_j[None, :] * SUB) < seq_len)
    m3 = written[:, :, None]
    lo = tl.load(KMin + page[:, None, None] * s_mp + offs_j[None, :, None] * s_mb + kvh * s_mh
                 + offs_d[None, None, :], mask=m3, other=0.0)
    hi = tl.load(KMax + page[:, None, None] * s_xp + offs_j[None, :, None] * s_xb + kvh * s_xh
                 + offs_d[None, None, :], mask=m3, other=0.0)
    best = _group_bounds(Q, b, kvh, s_qb, s_qh, lo, hi, written, GROUP, GROUP_P, HEAD_DIM, BLOCK_P, BLOCKS, DOT,
                         DOT_F32)
    tl.store(Bounds + b * s_bb + (kvh * GROUP + offs_g[None, :]) * s_bh + offs_p[:, None], best,
             mask=in_row[:, None] & (offs_g < GROUP)[None, :])


def shortlist_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, listed: torch.Tensor,
                     physical: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_p: int | None = None,
                     num_warps: int | None = None, dot: bool | None = None) -> torch.Tensor:
    """The fine stage's bounds over a shortlist (listed logical pages and their physical ids, int32
    [batch, kv_heads, S]): per q head, each listed page's best block bound -> [batch, q_heads, S]
    (-inf for padding entries). dot: as quest_bounds's."""
    batch, q_heads, head_dim = q.shape
    blocks, kv_heads = kmin.shape[1:3]
    width = listed.shape[2]
    assert listed.shape == physical.shape == (batch, kv_heads, width)
    assert listed.stride(2) == physical.stride(2) == 1 and kmin.stride(3) == kmax.stride(3) == 1
    bounds = torch.empty(batch, q_heads, width, device=q.device, dtype=torch.float32)
    # 64 summary rows and 4 warps per program with the dot (H200, b16 x 32k, shortlist 512: 43.4 us,
    # 16 rows and 1 warp 44.8); without it 8 rows and 1 warp (49.5 us; 16 and 2 warps 51.0)
    dot = DOT_BOUNDS if dot is None else dot
    block_p = block_p or max(1, (64 if dot else 8) // blocks)
    dot = _dot_fits(dot, block_p, blocks, head_dim)
    _shortlist_bounds[(batch, kv_heads, triton.cdiv(width, block_p))](
        q, kmin, kmax, listed, physical, seq_lens, bounds, q.stride(0), q.stride(1), *kmin.stride()[:3],
        *kmax.stride()[:3], listed.stride(0), listed.stride(1), physical.stride(0), physical.stride(1),
        bounds.stride(0), bounds.stride(1), width, GROUP=q_heads // kv_heads,
        GROUP_P=_group_width(q_heads // kv_heads, dot), HEAD_DIM=head_dim, BLOCK_P=block_p, PAGE_SIZE=page_size,
        BLOCKS=blocks, DOT=dot, DOT_F32=INTERPRETED, num_warps=num_warps or (4 if dot else 1))
    return bounds


def shortlist_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, listed: torch.Tensor,
                     physical: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     force: tuple[int, int, int], scale: float, **tuning) -> torch.Tensor:
    """The fine stage's scores over a shortlist: shortlist_bounds, log-softmax over the shortlist,
    max over the group, forced pages +inf -> [batch, kv_heads, S] (reference.shortlist_page_scores's
    values at the listed pages)."""
    bounds = shortlist_bounds(q, kmin, kmax, listed, physical, seq_lens, page_size, **tuning)
    return combine_heads(bounds, seq_lens, page_size, kmin.shape[2], force, scale, listed)


def _by_top_k(entries: int, keep: int, select: dict) -> dict:
    """select_tuning with the bitonic top-k where it is faster (top_k.prefers_top_k; 4 warps:
    H200 fine stage k 128 of 512, b16 4.6 us against 5.9 with 8 and 7.1 by radix search)."""
    return {"sort": "topk", "num_warps": 4, **select} if prefers_top_k(entries, keep) else select


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kmin: torch.Tensor,
                  kmax: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor,
                  budget_tokens: int, sink_tokens: int, recent_tokens: int, scale: float | None = None,
                  return_selection: bool = False, score_tuning: dict | None = None,
                  select_tuning: dict | None = None, pmin: torch.Tensor | None = None,
                  pmax: torch.Tensor | None = None, shortlist_tokens: int = 0, **tuning):
    """Batched reference.sparse_paged_decode.

    q: [batch, q_heads, d]; caches [num_pages, page_size, kv_heads, d]; kmin, kmax [num_pages,
    blocks, kv_heads, d] (one min/max per page_size // blocks slots); page_tables int32 [batch,
    max_pages]; seq_lens int32 [batch] (>= 1). Token counts round to pages as
    reference.sparse_page_counts says. Returns out [batch, q_heads, d] (q's dtype),
    or (out, logical pages [batch, kv_heads, k], virtual seq_lens) with return_selection.
    shortlist_tokens > 0 with the page summaries pmin, pmax [num_pages, kv_heads, d]: coarse to fine
    (reference.sparse_paged_decode) whenever the page tables are wider than the shortlist (a static
    choice: rows shorter than the shortlist keep all their pages in it).
    tuning (num_splits, block_n, num_warps, num_stages, ...) goes to the split-K decode kernel;
    score_tuning to quest_scores (block_p, num_warps, all_heads), select_tuning to select_pages.
    """
    check_kv(q, k_cache, v_cache)
    page_size = k_cache.shape[1]
    budget, sink, recent = sparse_page_counts(page_size, budget_tokens, sink_tokens, recent_tokens)
    max_pages = page_tables.shape[1]
    if max_pages <= budget and not return_selection:
        return paged_decode(q, k_cache, v_cache, page_tables, seq_lens, scale, **tuning)
    shortlist = shortlist_pages(page_size, budget, shortlist_tokens)
    scale = default_scale(q.shape[2]) if scale is None else scale
    force, kv_heads, select = (budget, sink, recent), k_cache.shape[2], dict(select_tuning or {})
    if 0 < shortlist < max_pages:
        assert pmin is not None and pmax is not None, "the coarse stage needs the page summaries"
        coarse = quest_bounds(q, pmin.unsqueeze(1), pmax.unsqueeze(1), page_tables, seq_lens, page_size)
        listed, listed_physical, _ = combine_select(coarse, page_tables, seq_lens, page_size, kv_heads, force,
                                                    scale, shortlist, **select)
        fine = shortlist_bounds(q, kmin, kmax, listed, listed_physical, seq_lens, page_size)
        logical, physical, vlens = combine_select(fine, listed_physical, seq_lens, page_size, kv_heads, force,
                                                  scale, budget, listed=listed, **_by_top_k(shortlist, budget, select))
    else:
        bounds = quest_bounds(q, kmin, kmax, page_tables, seq_lens, page_size, **(score_tuning or {}))
        logical, physical, vlens = combine_select(bounds, page_tables, seq_lens, page_size, kv_heads, force,
                                                  scale, budget, **_by_top_k(max_pages, budget, select))
    if tuning.get("num_splits") is None:  # short page lists: splits of 2 key blocks (H100 b1: 14.7 vs 17.3 us)
        tuning["num_splits"] = default_num_splits(q.shape[0], k_cache.shape[2], physical.shape[2] * page_size,
                                                  q.device, tuning.get("block_n", 64), min_blocks=2)
    out = split_k_decode(q, k_cache, v_cache, physical, vlens, scale, **tuning)
    return (out, logical, vlens) if return_selection else out
