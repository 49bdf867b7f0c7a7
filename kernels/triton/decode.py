"""Dense paged decode (split-K "flash decoding") over the paged KV layout of kernels/reference.py.

Stage 1: one program per (sequence, KV head, split) walks its slice of the page table and keeps an
online softmax (running max, sum, fp32 accumulator) for ALL q heads of the GQA group at once, so
each K/V row is read from memory once per group. Stage 2 merges the splits by their log-sum-exp.

The page table may carry a KV-head dimension ([batch, kv_heads, pages]); sparse decode uses that to
give every KV head its own list of selected pages and reuses stage 1 unchanged.

Batch-invariant mode (split_tokens > 0, the engine's `deterministic: true`): every split covers a
fixed split_tokens keys from position 0, whatever the batch, the table width or the number of
splits launched, and stage 2 merges a row's non-empty splits one after the other in split order
(_decode_stage2_ordered). A row's output then depends only on its query, its keys and its length:
the same alone or batched, in a CUDA graph or eagerly, and as a decode or as a prefill row (the
deterministic attention backend runs prefill rows through this kernel too).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """The CPU interpreter multiplies bf16 dot operands as raw uint16 bit patterns (triton 3.9).

    Under the interpreter only, bf16 operands are widened to fp32 before tl.dot; bf16 x bf16 products
    are exact in fp32, so the result is what the GPU's bf16 MMA with fp32 accumulation computes.
    """
    return interpreting() and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to size the grid


def check_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Validate dtypes/shapes shared by every kernel; returns (group, page_size)."""
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), "q must be fp16, bf16 or fp32"
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q and the KV cache must share a dtype"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "cache: [pages, page_size, kv_heads, d]"
    _, page_size, kv_heads, head_dim = k_cache.shape
    assert q.shape[-1] == head_dim and head_dim in (64, 128), "head_dim must be 64 or 128"
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert q.shape[-2] % kv_heads == 0, "q heads must be a multiple of kv heads"
    return q.shape[-2] // kv_heads, page_size


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:  # float32 serving is the exact reference: no tf32 rounding
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_kv(ptr, mask, EVICT: tl.constexpr):
    if EVICT:  # K/V are streamed once: keep them from displacing reusable lines in L2
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _decode_stage1(Q, K, V, PT, SeqLens, MidO, MidL, qk_scale, num_splits, split_tokens, max_tokens,
                   s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pb, s_ph, s_pp, s_nb, s_nh,
                   s_ob, s_oh, s_os, s_lb, s_lh,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr,
                   EVICT: tl.constexpr, DIRECT: tl.constexpr, PER_PAGE: tl.constexpr,
                   HEADS_INNER: tl.constexpr, ORDERED: tl.constexpr, FIXED: tl.constexpr):
    if HEADS_INNER:  # grid (kv_heads, batch, splits): the KV heads of one token row run side by side
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:  # grid (batch, kv_heads, splits)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    attend_split(Q, K, V, PT + b.to(tl.int64) * s_pb + kvh * s_ph, tl.load(SeqLens + b * s_nb + kvh * s_nh), b, kvh,
                 tl.program_id(2),
                 MidO, MidL, qk_scale, num_splits, split_tokens, max_tokens, s_qb, s_qh, s_kp, s_ks, s_kh, s_vp,
                 s_vs, s_vh, s_pp, s_ob, s_oh, s_os, s_lb, s_lh, GROUP, BLOCK_H, HEAD_DIM, BLOCK_N, PAGE_SIZE,
                 UPCAST, EVICT, DIRECT, PER_PAGE, ORDERED, FIXED)


