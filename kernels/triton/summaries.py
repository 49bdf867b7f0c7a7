"""KV write fused with Quest page summaries.

One program per (sequence, touched page, KV head): it stores the page's new K/V rows into the cache
and, in the same pass, recomputes the element-wise min/max of keys over the page's written slots
(old slots are re-read from the cache, new ones come from registers). A decode step touches one page
per sequence, so the summaries cost one page read per written token's page, nothing more.
With write_kv=False the same kernel only refreshes the summaries of positions [starts, ends).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_summaries(Knew, Vnew, CuSeq, Starts, Ends, PT, K, V, KMin, KMax,
                        s_nt, s_nh, s_vnt, s_vnh, s_pb, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
                        s_mp, s_mh, s_xp, s_xh,
                        HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, WRITE_KV: tl.constexpr):
    j = tl.program_id(0)  # touched page: axis 0 has no 65535 limit
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(Starts + b)
    end = tl.load(Ends + b)
    logical = start // PAGE_SIZE + j
    if (end > start) & (logical * PAGE_SIZE < end):
        page = tl.load(PT + b.to(tl.int64) * s_pb + logical).to(tl.int64)
        slots = tl.arange(0, PAGE_SIZE)
        offs_d = tl.arange(0, HEAD_DIM)
        pos = logical * PAGE_SIZE + slots
        filled = pos < end
        k_ptr = K + page * s_kp + h * s_kh + slots[:, None] * s_ks + offs_d[None, :]
        if WRITE_KV:
            is_new = filled & (pos >= start)
            rows = (tl.load(CuSeq + b) + pos - start).to(tl.int64)
            k_new = tl.load(Knew + rows[:, None] * s_nt + h * s_nh + offs_d[None, :],
                            mask=is_new[:, None], other=0.0).to(K.dtype.element_ty)
            v_new = tl.load(Vnew + rows[:, None] * s_vnt + h * s_vnh + offs_d[None, :],
                            mask=is_new[:, None], other=0.0).to(V.dtype.element_ty)
            tl.store(k_ptr, k_new, mask=is_new[:, None])
            tl.store(V + page * s_vp + h * s_vh + slots[:, None] * s_vs + offs_d[None, :], v_new,
                     mask=is_new[:, None])
            k_old = tl.load(k_ptr, mask=(filled & (pos < start))[:, None], other=0.0)
            keys = tl.where(is_new[:, None], k_new, k_old).to(tl.float32)
        else:
            keys = tl.load(k_ptr, mask=filled[:, None], other=0.0).to(tl.float32)
        lo = tl.min(tl.where(filled[:, None], keys, float("inf")), 0)
        hi = tl.max(tl.where(filled[:, None], keys, float("-inf")), 0)
        tl.store(KMin + page * s_mp + h * s_mh + offs_d, lo.to(KMin.dtype.element_ty))
        tl.store(KMax + page * s_xp + h * s_xh + offs_d, hi.to(KMax.dtype.element_ty))


def _launch(k_cache, v_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, k, v, cu):
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    assert page_size & (page_size - 1) == 0 and head_dim & (head_dim - 1) == 0
    assert kmin.shape == kmax.shape == (num_pages, kv_heads, head_dim)
    assert kmin.stride(2) == kmax.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
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
    _kv_write_summaries[(touched, batch, kv_heads)](
        k, v, cu, starts, ends, page_tables, k_cache, v_cache, kmin, kmax,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_tables.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], *kmin.stride()[:2], *kmax.stride()[:2],
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, WRITE_KV=write, num_warps=2 if page_size <= 16 else 4)


def write_kv_and_summaries(k_cache: torch.Tensor, v_cache: torch.Tensor, kmin: torch.Tensor,
                           kmax: torch.Tensor, page_tables: torch.Tensor, cu_seqlens: torch.Tensor,
                           starts: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           max_new_tokens: int | None = None) -> None:
    """Write new K/V (varlen: rows cu_seqlens[i]:cu_seqlens[i+1] of k, v [total_new, kv_heads, d]) of
    sequence i at positions starts[i]..., and refresh kmin/kmax [num_pages, kv_heads, d] of every
    page they touch. Equals reference.write_kv followed by reference.update_page_summaries.
    max_new_tokens bounds the grid (read from cu_seqlens, with a device sync, when None)."""
    assert k.shape == v.shape and k.shape[1:] == k_cache.shape[2:]
    assert k.stride(2) == 1 and v.stride(2) == 1
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (page_tables.shape[0] + 1,)
    ends = starts + (cu_seqlens[1:] - cu_seqlens[:-1])
    _launch(k_cache, v_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, k, v, cu_seqlens)


def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k_cache: torch.Tensor,
                          page_tables: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                          max_new_tokens: int | None = None) -> None:
    """Batched reference.update_page_summaries: refresh the pages touched by [starts[i], ends[i])."""
    _launch(k_cache, k_cache, kmin, kmax, page_tables, starts, ends, max_new_tokens, None, None, None)
