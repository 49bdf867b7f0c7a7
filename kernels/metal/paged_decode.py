"""Paged decode attention for the MLX backend: a Metal kernel and its MLX-ops mirror.

One function serves dense and sparse (Quest) decode: every (row, KV head) attends to its own list
of pages, pages [B, kv_heads, K], over its first lengths[b, h] positions of that list. Dense decode
passes the row's page table for every head and the sequence length; sparse decode passes each
head's chosen pages (sorted, so only the last may be partial) and (K - 1) * page_size + the last
page's fill. The cache is one layer's K or V slots, [num_pages * page_size, kv_heads, d].

The Metal kernel runs one SIMD group (32 lanes) per (row, q head): lane j holds dims j, j + 32, ...
of q and of the output; per position it reads the key from its page, a simd_sum makes the score,
and an online softmax (running max m, sum l) folds the value in. paged_decode_ops is the same
arithmetic in MLX ops (gather the positions, scores, masked float32 softmax, weighted sum), used
wherever MLX has no Metal GPU; which one runs is decided once (choose_paged_decode).
"""
from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

SIMD_WIDTH = 32

_SOURCE = """
    uint lane = thread_position_in_threadgroup.x;
    uint head = threadgroup_position_in_grid.y;
    uint row = threadgroup_position_in_grid.z;
    uint kv_head = head / GROUP;
    constexpr int PER_LANE = D / 32;
    float qv[PER_LANE];
    float acc[PER_LANE];
    size_t q_at = (size_t(row) * HEADS + head) * D;
    for (int i = 0; i < PER_LANE; ++i) {
        qv[i] = float(q[q_at + i * 32 + lane]) * scale[0];
        acc[i] = 0.0f;
    }
    int length = lengths[row * KV_HEADS + kv_head];
    size_t list_at = (size_t(row) * KV_HEADS + kv_head) * PAGES;
    float m = -INFINITY;
    float l = 0.0f;
    for (int t = 0; t < length; ++t) {
        int page = pages[list_at + t / PAGE_SIZE];
        size_t at = ((size_t(page) * PAGE_SIZE + t % PAGE_SIZE) * KV_HEADS + kv_head) * D;
        float s = 0.0f;
        for (int i = 0; i < PER_LANE; ++i) {
            s += qv[i] * float(k_cache[at + i * 32 + lane]);
        }
        s = simd_sum(s);
        float m_new = metal::max(m, s);
        float rescale = metal::exp(m - m_new);
        float p = metal::exp(s - m_new);
        l = l * rescale + p;
        for (int i = 0; i < PER_LANE; ++i) {
            acc[i] = acc[i] * rescale + p * float(v_cache[at + i * 32 + lane]);
        }
        m = m_new;
    }
    for (int i = 0; i < PER_LANE; ++i) {
        out[q_at + i * 32 + lane] = T(acc[i] / l);
    }
"""

_kernel = None


def _check(q: mx.array, cache: mx.array, pages: mx.array, lengths: mx.array) -> None:
    batch, heads, head_dim = q.shape
    assert cache.ndim == 3 and cache.shape[2] == head_dim, f"cache {cache.shape} for q {q.shape}"
    kv_heads = cache.shape[1]
    assert heads % kv_heads == 0, f"{heads} q heads for {kv_heads} KV heads"
    assert pages.shape[:2] == (batch, kv_heads) and lengths.shape == (batch, kv_heads), \
        f"pages {pages.shape}, lengths {lengths.shape} for {batch} rows of {kv_heads} KV heads"


def paged_decode_metal(q: mx.array, k_cache: mx.array, v_cache: mx.array, pages: mx.array,
                       lengths: mx.array, page_size: int, scale: float) -> mx.array:
    """q: [B, H, d] -> [B, H, d] in q's dtype; needs a Metal GPU and d a multiple of 32."""
    global _kernel
    _check(q, k_cache, pages, lengths)
    batch, heads, head_dim = q.shape
    assert head_dim % SIMD_WIDTH == 0, f"head_dim {head_dim} is not a multiple of {SIMD_WIDTH}"
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(
            name="radixgate_paged_decode", input_names=["q", "k_cache", "v_cache", "pages", "lengths", "scale"],
            output_names=["out"], source=_SOURCE)
    kv_heads = k_cache.shape[1]
    (out,) = _kernel(
        inputs=[q, k_cache, v_cache, pages.astype(mx.int32), lengths.astype(mx.int32),
                mx.array([scale], dtype=mx.float32)],
        template=[("T", q.dtype), ("D", head_dim), ("HEADS", heads), ("KV_HEADS", kv_heads),
                  ("GROUP", heads // kv_heads), ("PAGES", pages.shape[2]), ("PAGE_SIZE", page_size)],
        grid=(SIMD_WIDTH, heads, batch), threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])
    return out


def paged_decode_ops(q: mx.array, k_cache: mx.array, v_cache: mx.array, pages: mx.array,
                     lengths: mx.array, page_size: int, scale: float) -> mx.array:
    """The Metal kernel's computation in MLX ops, step for step: q: [B, H, d] -> [B, H, d]."""
    _check(q, k_cache, pages, lengths)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group, span = heads // kv_heads, pages.shape[2] * page_size
    # the flat cache row of list position t for head h: (page(t) * page_size + t % page_size) * kv_heads + h
    slot = mx.arange(page_size, dtype=mx.int32)
    head = mx.arange(kv_heads, dtype=mx.int32).reshape(1, kv_heads, 1, 1)
    rows = ((pages.astype(mx.int32)[..., None] * page_size + slot) * kv_heads + head).reshape(-1)
    k = k_cache.reshape(-1, head_dim)[rows].reshape(batch, kv_heads, span, head_dim)
    v = v_cache.reshape(-1, head_dim)[rows].reshape(batch, kv_heads, span, head_dim)
    qg = q.reshape(batch, kv_heads, group, head_dim).astype(mx.float32) * scale
    scores = qg @ k.astype(mx.float32).swapaxes(-1, -2)                         # [B, kvh, g, span]
    valid = mx.arange(span).reshape(1, 1, 1, span) < lengths.reshape(batch, kv_heads, 1, 1)
    weights = mx.softmax(mx.where(valid, scores, -mx.inf), axis=-1)
    out = weights @ v.astype(mx.float32)                                         # [B, kvh, g, d]
    return out.reshape(batch, heads, head_dim).astype(q.dtype)


PagedDecode = Callable[[mx.array, mx.array, mx.array, mx.array, mx.array, int, float], mx.array]


def choose_paged_decode(head_dim: int) -> tuple[str, PagedDecode]:
    """Once at start-up: the Metal kernel when MLX runs on a Metal GPU (and d suits its lanes),
    else the MLX-ops mirror."""
    if mx.metal.is_available() and mx.default_device() == mx.gpu and head_dim % SIMD_WIDTH == 0:
        return "metal", paged_decode_metal
    return "mlx_ops", paged_decode_ops
