"""The paged KV cache of the MLX backend: K/V slots per layer, and the summaries sparse decode selects
by when it is on (Quest's key min/max, or the centroid selector's k-means centroids). Layout and
semantics are those of kernels/reference.py and kernels/centroid_reference.py (and
backends/cuda/kv_cache.py, whose page bytes the host tier's pages repeat).

MLX arrays are values, not buffers: a write makes a new array that replaces the layer's entry
here. The runner evaluates every layer's arrays at the end of each step, so the graph never grows
past one step and MLX reuses the old buffer in place when nothing else holds it.
"""
from __future__ import annotations

import mlx.core as mx

from backends.cuda.kv_cache import CENTROID_STATS

# e4m3 centroids as their bytes (mx.to_fp8 / mx.from_fp8: MLX has no 8-bit float dtype); one byte
# each, as the torch cache's float8_e4m3fn, so a page's bytes on the host are the same
CENTROID_DTYPE = mx.uint8


class PagedKVCache:
    """Per layer, k and v as slots [(num_pages + 1) * page_size, kv_heads, d]; with summary_tokens,
    the block summaries kmin/kmax [num_pages + 1, page_size // summary_tokens, kv_heads, d] and the
    page summaries pmin/pmax [num_pages + 1, kv_heads, d] (kernels/reference.py: the coarse level
    that shortlists pages before their blocks are read). The last page (`scratch_page`) belongs to
    no sequence; page tables are padded with it.

    With centroids = (C, group_pages[, run_pages]) instead (the centroid selector), per layer cents
    [num_pages + 1, kv_heads, C, d] (e4m3 bytes) and cstats [num_pages + 1, kv_heads, C, 2] (log
    count, spread) at the physical id of each complete group's last page; with run_pages as well
    (coarse to fine), run_cents and run_cstats of the same shapes hold each complete run's summary
    at the run's last page (kernels/centroid_reference.CentroidShortlist)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: mx.Dtype, summary_tokens: int | None = None,
                 centroids: tuple[int, int] | tuple[int, int, int | None] | None = None):
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
        self.cents: list[mx.array] | None = None
        self.cstats: list[mx.array] | None = None
        self.run_cents: list[mx.array] | None = None
        self.run_cstats: list[mx.array] | None = None
        self.group_pages: int | None = None
        self.run_pages: int | None = None
        assert summary_tokens is None or centroids is None, "one selector's summaries"
        if summary_tokens is not None:
            assert summary_tokens >= 1 and page_size % summary_tokens == 0, \
                f"summary_tokens {summary_tokens} must divide the page size {page_size}"
            shape = (num_pages + 1, page_size // summary_tokens, kv_heads, head_dim)
            self.kmin = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
            self.kmax = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
            self.pmin = [mx.zeros((num_pages + 1, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
            self.pmax = [mx.zeros((num_pages + 1, kv_heads, head_dim), dtype=dtype) for _ in range(num_layers)]
        if centroids is not None:
            clusters, self.group_pages, self.run_pages = (*centroids, None)[:3]
            assert clusters >= 1 and self.group_pages >= 1, centroids
            self.cents, self.cstats = self._centroid_store(num_layers, num_pages, clusters)
            if self.run_pages is not None:
                assert self.run_pages % self.group_pages == 0, centroids
                self.run_cents, self.run_cstats = self._centroid_store(num_layers, num_pages, clusters)
        mx.eval(self.arrays())

    def _centroid_store(self, num_layers: int, num_pages: int, clusters: int) -> tuple[list[mx.array], list[mx.array]]:
        shape = (num_pages + 1, self.kv_heads, clusters)
        return ([mx.zeros((*shape, self.head_dim), dtype=CENTROID_DTYPE) for _ in range(num_layers)],
                [mx.zeros((*shape, CENTROID_STATS), dtype=mx.float32) for _ in range(num_layers)])

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, kv_heads: int, head_dim: int, element_size: int,
                       summary_tokens: int | None = None, centroids: int | None = None, runs: bool = False) -> int:
        """K + V of one page over all layers, plus its Quest summaries (summary_tokens), or room for one
        group's centroid summary (centroids per group) and with runs one run's as well."""
        rows = 2 * page_size + (2 * (page_size // summary_tokens) + 2 if summary_tokens else 0)
        per_layer = kv_heads * head_dim * element_size * rows
        if centroids:
            per_layer += (2 if runs else 1) * kv_heads * centroids * (head_dim * CENTROID_DTYPE.size
                                                                       + CENTROID_STATS * mx.float32.size)
        return num_layers * per_layer

    def arrays(self) -> list[mx.array]:
        """Every array of the cache: what a step evaluates so that it holds this step's writes."""
        return [a for part in self.page_parts() for a in part]

    def page_parts(self) -> list[list[mx.array]]:
        """Every per-layer list whose arrays hold a slice of each page ([num_pages + 1, ...] or, for
        k and v, the page's slots): what moves with a page between tiers, in the torch cache's order."""
        return [part for part in (self.k, self.v, self.kmin, self.kmax, self.pmin, self.pmax, self.cents,
                                  self.cstats, self.run_cents, self.run_cstats) if part is not None]

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