@triton.jit
def attend_split(Q, K, V, pt, seq_len, b, kvh, split, MidO, MidL, qk_scale, num_splits, split_tokens, max_tokens,
                 s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pp, s_ob, s_oh, s_os, s_lb, s_lh,
                 GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr, EVICT: tl.constexpr, DIRECT: tl.constexpr,
                 PER_PAGE: tl.constexpr, ORDERED: tl.constexpr, FIXED: tl.constexpr):
    """Stage 1 of one (sequence b, KV head kvh, split): the online softmax of the GQA group's q heads
    over the split's keys, whose pages are listed at `pt` (stride s_pp) for a row of seq_len keys;
    the partial (or with DIRECT the output) stored. Also called by a kernel that chooses the pages
    in the same program (select_attend.select_then_attend)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h

    if ORDERED or FIXED:  # fixed-size splits from key 0: a row's splits do not depend on its length
        split_len = split_tokens
    elif split_tokens > 0:  # split_keys: the same, each split past its row's end empty
        split_len = split_tokens
    else:
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if FIXED:   # a trip count known at launch: the first page ids load alongside the length
        stop = start + split_len
    else:
        stop = end

    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=mask_h[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    k_base = K + kvh * s_kh
    v_base = V + kvh * s_vh
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if FIXED:   # the ids are read within the table's capacity, whatever the row's length
            listed = offs_n < max_tokens
        else:
            listed = mask_n
        if PER_PAGE:  # BLOCK_N <= PAGE_SIZE and blocks start at multiples of BLOCK_N: one page per block
            page = tl.load(pt + (n0 // PAGE_SIZE) * s_pp).to(tl.int64)
            slot = n0 % PAGE_SIZE + tl.arange(0, BLOCK_N)
        else:
            page = tl.load(pt + (offs_n // PAGE_SIZE) * s_pp, mask=listed, other=0).to(tl.int64)
            slot = offs_n % PAGE_SIZE
        k = _load_kv(k_base + (page * s_kp + slot * s_ks)[:, None] + offs_d[None, :], mask_n[:, None], EVICT)
        qk = mma(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
        if FIXED:   # a split past the row's end has no key: weights 0, not exp2(-inf - -inf)
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_base + (page * s_vp + slot * s_vs)[:, None] + offs_d[None, :], mask_n[:, None], EVICT)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new

    # An empty split (short sequence) stores lse = -inf and a zero partial, so stage 2 weighs it 0.
    # DIRECT (a single split): MidO is the output itself and stage 2 is skipped.
    # ORDERED: empty splits store nothing (stage 2 reads only a row's own splits).
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    keep = mask_h
    if ORDERED:
        keep = mask_h & (offs_h * 0 + start < seq_len)
    tl.store(MidO + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :],
             out.to(MidO.dtype.element_ty), mask=keep[:, None])
    if not DIRECT:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(MidL + b * s_lb + heads * s_lh + split, lse, mask=keep)


@triton.jit
def _decode_stage2(MidO, MidL, Out, num_splits, s_ob, s_oh, s_os, s_lb, s_lh, s_b, s_h,
                   HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = offs_s < num_splits
    lse = tl.load(MidL + b * s_lb + h * s_lh + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(MidO + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_d[None, :],
                   mask=mask_s[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(Out + b * s_b + h * s_h + offs_d, out.to(Out.dtype.element_ty))


@triton.jit
def _decode_stage2_ordered(MidO, MidL, SeqLens, Out, split_tokens, s_ob, s_oh, s_os, s_lb, s_lh, s_b, s_h,
                           HEAD_DIM: tl.constexpr):
    """The batch-invariant merge: a row's ceil(seq_len / split_tokens) splits, one after the other
    in split order (no reduction tree whose shape follows the number of splits launched)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    splits = tl.cdiv(tl.load(SeqLens + b), split_tokens)
    lse_row = MidL + b * s_lb + h * s_lh
    part_row = MidO + b * s_ob + h * s_oh + offs_d
    m = tl.load(lse_row)
    for s in range(1, splits):
        m = tl.maximum(m, tl.load(lse_row + s))
    w = tl.exp2(tl.load(lse_row) - m)
    num = w * tl.load(part_row)
    den = w
    for s in range(1, splits):
        w = tl.exp2(tl.load(lse_row + s) - m)
        num += w * tl.load(part_row + s * s_os)
        den += w
    tl.store(Out + b * s_b + h * s_h + offs_d, (num / den).to(Out.dtype.element_ty))


