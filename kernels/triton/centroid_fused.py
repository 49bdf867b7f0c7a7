"""The centroid selector's decode in one launch, for few rows (batch 1 or 2 at long context).

At batch 1 the three-launch pipeline (centroids.centroid_sparse_decode: scores, selection, split-K
attention and its merge) is latency-bound: each launch and each dependent memory round trip costs
about a microsecond, and the work itself is small (H200, b1 x 32k: 4.5 + 5.7 + 9.3 us against
48.7 for dense decode). Here S programs per (sequence, KV head) row do every stage in turn, with
the row's programs meeting at two barriers in between:

1. score: each program scores its share of the row's 64-token groups (centroids._score_tile),
   storing the logits;
2. (barrier) select: each program ranks its own block of groups against the whole row
   (group_rank's keys: the same order as rank_select, so the same groups) and writes the kept
   ones into the row's slots, best first, the recent groups last;
3. (barrier) attend: each program attends to its share of the slots, one group (64 keys) a block,
   masking by true position, and stores a partial (max, sum, output) per q head; the last of the
   row's programs to finish merges the partials into the output.

The barriers are counters in a persistent buffer (one per row, zero between calls: the last
program resets its own): a program fences its lanes' stores, adds one, and spins until the
count reaches S (then 2 S). A spin is only safe when all S programs of a row run at once: the
launcher keeps the whole grid within one program per SM (centroid_decode_one_launch asserts it),
and CUDA-graph replay or a stream runs this launch alone on the GPU. Under the interpreter (CPU
tests), programs run one after another, so S must be 1 there (each barrier then passes at once).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import default_scale
from kernels.triton.centroids import _score_tile
from kernels.triton.decode import LOG2E, check_kv, dot_upcast, num_sms
from kernels.triton.group_rank import _head_lse, _rank_keys


@triton.jit
def _arrive(Count, lanes, FENCE: tl.constexpr):
    """This program's stores made visible GPU-wide (each lane fenced, as __threadfence), then one
    more arrival at Count -> the count before it."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [lanes], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(Count, 1, sem="acq_rel")


