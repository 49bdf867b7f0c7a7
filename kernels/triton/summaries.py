"""KV write fused with Quest key summaries.

Summaries are those of kernels/reference.py: kmin, kmax [num_pages, blocks, kv_heads, head_dim], one
min/max per block of page_size // blocks slots, 0 for a block with no written slot.
One program per (sequence, touched page, KV head): it stores the page's new K/V rows into the cache
and, in the same pass, recomputes the element-wise min/max of keys of every block of the page over
its written slots (old slots are re-read from the cache, new ones come from registers). The page is
held as [blocks, summary_tokens, head_dim], so each block's summary is one reduction. A decode step
touches one page per sequence, so the summaries cost one page read per written token's page.
With write_kv=False the same kernel only refreshes the summaries of positions [starts, ends).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_summaries(Knew, Vnew, CuSeq, Starts, Ends, PT, K, V, KMin, KMax, PMin, PMax,
                        s_nt, s_nh, s_vnt, s_vnh, s_pb, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
                        s_mp, s_mb, s_mh, s_xp, s_xb, s_xh, s_qp, s_qh,
                        HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                        WRITE_KV: tl.constexpr, PAGE_SUMMARY: tl.constexpr):
    SUB: tl.constexpr = PAGE_SIZE // BLOCKS
    j = tl.program_id(0)  # touched page: axis 0 has no 65535 limit
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(Starts + b)
    end = tl.load(Ends + b)
    logical = start // PAGE_SIZE + j
    if (end > start) & (logical * PAGE_SIZE < end):
        page = tl.load(PT + b.to(tl.int64) * s_pb + logical).to(tl.int64)
        offs_b = tl.arange(0, BLOCKS)
        offs_d = tl.arange(0, HEAD_DIM)
        slots = offs_b[:, None] * SUB + tl.arange(0, SUB)[None, :]              # [BLOCKS, SUB]
        pos = logical * PAGE_SIZE + slots
        filled = pos < end
        d3 = offs_d[None, None, :]
        k_ptr = K + page * s_kp + h * s_kh + slots[:, :, None] * s_ks + d3
        if WRITE_KV:
            is_new = filled & (pos >= start)
            rows = (tl.load(CuSeq + b) + pos - start).to(tl.int64)
            k_new = tl.load(Knew + rows[:, :, None] * s_nt + h * s_nh + d3,
                            mask=is_new[:, :, None], other=0.0).to(K.dtype.element_ty)
            v_new = tl.load(Vnew + rows[:, :, None] * s_vnt + h * s_vnh + d3,
                            mask=is_new[:, :, None], other=0.0).to(V.dtype.element_ty)
            tl.store(k_ptr, k_new, mask=is_new[:, :, None])
            tl.store(V + page * s_vp + h * s_vh + slots[:, :, None] * s_vs + d3, v_new,
                     mask=is_new[:, :, None])
            k_old = tl.load(k_ptr, mask=(filled & (pos < start))[:, :, None], other=0.0)
            keys = tl.where(is_new[:, :, None], k_new, k_old).to(tl.float32)
        else:
            keys = tl.load(k_ptr, mask=filled[:, :, None], other=0.0).to(tl.float32)
        lo = tl.min(tl.where(filled[:, :, None], keys, float("inf")), 1)        # [BLOCKS, HEAD_DIM]
        hi = tl.max(tl.where(filled[:, :, None], keys, float("-inf")), 1)
        written = (tl.sum(filled.to(tl.int32), 1) > 0)[:, None]                 # a block with no key: 0
        lo = tl.where(written, lo, 0.0)
        hi = tl.where(written, hi, 0.0)
        tl.store(KMin + page * s_mp + offs_b[:, None] * s_mb + h * s_mh + offs_d[None, :],
                 lo.to(KMin.dtype.element_ty))
        tl.store(KMax + page * s_xp + offs_b[:, None] * s_xb + h * s_xh + offs_d[None, :],
                 hi.to(KMax.dtype.element_ty))
        if PAGE_SUMMARY:  # the page's own min/max: over its written blocks (a touched page has one)
            tl.store(PMin + page * s_qp + h * s_qh + offs_d,
                     tl.min(tl.where(written, lo, float("inf")), 0).to(PMin.dtype.element_ty))
            tl.store(PMax + page * s_qp + h * s_qh + offs_d,
                     tl.max(tl.where(written, hi, float("-inf")), 0).to(PMax.dtype.element_ty))


def _launch(k_cache, v_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, k, v, cu, pmin, pmax):
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    blocks = kmin.shape[1]
    assert page_size & (page_size - 1) == 0 and head_dim & (head_dim - 1) == 0
    assert kmin.shape == kmax.shape == (num_pages, blocks, kv_heads, head_dim) and page_size % blocks == 0
    assert kmin.stride(3) == kmax.stride(3) == k_cache.stride(3) == v_cache.stride(3) == 1
    assert page_tables.dtype == starts.dtype == ends.dtype == torch.int32
    assert page_tables.stride(1) == 1
    batch = page_tables.shape[0]
    if max_new_tokens is None:
        max_new_tokens = int((ends - starts).max()) if batch else 0
    if max_new_tokens <= 0:
        return
    touched = triton.cdiv(max_new_tokens + page_size - 1, page_size)
    write = k is not None
    if not write:
        k = v = k_cache.view(-1, kv_heads, head_dim)
        cu = starts
    page_summary = pmin is not None
    if page_summary:
        assert pmin.shape == pmax.shape == (num_pages, kv_heads, head_dim) and pmin.stride() == pmax.stride()
        assert pmin.stride(2) == 1
    else:
        pmin = pmax = kmin
    _kv_write_summaries[(touched, batch, kv_heads)](
        k, v, cu, starts, ends, page_tables, k_cache, v_cache, kmin, kmax, pmin, pmax,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_tables.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], *kmin.stride()[:3], *kmax.stride()[:3],
        pmin.stride(0), pmin.stride(1),
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCKS=blocks, WRITE_KV=write, PAGE_SUMMARY=page_summary,
        num_warps=2 if page_size <= 16 else 4)


def write_kv_and_summaries(k_cache: torch.Tensor, v_cache: torch.Tensor, kmin: torch.Tensor,
                           kmax: torch.Tensor, page_tables: torch.Tensor, cu_seqlens: torch.Tensor,
                           starts: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           max_new_tokens: int | None = None, pmin: torch.Tensor | None = None,
                           pmax: torch.Tensor | None = None) -> None:
    """Write new K/V (varlen: rows cu_seqlens[i]:cu_seqlens[i+1] of k, v [total_new, kv_heads, d]) of
    sequence i at positions starts[i]..., and refresh every block summary (kmin/kmax [num_pages,
    blocks, kv_heads, d]) of every page they touch. Equals reference.write_kv followed by
    reference.update_page_summaries (with the page summaries pmin/pmax [num_pages, kv_heads, d] when
    given). max_new_tokens bounds the grid (read from cu_seqlens, with a device sync, when None)."""
    assert k.shape == v.shape and k.shape[1:] == k_cache.shape[2:]
    assert k.stride(2) == 1 and v.stride(2) == 1
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (page_tables.shape[0] + 1,)
    ends = starts + (cu_seqlens[1:] - cu_seqlens[:-1])
    _launch(k_cache, v_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, k, v, cu_seqlens, pmin, pmax)


def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k_cache: torch.Tensor,
                          page_tables: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                          max_new_tokens: int | None = None, pmin: torch.Tensor | None = None,
                          pmax: torch.Tensor | None = None) -> None:
    """Batched reference.update_page_summaries: refresh the pages touched by [starts[i], ends[i])
    (and their page summaries pmin/pmax when given)."""
    _launch(k_cache, k_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, None, None, None, pmin, pmax)
