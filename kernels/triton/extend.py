"""Extend / prefill attention: the new tokens of many sequences at once (varlen), causal over each
sequence's cached prefix pages plus its new chunk. The new chunk's K/V must already be in the cache
(kernels/triton/summaries.py writes them), so every key is read through the page table.

One program owns BLOCK_M new queries of one sequence and one q head (FlashAttention-2 style online
softmax, fp32 accumulators). Keys strictly before the block's first query need no mask; only the
last few key blocks (the causal diagonal) are masked. Heads of one GQA group are adjacent in the grid
so their shared K/V pages are served from L2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton.decode import LOG2E, check_kv, dot_upcast, mma


@triton.jit
def _extend_inner(acc, l_i, m_i, q, k_base, v_base, pt, lo, hi, q_pos, total, qk_scale,
                  s_kp, s_ks, s_vp, s_vs, s_pp,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            mask_n = offs_n < total
            page = tl.load(pt + (offs_n // PAGE_SIZE) * s_pp, mask=mask_n, other=0).to(tl.int64)
        else:
            page = tl.load(pt + (offs_n // PAGE_SIZE) * s_pp).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k_ptr = k_base + (page * s_kp + slot * s_ks)[:, None] + offs_d[None, :]
        v_ptr = v_base + (page * s_vp + slot * s_vs)[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr, mask=mask_n[:, None], other=0.0)
        else:
            k = tl.load(k_ptr)
        qk = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), UPCAST) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr, mask=mask_n[:, None], other=0.0)
        else:
            v = tl.load(v_ptr)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _extend_kernel(Q, K, V, PT, CuSeq, Prefix, Out, qk_scale, n_mblocks,
                   s_qt, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pb, s_pp, s_ot, s_oh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    h = tl.program_id(0)
    mblock = n_mblocks - 1 - tl.program_id(1)  # longest (latest) query blocks first
    b = tl.program_id(2)
    q_start = tl.load(CuSeq + b)
    n_new = tl.load(CuSeq + b + 1) - q_start
    m0 = mblock * BLOCK_M
    if m0 < n_new:
        prefix = tl.load(Prefix + b)
        total = prefix + n_new
        kvh = h // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < n_new
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        q_pos = prefix + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        pt = PT + b.to(tl.int64) * s_pb
        k_base = K + kvh * s_kh
        v_base = V + kvh * s_vh
        # Keys before the block's first query are visible to every row: no mask needed.
        full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _extend_inner(acc, l_i, m_i, q, k_base, v_base, pt, 0, full_end, q_pos, total,
                                      qk_scale, s_kp, s_ks, s_vp, s_vs, s_pp, HEAD_DIM, BLOCK_N,
                                      PAGE_SIZE, False, UPCAST)
        diag_end = tl.minimum(prefix + m0 + BLOCK_M, total)
        acc, l_i, m_i = _extend_inner(acc, l_i, m_i, q, k_base, v_base, pt, full_end, diag_end, q_pos,
                                      total, qk_scale, s_kp, s_ks, s_vp, s_vs, s_pp, HEAD_DIM, BLOCK_N,
                                      PAGE_SIZE, True, UPCAST)
        out = acc / l_i[:, None]
        tl.store(Out + rows[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=mask_m[:, None])


def default_extend_config(head_dim: int) -> dict:
    """Hopper (H100, measured): 128x128 tiles, 8 warps, 3-stage pipeline (385 TFLOP/s vs 333 with
    128x64 tiles at d=128, 8 x 2k new tokens on 8k cached, page 64)."""
    return dict(block_m=128, block_n=128, num_warps=8, num_stages=3)


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_tables: torch.Tensor, cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                     scale: float | None = None, max_new_tokens: int | None = None,
                     out: torch.Tensor | None = None, **tuning) -> torch.Tensor:
    """Causal attention of the new tokens of many sequences.

    q: [total_new, q_heads, d], sequence i's new tokens are rows cu_seqlens[i]:cu_seqlens[i+1] at
    positions prefix_lens[i] + j; their K/V already written to the cache. page_tables: int32
    [batch, max_pages]; cu_seqlens: int32 [batch + 1]; prefix_lens: int32 [batch].
    max_new_tokens bounds the grid (read from cu_seqlens, with a device sync, when None).
    tuning: block_m, block_n, num_warps, num_stages. Returns [total_new, q_heads, d] in q's dtype.
    """
    group, page_size = check_kv(q, k_cache, v_cache)
    total_new, q_heads, head_dim = q.shape
    batch = page_tables.shape[0]
    assert page_tables.dtype == cu_seqlens.dtype == prefix_lens.dtype == torch.int32
    assert cu_seqlens.shape == (batch + 1,) and prefix_lens.shape == (batch,)
    assert q.stride(2) == 1
    cfg = {**default_extend_config(head_dim), **tuning}
    if max_new_tokens is None:
        max_new_tokens = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if batch else 0
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if total_new == 0 or max_new_tokens == 0:
        return out
    n_mblocks = triton.cdiv(max_new_tokens, cfg["block_m"])
    _extend_kernel[(q_heads, n_mblocks, batch)](
        q, k_cache, v_cache, page_tables, cu_seqlens, prefix_lens, out, scale * LOG2E, n_mblocks,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], *page_tables.stride(),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        PAGE_SIZE=page_size, UPCAST=dot_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