@triton.jit
def _wait(Count, target):
    seen = tl.atomic_add(Count, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(Count, 0, sem="acquire")


@triton.jit
def _centroid_decode_one_launch(
        Q, K, V, Cents, Stats, PT, SeqLens, Logits, Slots, MidO, MidL, Count, Out,
        s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_cp, s_ch, s_cc, s_sp, s_sh, s_sc, s_pb,
        s_lb, s_lh, s_xb, s_xh, s_mb, s_mh, s_ms, s_nb, s_nh, s_ob, s_oh,
        max_groups, scale, qk_scale, budget, sink, recent,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, C: tl.constexpr,
        GROUP_PAGES: tl.constexpr, PAGE_SIZE: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
        FENCE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    SPAN: tl.constexpr = GROUP_PAGES * PAGE_SIZE
    seq_len = tl.load(SeqLens + b)
    n = tl.cdiv(seq_len, SPAN)
    k = tl.minimum(n, budget)
    pt_row = PT + b.to(tl.int64) * s_pb
    count = Count + b * tl.num_programs(1) + kvh
    slots = Slots + b * s_xb + kvh * s_xh
    lanes = tl.arange(0, 128)          # >= the threads of 4 warps: every lane fences

    # 1. scores of this program's tiles (only a row longer than the budget selects)
    if n > budget:
        full_groups = (seq_len - 1) // SPAN
        for t in tl.range(s, tl.cdiv(n, BLOCK_N), S, num_stages=1):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            full = offs_n < full_groups
            page = tl.load(pt_row + offs_n * GROUP_PAGES + GROUP_PAGES - 1, mask=full, other=0).to(tl.int64)
            _score_tile(Q, Cents, Stats, Logits, b, kvh, page, offs_n, full, s_qb, s_qh, s_cp, s_ch, s_cc,
                        s_sp, s_sh, s_sc, s_lb, s_lh, max_groups, scale, GROUP, GROUP_P, HEAD_DIM, C, BLOCK_N,
                        DOT_F32)
    _arrive(count, lanes, FENCE)
    _wait(count, S)

    # 2. this program's block of groups ranked against the row; kept ones written at their slots
    offs_i = s * BLOCK_I + tl.arange(0, BLOCK_I)
    if n <= budget:                     # the whole row, in order
        take = offs_i < n
        slot = offs_i
    else:
        row = Logits + b * s_lb + kvh * GROUP * s_lh
        lse = _head_lse(row, s_lh, n, scale, GROUP, GROUP_P, BLOCK_J, True)
        cand = n - recent
        key_i = _rank_keys(row, s_lh, offs_i, cand, sink, lse, scale, GROUP, GROUP_P, True)
        rank = tl.zeros([BLOCK_I], tl.int32)
        for j0 in range(0, cand, BLOCK_J):
            key_j = _rank_keys(row, s_lh, j0 + tl.arange(0, BLOCK_J), cand, sink, lse, scale, GROUP, GROUP_P, True)
            rank += tl.sum((key_j[None, :] > key_i[:, None]).to(tl.int32), 1)
        is_recent = (offs_i >= cand) & (offs_i < n)
        take = is_recent | ((offs_i < cand) & (rank < k - recent))
        slot = tl.where(is_recent, k - (n - offs_i), rank)
    tl.store(slots + slot, offs_i, mask=take)
    _arrive(count, lanes, FENCE)
    _wait(count, 2 * S)

    # 3. attention over this program's share of the slots, one group a block
    offs_h = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, SPAN)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=mask_h[:, None], other=0.0)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    per = tl.cdiv(k, S)
    for slot_at in range(s * per, tl.minimum(s * per + per, k)):
        group = tl.load(slots + slot_at, cache_modifier=".cg")
        pos = group * SPAN + offs_t
        valid = pos < seq_len
        page = tl.load(pt_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row_k = page * s_kp + (pos % PAGE_SIZE) * s_ks
        kb = tl.load(K + kvh * s_kh + row_k[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            qk = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)))
        elif kb.dtype == tl.float32:
            qk = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(kb))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        row_v = page * s_vp + (pos % PAGE_SIZE) * s_vs
        vb = tl.load(V + kvh * s_vh + row_v[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(p, vb.to(tl.float32), acc * alpha[:, None])
        elif vb.dtype == tl.float32:
            acc = tl.dot(p, vb, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None])
        m_i = m_new
    nonempty = l_i > 0
    part = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * s_mb + heads[:, None] * s_mh + s * s_ms + offs_d[None, :], part, mask=mask_h[:, None])
    tl.store(MidL + b * s_nb + heads * s_nh + s, lse2, mask=mask_h)

    # the row's last program to finish merges the partials (and sets the counter back to 0)
    if _arrive(count, lanes, FENCE) == 3 * S - 1:
        tl.atomic_xchg(count, 0)
        offs_s = tl.arange(0, S)
        for h in tl.static_range(GROUP):
            head = kvh * GROUP + h
            lse_s = tl.load(MidL + b * s_nb + head * s_nh + offs_s, cache_modifier=".cg")
            w = tl.exp2(lse_s - tl.max(lse_s, 0))
            parts = tl.load(MidO + b * s_mb + head * s_mh + offs_s[:, None] * s_ms + offs_d[None, :],
                            cache_modifier=".cg")
            out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
            tl.store(Out + b * s_ob + head * s_oh + offs_d, out.to(Out.dtype.element_ty))


_COUNTS: dict[torch.device, torch.Tensor] = {}


