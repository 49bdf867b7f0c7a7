"""The paged KV cache of the torch backend: K/V pages per layer, and the summaries sparse decode
selects by when it is on. Layout and semantics are those of kernels/reference.py."""
from __future__ import annotations

import torch

# centroid summaries: 8-bit centroids (bench/sparse_estimators.py measured what 8 bits cost: nothing
# measurable) and two fp32 numbers per centroid, log count and spread
CENTROID_DTYPE = torch.float8_e4m3fn
CENTROID_STATS = 2


class PagedKVCache:
    """Per-layer K/V pages [num_pages + 1, page_size, kv_heads, head_dim], and with summary_tokens
    the Quest key summaries kmin/kmax [num_layers, num_pages + 1, page_size // summary_tokens,
    kv_heads, head_dim] of kernels/reference.py (one min/max per block of summary_tokens slots), and
    the page summaries pmin/pmax [num_layers, num_pages + 1, kv_heads, head_dim] (one min/max per
    page: the coarse level that shortlists pages before their blocks are read).

    With centroids = (C, group_pages) instead, the centroid selector's summaries
    (kernels/centroid_reference.centroid_group_summaries): cents [num_layers, num_pages + 1, kv_heads, C,
    head_dim] in 8 bits and cstats [num_layers, num_pages + 1, kv_heads, C, 2] (log count, spread),
    written at the physical id of each complete group's last page (so a page carries at most one
    group's summary, and it travels with the page between tiers). With run_pages as well (coarse
    to fine), run_cents and run_cstats of the same shapes hold each complete run's summary (C
    centroids of its run_pages pages' keys) at the run's last page.

    The last page (`scratch_page`) belongs to no sequence: the padding rows of a CUDA-graph batch
    write their K/V there, so padding never touches a page the engine handed out.
    summary_tokens=None and centroids=None (sparse attention off): no summaries at all; a dense
    server neither stores nor writes any.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, summary_tokens: int | None = None,
                 centroids: tuple[int, int] | tuple[int, int, int | None] | None = None):
        shape = (num_layers, num_pages + 1, page_size, kv_heads, head_dim)
        self.page_size, self.num_pages, self.summary_tokens = page_size, num_pages, summary_tokens
        self.scratch_page = num_pages
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per layer, every slot as a row [pages * page_size, kv_heads, d]: views made once.
        self.k_slots = [layer.view(-1, kv_heads, head_dim) for layer in self.k]
        self.v_slots = [layer.view(-1, kv_heads, head_dim) for layer in self.v]
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.pmin: torch.Tensor | None = None
        self.pmax: torch.Tensor | None = None
        self.cents: torch.Tensor | None = None
        self.cstats: torch.Tensor | None = None
        self.run_cents: torch.Tensor | None = None
        self.run_cstats: torch.Tensor | None = None
        self.group_pages: int | None = None
        self.run_pages: int | None = None
        assert summary_tokens is None or centroids is None, "one selector's summaries"
        if summary_tokens is not None:
            assert summary_tokens >= 1 and page_size % summary_tokens == 0, \
                f"summary_tokens {summary_tokens} must divide the page size {page_size}"
            blocks = page_size // summary_tokens
            # min/max of values stored in `dtype` are values of `dtype`: summaries lose nothing by it.
            self.kmin = torch.zeros(num_layers, num_pages + 1, blocks, kv_heads, head_dim, dtype=dtype,
                                    device=device)
            self.kmax = torch.zeros_like(self.kmin)
            self.pmin = torch.zeros(num_layers, num_pages + 1, kv_heads, head_dim, dtype=dtype, device=device)
            self.pmax = torch.zeros_like(self.pmin)
        if centroids is not None:
            clusters, self.group_pages, self.run_pages = (*centroids, None)[:3]
            assert clusters >= 1 and self.group_pages >= 1, centroids
            self.cents, self.cstats = self._centroid_store(num_layers, num_pages, kv_heads, clusters, head_dim, device)
            if self.run_pages is not None:
                assert self.run_pages % self.group_pages == 0, centroids
                self.run_cents, self.run_cstats = self._centroid_store(num_layers, num_pages, kv_heads, clusters,
                                                                       head_dim, device)

    @staticmethod
    def _centroid_store(num_layers: int, num_pages: int, kv_heads: int, clusters: int, head_dim: int,
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(num_layers, num_pages + 1, kv_heads, clusters, head_dim, dtype=CENTROID_DTYPE,
                            device=device),
                torch.zeros(num_layers, num_pages + 1, kv_heads, clusters, CENTROID_STATS, dtype=torch.float32,
                            device=device))

    def page_parts(self) -> list[torch.Tensor]:
        """Every tensor a page owns a slice of ([layers, pages + 1, ...]): what moves with a page."""
        return [t for t in (self.k, self.v, self.kmin, self.kmax, self.pmin, self.pmax, self.cents, self.cstats,
                            self.run_cents, self.run_cstats) if t is not None]

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, kv_heads: int, head_dim: int,
                       element_size: int, summary_tokens: int | None = None, centroids: int | None = None,
                       runs: bool = False) -> int:
        """K + V slots of one page over all layers, plus both summaries of each of its blocks and of
        the page when summary_tokens is given (Quest), or one group's centroid summary (centroids
        per group: each page has room for one, used when it is a group's last page), and with runs
        one run's as well."""
        rows = 2 * page_size + (2 * (page_size // summary_tokens) + 2 if summary_tokens else 0)
        per_layer = kv_heads * head_dim * element_size * rows
        if centroids:
            stores = 2 if runs else 1
            per_layer += stores * kv_heads * centroids * (head_dim * CENTROID_DTYPE.itemsize + CENTROID_STATS * 4)
        return num_layers * per_layer
