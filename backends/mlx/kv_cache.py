"""The paged KV cache of the MLX backend: K/V slots per layer, and Quest key summaries when sparse
decode is on. Layout and semantics are those of kernels/reference.py (and backends/cuda/kv_cache.py).

MLX arrays are values, not buffers: a write makes a new array that replaces the layer's entry
here. The runner evaluates every layer's arrays at the end of each step, so the graph never grows
past one step and MLX reuses the old buffer in place when nothing else holds it.
"""
from __future__ import annotations

import mlx.core as mx


class PagedKVCache:
    """Per layer, k and v as slots [(num_pages + 1) * page_size, kv_heads, d]; with summary_tokens,
    the block summaries kmin/kmax [num_pages + 1, page_size // summary_tokens, kv_heads, d] and the
    page summaries pmin/pmax [num_pages + 1, kv_heads, d] (kernels/reference.py: the coarse level
    that shortlists pages before their blocks are read). The last page (`scratch_page`) belongs to
    no sequence; page tables are padded with it."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: mx.Dtype, summary_tokens: int | None = None):
        self.page_size, self.num_pages, self.summary_tokens = page_size, num_pages, summary_tokens
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.scratch_page = num_pages
        slots = (num_pages + 1) * page_size
        self.k = [mx.zeros((slots, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
        self.v = [mx.zeros((slots, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
        self.kmin: list[mx.array] | None = None
        self.kmax: list[mx.array] | None = None
        self.pmin: list[mx.array] | None = None
        self.pmax: list[mx.array] | None = None
        if summary_tokens is not None:
            assert summary_tokens >= 1 and page_size % summary_tokens == 0, \
                f"summary_tokens {summary_tokens} must divide the page size {page_size}"
            shape = (num_pages + 1, page_size // summary_tokens, kv_heads, head_dim)
            self.kmin = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
            self.kmax = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
            self.pmin = [mx.zeros((num_pages + 1, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
            self.pmax = [mx.zeros((num_pages + 1, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
        mx.eval(self.arrays())

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, kv_heads: int, head_dim: int, element_size: int,
                       summary_tokens: int | None = None) -> int:
        rows = 2 * page_size + (2 * (page_size // summary_tokens) + 2 if summary_tokens else 0)
        return num_layers * kv_heads * head_dim * element_size * rows

    def arrays(self) -> list[mx.array]:
        """Every array of the cache: what a step evaluates so that it holds this step's writes."""
        return self.k + self.v + (self.kmin or []) + (self.kmax or []) + (self.pmin or []) + (self.pmax or [])

    def write(self, layer: int, slots: mx.array, k: mx.array, v: mx.array) -> None:
        """Store new k, v: [T, kv_heads, d] at flat slots [T] (page * page_size + offset)."""
        self.k[layer][slots] = k.astype(self.k[layer].dtype)
        self.v[layer][slots] = v.astype(self.v[layer].dtype)

    def update_summaries(self, layer: int, pages: mx.array, unwritten: mx.array) -> None:
        """Recompute every block summary of the touched pages [S] from the keys in the cache:
        min/max over the block's written slots, 0 for a block with none; and each page's summary,
        min/max over its written blocks (a touched page has at least one), as reference
        update_page_summaries. unwritten: bool [S, blocks, summary_tokens, 1, 1]. Decode steps
        recompute too (no incremental fold as in the torch backend): a touched page is
        page_size keys, and recomputing keeps one code path for every step."""
        blocks = self.kmin[layer].shape[1]
        keys = self.k[layer].reshape(-1, self.page_size, self.kv_heads, self.head_dim)[pages]
        keys = keys.reshape(pages.shape[0], blocks, self.summary_tokens, self.kv_heads, self.head_dim)
        empty = unwritten.all(axis=2)
        lo = mx.where(empty, 0, mx.where(unwritten, mx.inf, keys).min(axis=2))
        hi = mx.where(empty, 0, mx.where(unwritten, -mx.inf, keys).max(axis=2))
        self.kmin[layer][pages] = lo.astype(self.kmin[layer].dtype)
        self.kmax[layer][pages] = hi.astype(self.kmax[layer].dtype)
        self.pmin[layer][pages] = mx.where(empty, mx.inf, lo).min(axis=1).astype(self.pmin[layer].dtype)
        self.pmax[layer][pages] = mx.where(empty, -mx.inf, hi).max(axis=1).astype(self.pmax[layer].dtype)