def barrier_counts(device: torch.device, rows: int) -> torch.Tensor:
    """Per-row barrier counters, zero between calls (each call's last program resets its row's),
    one buffer per device, grown only outside graph capture (a shape's first call is an eager
    warm-up, in the engine and the benches alike)."""
    have = _COUNTS.get(device)
    if have is None or have.numel() < rows:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "the one-launch decode's counters must exist before graph capture (run the shape once eagerly)"
        _COUNTS[device] = have = torch.zeros(max(rows, 256), device=device, dtype=torch.int32)
    return have


def one_launch_programs(rows: int, device: torch.device, interpreted: bool) -> int:
    """Programs per row: the most that keep the grid within one program per SM, at most 16 (1 under
    the interpreter, whose programs run one after another); 0 when even 2 would not fit."""
    if interpreted:
        return 1
    fit = min(16, num_sms(device) // rows)
    return 1 << (fit.bit_length() - 1) if fit >= 2 else 0      # a power of two (the merge's tl.arange)


def centroid_decode_one_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cents: torch.Tensor,
                               stats: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor,
                               force: tuple[int, int, int], group_pages: int, scale: float | None = None,
                               programs: int | None = None, interpreted: bool = False,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """centroids.centroid_sparse_decode's result in one launch (the module docstring): q [batch,
    q_heads, d]; caches [num_pages, page_size, kv_heads, d]; cents, stats as
    centroids.centroid_group_logits takes them; page_tables int32 [batch, width], width a whole
    number of groups; force (budget, sink, recent) in groups. programs: per row (default
    one_launch_programs)."""
    check_kv(q, k_cache, v_cache)
    batch, q_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1:3]
    clusters = cents.shape[2]
    assert page_tables.shape[1] % group_pages == 0 and page_tables.stride(1) == 1
    assert page_tables.dtype == seq_lens.dtype == torch.int32 and stats.dtype == torch.float32
    budget, sink, recent = force
    assert budget > sink + recent
    rows = batch * kv_heads
    programs = programs or one_launch_programs(rows, q.device, interpreted)
    assert programs >= 1 and programs & (programs - 1) == 0
    assert (interpreted and programs == 1) or rows * programs <= num_sms(q.device), \
        "every program of a row must run at once: at most one program per SM"
    scale = default_scale(head_dim) if scale is None else scale
    max_groups = page_tables.shape[1] // group_pages
    device = q.device
    logits = torch.empty(batch, q_heads, max_groups, device=device, dtype=torch.float32)
    slots = torch.empty(batch, kv_heads, budget, device=device, dtype=torch.int32)
    mid_o = torch.empty(batch, q_heads, programs, head_dim, device=device, dtype=torch.float32)
    mid_l = torch.empty(batch, q_heads, programs, device=device, dtype=torch.float32)
    out = torch.empty_like(q) if out is None else out
    count = barrier_counts(device, rows)
    block_n = max(1, 64 // clusters)
    block_i = max(16, triton.next_power_of_2(-(-max_groups // programs)))
    group = q_heads // kv_heads
    group_p = max(16, triton.next_power_of_2(group))
    block_j = max(16, min(triton.next_power_of_2(max_groups), 8192 // block_i, 2048 // group_p))
    _centroid_decode_one_launch[(batch, kv_heads, programs)](
        q, k_cache, v_cache, cents, stats, page_tables, seq_lens, logits, slots, mid_o, mid_l, count, out,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], *cents.stride()[:3],
        *stats.stride()[:3], page_tables.stride(0), logits.stride(0), logits.stride(1), slots.stride(0),
        slots.stride(1), *mid_o.stride()[:3], *mid_l.stride()[:2], out.stride(0), out.stride(1),
        max_groups, scale, scale * LOG2E, budget, sink, recent,
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, C=clusters, GROUP_PAGES=group_pages, PAGE_SIZE=page_size,
        S=programs, BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_J=block_j, DOT_F32=interpreted,
        UPCAST=dot_upcast(q.dtype), FENCE=q.is_cuda and not interpreted, num_warps=4)
    return out