def default_num_splits(batch: int, kv_heads: int, max_tokens: int, device: torch.device,
                       block_n: int = 64, min_blocks: int = 4) -> int:
    """Enough splits that batch * kv_heads * splits fills the GPU ~2 programs per SM, each split
    keeping at least min_blocks blocks of keys; a static choice (no device sync, CUDA-graph safe)."""
    want = -(-2 * num_sms(device) // (batch * kv_heads))
    most = max(1, max_tokens // (min_blocks * block_n))
    return int(max(1, min(want, most, 64)))


def split_k_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   page_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                   num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                   num_stages: int = 2, evict_first: bool = True, per_page: bool = False,
                   heads_inner: bool = True, out: torch.Tensor | None = None,
                   split_tokens: int = 0, fixed_splits: bool = False, split_keys: int = 0) -> torch.Tensor:
    """Split-K decode where page_tables is [batch, pages] or per KV head [batch, kv_heads, pages],
    and seq_lens [batch] or per KV head [batch, kv_heads] (keys a head attends in its table: rows
    whose heads keep different numbers of chosen pages; not with split_tokens).

    split_tokens > 0 (a multiple of block_n): the batch-invariant mode of the module docstring;
    num_splits then only bounds the grid (default: the table's capacity in splits; a caller that
    knows the longest row may pass ceil(longest / split_tokens)).

    per_page (needs block_n <= page_size): one page-id load per key block instead of one per key
    row (measured slower at batch 64 on the H100 with block_n 64, so off by default).
    heads_inner (default): launch order with the KV head varying fastest, so the programs reading the
    same token rows (all heads of a page) run at the same time (H100: 0.2-0.5% faster at batch 64).
    evict_first (default): K/V loads marked evict-first (no measurable effect on the H100 bench).
    fixed_splits: the splits divide the table's capacity, not each row's length, so a program's
    trip count is known at launch and its first page ids load with the length (one dependent memory
    trip fewer; for tables that rows nearly fill: sparse decode's chosen pages; H200, budget 2048:
    b1 9.2 -> 8.8 us, b16 38.9 -> 37.6, b64 130.5 -> 129.3).
    split_keys > 0 (a multiple of block_n): splits of that many keys from key 0 over the table's
    capacity, a split past its row's end storing an empty partial at once; for rows of uneven
    length (a budget per KV head), so that every program attends at most split_keys keys and the
    programs balance over the SMs whatever the head."""
    group, page_size = check_kv(q, k_cache, v_cache)
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if page_tables.dim() == 2:
        page_tables = page_tables.unsqueeze(1).expand(batch, kv_heads, page_tables.shape[1])
    assert page_tables.shape[:2] == (batch, kv_heads) and page_tables.dtype == torch.int32
    assert seq_lens.shape in ((batch,), (batch, kv_heads)) and seq_lens.dtype == torch.int32
    len_strides = (seq_lens.stride(0), seq_lens.stride(1) if seq_lens.dim() == 2 else 0)
    assert q.stride(2) == 1
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    ordered = split_tokens > 0
    max_tokens = page_tables.shape[2] * page_size
    assert not (ordered and fixed_splits), "batch-invariant splits are already fixed"
    assert not (split_keys and (ordered or fixed_splits or num_splits)), "split_keys sets the splits itself"
    if split_keys:
        assert split_keys % block_n == 0, "split_keys must be a multiple of block_n"
        num_splits, split_tokens = -(-max_tokens // split_keys), split_keys
    assert not (ordered and seq_lens.dim() == 2), "the ordered merge reads one length a row"
    if ordered:
        assert split_tokens % block_n == 0, "split_tokens must be a multiple of block_n"
        num_splits = num_splits or -(-page_tables.shape[2] * page_size // split_tokens)
    elif num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, page_tables.shape[2] * page_size, q.device, block_n)
    if fixed_splits:
        split_tokens = -(-max_tokens // num_splits // block_n) * block_n
    if out is None:
        out = torch.empty_like(q)
    direct = num_splits == 1 and not ordered
    assert not per_page or block_n <= page_size, "per_page needs block_n <= page_size"
    if direct:
        mid_o, mid_l, mid_strides = out, out, (out.stride(0), out.stride(1), 0, 0, 0)
    else:
        mid_o = torch.empty(batch, q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        mid_l = torch.empty(batch, q_heads, num_splits, device=q.device, dtype=torch.float32)
        mid_strides = (*mid_o.stride()[:3], *mid_l.stride()[:2])
    grid = (kv_heads, batch, num_splits) if heads_inner else (batch, kv_heads, num_splits)
    _decode_stage1[grid](
        q, k_cache, v_cache, page_tables, seq_lens, mid_o, mid_l, scale * LOG2E, num_splits, split_tokens,
        max_tokens, q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        *page_tables.stride(), *len_strides, *mid_strides, GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=block_n, PAGE_SIZE=page_size,
        UPCAST=dot_upcast(q.dtype), EVICT=evict_first, DIRECT=direct, PER_PAGE=per_page, HEADS_INNER=heads_inner,
        ORDERED=ordered, FIXED=fixed_splits, num_warps=num_warps, num_stages=num_stages)
    if direct:
        return out
    if ordered:
        _decode_stage2_ordered[(batch, q_heads)](
            mid_o, mid_l, seq_lens, out, split_tokens, *mid_o.stride()[:3], *mid_l.stride()[:2],
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, num_warps=4)
        return out
    return merge_splits(mid_o, mid_l, out)


def merge_splits(mid_o: torch.Tensor, mid_l: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Stage 2: each q head's output from its splits' partials mid_o fp32 [batch, q_heads, splits,
    d], weighed by their log2-sum-exp mid_l fp32 [batch, q_heads, splits] (-inf: an empty split)
    -> out [batch, q_heads, d] (written and returned)."""
    batch, q_heads, num_splits, head_dim = mid_o.shape
    assert mid_l.shape == (batch, q_heads, num_splits) and mid_o.stride(3) == 1 and mid_l.stride(2) == 1
    _decode_stage2[(batch, q_heads)](
        mid_o, mid_l, out, num_splits, *mid_o.stride()[:3], *mid_l.stride()[:2],
        out.stride(0), out.stride(1), HEAD_DIM=head_dim,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 page_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                 **tuning) -> torch.Tensor:
    """Decode one query token per sequence over its whole page table.

    q: [batch, q_heads, d] (its own K/V already written); k_cache, v_cache: [num_pages, page_size,
    kv_heads, d]; page_tables: int32 [batch, max_pages] (padding never read); seq_lens: int32 [batch],
    each >= 1, including the current token. Returns [batch, q_heads, d] in q's dtype.
    tuning: num_splits, block_n, num_warps, num_stages, evict_first, out, split_tokens.
    """
    assert page_tables.dim() == 2, "dense decode takes page_tables [batch, max_pages]"
    return split_k_decode(q, k_cache, v_cache, page_tables, seq_lens, scale, **tuning)
