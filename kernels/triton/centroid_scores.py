"""Group scores from k-means centroids: an estimate of each 64-token group's attention mass that
reads C centroids per group instead of per-block key bounds (bench/sparse_estimators.py measures
what such a selector keeps in quality; bench/centroid_stages.py times it against dense decode).

A group is GROUP_PAGES consecutive logical pages of one sequence. Its summary, per KV head, is C
centroids [C, d] (8-bit or 16-bit) and per centroid two fp32 numbers, log(count) and the spread
s^2 (mean squared distance per channel of the keys it stands for). It is kept at the physical id
of the group's last page: a group's last page is shared by two sequences only when the whole group
is (a prefix shared in the radix tree), so a shared summary always describes the same keys. Only
complete groups have one, written after the step that completes the group, so scored are the
groups complete before the row's last token; the group holding it scores -inf here (it takes no
share of any head's softmax) and is kept by the selection's recent rule.

Per q head h of the KV head's GQA group and group n, in the attention's log units:

    L_h(n) = logsumexp over c of ( scale * q_h . c + log count_c + scale^2 |q_h|^2 s_c^2 / 2 )

(the log of the group's mass if every key sat on its centroid with Gaussian spread). The kernel
writes L_h(n) / scale, so that kernels/triton/selection.combine_select (which multiplies by the
attention scale, takes each head's log-softmax over the row and the max over the group) selects
groups exactly as it selects pages from Quest bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.decode import num_sms


@triton.jit
def score_tile(Q, Cents, Stats, Out, b, kvh, page, offs_n, full, s_qb, s_qh, s_cp, s_ch, s_cc, s_sp, s_sh,
                s_sc, s_ob, s_oh, max_groups, scale, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                HEAD_DIM: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """One KV head's scores of BLOCK_N groups (physical ids `page`, complete where `full`):
    [C * BLOCK_N, d] centroid rows times the group's q heads [d, GROUP_P] on the tensor cores, the
    count and spread terms, the log-sum-exp over each group's centroids, stored / scale.

    The rows are centroid-major (row c * BLOCK_N + n is centroid c of group n): the log-sum-exp over
    a group's centroids then runs over rows BLOCK_N apart, which the matmul's output layout keeps
    mostly within a thread, instead of over neighbouring rows spread across lanes (H200 SASS: less
    than half the instructions per byte of the group-major tile, whose shuffles and layout
    conversions made the kernel issue-bound at ~1.7 TB/s). 8-bit centroids widen to fp16 (one
    conversion per pair; e4m3 is exact in fp16) and q meets them in fp16 (a bf16 q is exact in
    fp16 within its normal range; attention queries are far from its 65504 limit); 16-bit
    centroids meet q in their own dtype; a float32 q meets them in float32. Products are exact, summed
    in fp32."""
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_P)
    q = tl.load(Q + b * s_qb + (kvh * GROUP + offs_g[None, :]) * s_qh + offs_d[:, None],
                mask=(offs_g < GROUP)[None, :], other=0.0)                                # [d, GROUP_P]
    q32 = q.to(tl.float32) * scale
    q_sq = tl.sum(q32 * q32, 0)                                                            # [GROUP_P]
    cents = tl.load(Cents + page[None, :, None] * s_cp + kvh * s_ch + offs_c[:, None, None] * s_cc
                    + offs_d[None, None, :], mask=full[None, :, None], other=0.0)          # [C, N, d]
    log_count, spread = _tile_stats(Stats, kvh, page, full, s_sp, s_sh, s_sc, C)
    rows = _dot_rows(tl.reshape(cents, [C * BLOCK_N, HEAD_DIM]), q, DOT_F32)
    dots = tl.dot(rows, q.to(rows.dtype), input_precision="ieee") * scale                  # [C * N, GROUP_P]
    _tile_epilogue(dots, q_sq, log_count, spread, Out, b, kvh, offs_n, full, s_ob, s_oh, max_groups, scale, GROUP,
                   GROUP_P, C, BLOCK_N)


@triton.jit
def _dot_rows(rows, q, DOT_F32: tl.constexpr):
    """Centroid rows in the dtype they meet q in (score_tile's docstring)."""
    if DOT_F32 or q.dtype == tl.float32:   # the interpreter's 16-bit dots are wrong (decode.dot_upcast);
        rows = rows.to(tl.float32)         # a float32 q (float32 serving) keeps its bits
    elif rows.dtype.primitive_bitwidth == 8:
        rows = rows.to(tl.float16)
    return rows


@triton.jit
def score_tile_rows(Q, Cents, Stats, Out, page, page_r, b, kvh, first, full_groups, s_qb, s_qh, s_cp, s_ch,
                     s_cc, s_sp, s_sh, s_sc, s_ob, s_oh, max_groups, scale, GROUP: tl.constexpr,
                     GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """score_tile built as one 2D tile [C * BLOCK_N, d], each row's page id loaded for that row
    (page_r), no reshape: what pays for many rows (score_tuning). The dot split along d into
    pipelined chunks was slower at every batch (32- or 64-channel chunks, 2-4 stages: H200 b16
    29.6-35.5 us against 28.8, b64 100.2-140.6 against 99.3; docs/benchmarks.md)."""
    offs_r = tl.arange(0, C * BLOCK_N)                  # row c * BLOCK_N + n: centroid c of group n
    full_r = first + offs_r % BLOCK_N < full_groups
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = first + tl.arange(0, BLOCK_N)
    full = offs_n < full_groups
    log_count, spread = _tile_stats(Stats, kvh, page, full, s_sp, s_sh, s_sc, C)
    offs_g = tl.arange(0, GROUP_P)
    q = tl.load(Q + b * s_qb + (kvh * GROUP + offs_g[None, :]) * s_qh + offs_d[:, None],
                mask=(offs_g < GROUP)[None, :], other=0.0)                                # [d, GROUP_P]
    q32 = q.to(tl.float32) * scale
    q_sq = tl.sum(q32 * q32, 0)
    rows = tl.load(Cents + (page_r * s_cp + kvh * s_ch + (offs_r // BLOCK_N) * s_cc)[:, None] + offs_d[None, :],
                   mask=full_r[:, None], other=0.0)                                        # [C * N, d]
    rows = _dot_rows(rows, q, DOT_F32)
    dots = tl.dot(rows, q.to(rows.dtype), input_precision="ieee")
    _tile_epilogue(dots * scale, q_sq, log_count, spread, Out, b, kvh, offs_n, full, s_ob, s_oh, max_groups, scale,
                   GROUP, GROUP_P, C, BLOCK_N)


@triton.jit
def _tile_stats(Stats, kvh, page, full, s_sp, s_sh, s_sc, C: tl.constexpr):
    """Each centroid's (log count, spread) [C, N]: loaded before the dot, so that their memory trip
    overlaps the centroids' instead of following it."""
    offs_c = tl.arange(0, C)
    stat = Stats + page[None, :] * s_sp + kvh * s_sh + offs_c[:, None] * s_sc
    return tl.load(stat, mask=full[None, :], other=0.0), tl.load(stat + 1, mask=full[None, :], other=0.0)


@triton.jit
def _tile_epilogue(dots, q_sq, log_count, spread, Out, b, kvh, offs_n, full, s_ob, s_oh, max_groups,
                   scale, GROUP: tl.constexpr, GROUP_P: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The count and spread terms, the log-sum-exp over each group's centroids, stored / scale."""
    offs_g = tl.arange(0, GROUP_P)
    logits = tl.reshape(dots, [C, BLOCK_N, GROUP_P]) + log_count[:, :, None] \
        + 0.5 * spread[:, :, None] * q_sq[None, None, :]
    top = tl.max(logits, 0)                                                                # [N, GROUP_P]
    lse = top + tl.log(tl.sum(tl.exp(logits - top[None, :, :]), 0))
    lse = tl.where(full[:, None], lse / scale, float("-inf"))
    tl.store(Out + b * s_ob + (kvh * GROUP + offs_g[None, :]) * s_oh + offs_n[:, None], lse,
             mask=(offs_n < max_groups)[:, None] & (offs_g < GROUP)[None, :])


@triton.jit
def _centroid_group_logits(Q, Cents, Stats, PT, SeqLens, Out, s_qb, s_qh, s_cp, s_ch, s_cc, s_sp, s_sh, s_sc,
                           s_pb, s_ph, s_ob, s_oh, max_groups, scale,
                           GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                           C: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_PAGES: tl.constexpr,
                           PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, ROW_TILE: tl.constexpr):
    """One program per (sequence, KV head, BLOCK_N groups): the physical id of each group's last
    page (where its summary is kept; only complete groups have one), then score_tile (or with
    ROW_TILE, score_tile_rows). The table is the sequence's, or its KV head's where s_ph is not 0
    (a shortlist's compact table per head)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_N
    offs_n = first + tl.arange(0, BLOCK_N)
    # the page ids are loaded with the length, not after it (one dependent memory trip fewer);
    # those past the sequence are never used
    last_pages = PT + b.to(tl.int64) * s_pb + kvh * s_ph + GROUP_PAGES - 1
    page = tl.load(last_pages + offs_n * GROUP_PAGES, mask=offs_n < max_groups, other=0)
    if ROW_TILE:         # and each row's, for the 2D tile
        n_r = first + tl.arange(0, C * BLOCK_N) % BLOCK_N
        page_r = tl.load(last_pages + n_r * GROUP_PAGES, mask=n_r < max_groups, other=0)
    seq_len = tl.load(SeqLens + b)
    if first >= tl.cdiv(seq_len, GROUP_PAGES * PAGE_SIZE):
        return      # past the sequence
    full = offs_n < (seq_len - 1) // (GROUP_PAGES * PAGE_SIZE)     # summarised before this token
    if ROW_TILE:
        score_tile_rows(Q, Cents, Stats, Out, page.to(tl.int64), page_r.to(tl.int64), b, kvh, first,
                         (seq_len - 1) // (GROUP_PAGES * PAGE_SIZE), s_qb, s_qh, s_cp, s_ch, s_cc, s_sp, s_sh,
                         s_sc, s_ob, s_oh, max_groups, scale, GROUP, GROUP_P, HEAD_DIM, C, BLOCK_N, DOT_F32)
        return
    score_tile(Q, Cents, Stats, Out, b, kvh, page.to(tl.int64), offs_n, full, s_qb, s_qh, s_cp, s_ch, s_cc,
                s_sp, s_sh, s_sc, s_ob, s_oh, max_groups, scale, GROUP, GROUP_P, HEAD_DIM, C, BLOCK_N, DOT_F32)


def centroid_group_logits(q: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor, page_tables: torch.Tensor,
                          seq_lens: torch.Tensor, page_size: int, group_pages: int, scale: float,
                          block_n: int | None = None, num_warps: int | None = None,
                          interpreted: bool = False, row_tile: bool = False) -> torch.Tensor:
    """q [batch, q_heads, d]; cents [num_pages, kv_heads, C, d] (fp8/bf16, at each complete group's
    last page); stats fp32 [num_pages, kv_heads, C, 2] (log count, spread); page_tables int32
    [batch, width], or per KV head [batch, kv_heads, width] (a shortlist's compact tables, its
    groups in order) -> fp32 [batch, q_heads, width // group_pages]: each group's L_h(n) / scale
    (-inf for the last group; garbage past a sequence, never read by combine_select).
    One program per (sequence, KV head, block_n groups); row_tile: the 2D tile (score_tile_rows)."""
    batch, q_heads, head_dim = q.shape
    kv_heads, clusters = cents.shape[1:3]
    assert cents.shape[3] == head_dim and stats.shape == (*cents.shape[:3], 2) and q_heads % kv_heads == 0
    assert q.stride(2) == 1 and cents.stride(3) == 1 and stats.stride(3) == 1 and page_tables.stride(-1) == 1
    assert page_tables.dtype == seq_lens.dtype == torch.int32 and stats.dtype == torch.float32
    assert page_tables.dim() == 2 or page_tables.shape[1] == kv_heads
    max_groups = page_tables.shape[-1] // group_pages
    per_head = page_tables.stride(1) if page_tables.dim() == 3 else 0
    out = torch.empty(batch, q_heads, max_groups, device=q.device, dtype=torch.float32)
    group = q_heads // kv_heads
    # 64 centroid rows and one warp per program: H200, 8 fp8 centroids per group, centroid-major
    # tiles, bench/centroid_stages.py: b16 x 32k 28.2 us (2 warps 36.2, 128 rows and 2 warps 37.6),
    # b64 106.1 (135.7, 131.6), b1 x 128k 9.9; b1 x 32k 5.1 (32 rows 4.6). Earlier candidates, each
    # slower at every batch and since removed: several tiles per program, pipelined (71.9 us at
    # b16) or not (a fixed number of programs per row taking its tiles in turn: 58.6 at b16 with
    # 32 a row, 12.5 at b1 x 32k), one program reading every KV head's centroids of its groups
    # (49.5; docs/benchmarks.md); the KV heads of a tile launched side by side changed nothing
    block_n = block_n or max(1, 64 // clusters)
    _centroid_group_logits[(batch, kv_heads, triton.cdiv(max_groups, block_n))](
        q, cents, stats, page_tables, seq_lens, out, q.stride(0), q.stride(1), *cents.stride()[:3],
        *stats.stride()[:3], page_tables.stride(0), per_head, out.stride(0), out.stride(1), max_groups, scale,
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, C=clusters,
        BLOCK_N=block_n, GROUP_PAGES=group_pages, PAGE_SIZE=page_size, DOT_F32=interpreted,
        ROW_TILE=row_tile, num_warps=num_warps or 1)
    return out


def score_tuning(rows: int, device: torch.device, groups: int = 512) -> dict:
    """The scorer's tile: for at least half a wave of rows (sequence, KV head), the 2D tile
    (score_tile_rows), 8 groups a program up to two waves of rows and 16
    beyond (H200, bench/centroid_stages.py: b16 27.9 us with 8, 28.6 with 16, 29.4 for the
    reshaped tile; b64 98.1 with 16, 100.2 with 8, 107.1 reshaped) unless the rows are short (the
    shortlist's 128 groups, or 128 runs at 32k: b64 24.4-24.5 us with 8 against 25.9-26.8 with
    16); fewer rows keep the reshaped 8-group tile (b4: 10.3 against 10.7 for the 2D tile; b1 x
    32k 4.5, 16 groups 6.0-6.6)."""
    sms = num_sms(device)
    if rows >= sms // 2:
        return dict(block_n=16 if rows >= 2 * sms and groups > 128 else 8, row_tile=True)
    return {}
