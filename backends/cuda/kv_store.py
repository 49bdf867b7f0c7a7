"""TorchKVStore: the torch backend's host tier (L2) and its page copies (backends/kv_store.py).

Host pages are page-major bytes [host_pages, page_bytes]: one page's K, V and summaries of every
layer lie together, so a page is one bulk copy and one L3 file. The device pool is layer-major
(the attention kernels want it so); a copy gathers or scatters the pages on the device through a
staging buffer and moves each run of consecutive host pages in one transfer.

On CUDA the host pages are pinned and copies run on a side stream: it first waits for the work
queued on the compute stream (the pages it reads are written there), an eviction makes the compute
stream wait until its pages have been gathered (they are handed out again at once), and a load is
waited for by the engine only before the request that needs it runs (PageCopy.done).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from backends.base import RunnerSettings
from backends.cuda.kv_cache import PagedKVCache
from backends.kv_store import COPY_DONE, KVLayout, PageCopy, Tier, host_tier_layout, runs


class CudaCopy:
    """A copy queued on the store's stream."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class TorchKVStore:
    """num_host_pages pages of host memory for `cache`'s pages, and copies between the two."""

    def __init__(self, cache: PagedKVCache, num_host_pages: int, layout: KVLayout):
        assert num_host_pages >= 1, num_host_pages
        # every tensor a page owns a slice of: [layers, pages + 1, ...rest]
        # 8-bit floats as bytes: index_copy_ has no float8 kernels, and a copy moves bytes anyway
        self.parts = [t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t
                      for t in cache.page_parts()]
        self.part_shapes = [(t.shape[0], *t.shape[2:]) for t in self.parts]
        self.part_bytes = [math.prod(shape) * t.element_size() for shape, t in zip(self.part_shapes, self.parts,
                                                                                   strict=True)]
        self.page_bytes = sum(self.part_bytes)
        assert layout.page_bytes == self.page_bytes, (layout.page_bytes, self.page_bytes)
        self.layout = layout
        self.num_host_pages = num_host_pages
        self.device = cache.k.device
        cuda = self.device.type == "cuda"
        self.host = torch.empty((num_host_pages, self.page_bytes), dtype=torch.uint8, pin_memory=cuda)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.last: torch.cuda.Event | None = None

    @staticmethod
    def bytes_per_page(cache: PagedKVCache) -> int:
        return sum(math.prod((t.shape[0], *t.shape[2:])) * t.element_size() for t in cache.page_parts())

    def _views(self, staging: torch.Tensor) -> list[torch.Tensor]:
        """Each part's share of the staging pages [n, page_bytes] as [n, layers, ...rest]."""
        views, offset = [], 0
        for t, shape, size in zip(self.parts, self.part_shapes, self.part_bytes, strict=True):
            views.append(staging[:, offset:offset + size].view(t.dtype).view(len(staging), *shape))
            offset += size
        return views

    @torch.inference_mode()
    def copy_pages(self, src: Tier, dst: Tier, src_pages: Sequence[int], dst_pages: Sequence[int]) -> PageCopy:
        assert len(src_pages) == len(dst_pages) and src is not dst, (src, dst, len(src_pages), len(dst_pages))
        if not src_pages:
            return COPY_DONE
        if self.stream is None:
            self._copy(src, src_pages, dst_pages)
            return COPY_DONE
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            gathered = self._copy(src, src_pages, dst_pages)
            done = torch.cuda.Event()
            done.record(self.stream)
        if gathered is not None:        # the evicted device pages may be rewritten from now on
            compute.wait_event(gathered)
        self.last = done
        return CudaCopy(done)

    def _copy(self, src: Tier, src_pages: Sequence[int], dst_pages: Sequence[int]) -> torch.cuda.Event | None:
        n = len(src_pages)
        staging = torch.empty((n, self.page_bytes), dtype=torch.uint8, device=self.device)
        if src is Tier.DEVICE:
            index = self._index(src_pages)
            for part, view in zip(self.parts, self._views(staging), strict=True):
                view.copy_(part.index_select(1, index).transpose(0, 1))
            gathered = None
            if self.stream is not None:
                gathered = torch.cuda.Event()
                gathered.record(self.stream)
            for i, first, count in runs(dst_pages):
                self.host[first:first + count].copy_(staging[i:i + count], non_blocking=True)
            return gathered
        for i, first, count in runs(src_pages):
            staging[i:i + count].copy_(self.host[first:first + count], non_blocking=True)
        index = self._index(dst_pages)
        for part, view in zip(self.parts, self._views(staging), strict=True):
            part.index_copy_(1, index, view.transpose(0, 1))
        return None

    def _index(self, pages: Sequence[int]) -> torch.Tensor:
        """Page ids on the device without blocking the host: torch.tensor(..., device=cuda) copies
        from pageable memory, which waits until the copy stream reaches it (behind the page bytes
        queued before it), and so would hold back the next compute launches by a whole load."""
        index = torch.tensor(list(pages), dtype=torch.long)
        if self.stream is None:
            return index.to(self.device)
        return index.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.last is not None:
            self.last.synchronize()
            self.last = None

    def read_host_page(self, page: int) -> memoryview:
        self.synchronize()
        return memoryview(self.host[page].numpy())

    def write_host_page(self, page: int, data: bytes) -> None:
        self.synchronize()
        self.host[page].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def create_kv_store(settings: RunnerSettings, cache: PagedKVCache, weights: str, attention: str) -> TorchKVStore | None:
    """The host tier settings ask for (host_cache_bytes), or None when it is off."""
    if settings.host_cache_bytes <= 0:
        return None
    if getattr(settings, "tensor_parallel_size", 1) > 1:
        # each rank holds a shard of every page: tiers would need every rank to copy its shard
        logging.getLogger("radixgate.runner").warning("KV tiers are off under tensor parallelism (not built yet)")
        return None
    num_host_pages, layout = host_tier_layout(
        settings, TorchKVStore.bytes_per_page(cache), weights, attention,
        kv_dtype=str(cache.k.dtype).removeprefix("torch."), device=cache.k.device.type, page_size=cache.page_size,
        num_layers=cache.k.shape[0], kv_heads=cache.k.shape[3], head_dim=cache.k.shape[4],
        summary_tokens=cache.summary_tokens,
        centroids=None if cache.cents is None else f"{cache.cents.shape[3]}x{cache.group_pages}"
        + ("" if cache.run_pages is None else f"+runs{cache.run_pages}"))
    return TorchKVStore(cache, num_host_pages, layout)
