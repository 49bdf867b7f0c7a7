"""MlxKVStore: the MLX backend's host tier (L2) and its page copies (backends/kv_store.py).

Host pages are page-major bytes [host_pages, page_bytes] in NumPy, laid out as the torch store's
(every layer's K, V and summaries of a page together, in PagedKVCache.page_parts()'s order: Quest's
min/max, or the centroid selector's e4m3 centroid bytes and stats, the groups' then the runs').
MLX arrays are values: a load writes new arrays into the cache's lists and evaluates them at once,
so the next step reads the loaded pages.
"""
from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from backends.base import RunnerSettings
from backends.kv_store import COPY_DONE, KVLayout, PageCopy, Tier, host_tier_layout
from backends.mlx.kv_cache import PagedKVCache

_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}


class MlxKVStore:
    """num_host_pages pages of host memory for `cache`'s pages, and copies between the two."""

    def __init__(self, cache: PagedKVCache, num_host_pages: int, layout: KVLayout):
        self.cache, self.num_host_pages, self.layout = cache, num_host_pages, layout
        self.pages = cache.num_pages + 1
        # (the part's per-layer list, layer, bytes of one page of it), in the order they lie in a host page
        self.slices = [(arrays, layer, arrays[layer].size // self.pages * arrays[layer].dtype.size)
                       for arrays in cache.page_parts() for layer in range(len(arrays))]
        self.page_bytes = sum(size for *_, size in self.slices)
        assert layout.page_bytes == self.page_bytes, (layout.page_bytes, self.page_bytes)
        self.host = np.zeros((num_host_pages, self.page_bytes), dtype=np.uint8)

    @staticmethod
    def bytes_per_page(cache: PagedKVCache) -> int:
        return sum(a.size // (cache.num_pages + 1) * a.dtype.size for arrays in cache.page_parts() for a in arrays)

    def copy_pages(self, src: Tier, dst: Tier, src_pages: Sequence[int], dst_pages: Sequence[int]) -> PageCopy:
        assert len(src_pages) == len(dst_pages) and src is not dst
        if not src_pages:
            return COPY_DONE
        offset = 0
        for arrays, layer, size in self.slices:
            paged = arrays[layer].reshape(self.pages, -1)
            raw = _UINT[paged.dtype.size]
            if src is Tier.DEVICE:
                picked = paged[mx.array(list(src_pages))].view(raw)
                self.host[list(dst_pages), offset:offset + size] = np.array(picked).view(np.uint8)
            else:
                values = mx.array(np.ascontiguousarray(self.host[list(src_pages), offset:offset + size])
                                  .view(np.dtype(f"u{paged.dtype.size}"))).view(paged.dtype)
                paged[mx.array(list(dst_pages))] = values
                arrays[layer] = paged.reshape(arrays[layer].shape)
            offset += size
        if src is Tier.HOST:
            mx.eval(self.cache.arrays())
        return COPY_DONE

    def read_host_page(self, page: int) -> memoryview:
        return memoryview(self.host[page])

    def write_host_page(self, page: int, data: bytes) -> None:
        self.host[page] = np.frombuffer(data, dtype=np.uint8)


def create_kv_store(settings: RunnerSettings, cache: PagedKVCache, weights: str, attention: str) -> MlxKVStore | None:
    """The host tier settings ask for (host_cache_bytes), or None when it is off."""
    if settings.host_cache_bytes <= 0:
        return None
    num_host_pages, layout = host_tier_layout(
        settings, MlxKVStore.bytes_per_page(cache), weights, attention,
        kv_dtype=str(cache.k[0].dtype).removeprefix("mlx.core."), device=f"mlx-{mx.default_device().type.name}",
        page_size=cache.page_size, num_layers=len(cache.k), kv_heads=cache.kv_heads, head_dim=cache.head_dim,
        summary_tokens=cache.summary_tokens, centroids=centroid_layout(cache))
    return MlxKVStore(cache, num_host_pages, layout)


def centroid_layout(cache: PagedKVCache) -> str | None:
    """The layout key's name for the centroid summaries a page carries, as the torch store writes it
    (backends/cuda/kv_store.create_kv_store): "CxN" (C centroids per group of N pages), "+runsM" with
    the coarse stage's runs of M pages; None without centroids (the key then keeps its old form)."""
    if cache.cents is None:
        return None
    runs = "" if cache.run_pages is None else f"+runs{cache.run_pages}"
    return f"{cache.cents[0].shape[2]}x{cache.group_pages}{runs}"
