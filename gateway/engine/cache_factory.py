"""The radix cache the settings ask for, chosen once at engine start: one tier (RadixCache) when
the cache is off or the backend keeps no host copy of pages, else the tiered cache (gateway/engine/
tiers.py) with disk files when a directory is configured."""
from __future__ import annotations

import logging

from gateway.engine.disk_store import DiskStore
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.tiers import TieredRadixCache

log = logging.getLogger("radixgate.cache")


def create_cache(pool: PagePool, backend, *, enabled: bool, write_policy: str, disk_cache_dir: str | None,
                 disk_cache_bytes: int) -> RadixCache:
    """The cache the settings ask for, chosen once: tiered when the backend has a host tier."""
    store = getattr(backend, "kv_store", None)
    if not enabled or store is None:
        return RadixCache(pool, backend.page_size, enabled=enabled)
    disk = DiskStore(disk_cache_dir, store.layout, disk_cache_bytes) if disk_cache_dir else None
    cache = TieredRadixCache(pool, backend.page_size, store, disk, write_policy)
    log.info("KV tiers: L1 %d pages, L2 %d pages (%s), L3 %s", pool.num_pages, store.num_host_pages, write_policy,
             f"{disk.capacity_pages} pages in {disk.dir}" if cache.l3_on else "off")
    return cache
