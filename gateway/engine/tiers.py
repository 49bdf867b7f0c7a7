"""TieredRadixCache: the radix cache over three tiers: L1 device pages, L2 host pages, L3 files
(the L3 side: gateway/engine/disk_tier.py).

Policies (config kv_cache.write_policy, kv_cache.prefetch_policy):
  write_through  pages are copied to L2 as they enter the tree, and from there to L3 (when on) as
                 soon as the copy has landed; evicting then only frees. What is cached reaches disk
                 (within its bound) without waiting for pressure, and survives a restart or a crash.
  write_back     a page is copied down only when evicted: L1 -> L2 on L1 eviction, L2 -> L3 on L2
                 eviction. Less copying; a restart keeps only what had reached L3.
  wait_complete  a match whose tail lies on L2/L3 loads it into L1 at admission (an L3 file is read
                 into L2 first, checksum verified); the L2 -> L1 copy runs on the backend's copy
                 stream, and the request's first chunk runs once its own copy has landed while the
                 other requests keep running.

Structure (check_invariants asserts it): every node is on at least one tier; the L1 nodes form a
subtree holding the root (a page table is L1 pages from position 0); a locked node is on L1. Each
tier evicts LRU: from L1 unlocked nodes without an L1 child, and a node's last copy is moved one
tier down (or, on the last tier, dropped with the node, which must then be a leaf). While a match
loads its tail, the tail is locked and its L2/L3 copies are not evicted.

Accounting, exact per tier:
  L1  pool.num_free + evictable_size + protected_size + pages held by requests == pool.num_pages
  L2  host_pool.num_free + host_size == host_pool.num_pages   (every host page belongs to a node)
  L3  len(disk.pages) == disk_size <= disk.capacity_pages        (every file belongs to a node)
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from backends.kv_store import COPY_DONE, KVStore, PageCopy, Tier
from gateway.engine.disk_store import DiskStore
from gateway.engine.disk_tier import DiskTier, has_copy
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import MatchResult, RadixCache, TreeNode

WRITE_POLICIES = ("write_through", "write_back")
PREFETCH_POLICIES = ("wait_complete",)


class TieredRadixCache(DiskTier, RadixCache):
    """A RadixCache whose evictions move pages down to L2 (the backend's KVStore) and L3 (a
    DiskStore) and whose matches bring them back."""

    def __init__(self, pool: PagePool, page_size: int, kv_store: KVStore, disk: DiskStore | None = None,
                 write_policy: str = "write_through"):
        assert write_policy in WRITE_POLICIES, write_policy
        assert kv_store.layout.page_size == page_size, (kv_store.layout.page_size, page_size)
        self.kv_store = kv_store
        self.host_pool = PagePool(kv_store.num_host_pages)
        self.disk = disk
        self.write_policy = write_policy
        self.pending_through: list[TreeNode] = []    # write_through: new nodes to copy down (flush_writes)
        self.pending_writes: list[tuple[TreeNode, PageCopy]] = []   # write_through: to L3 once on L2
        self.last_load: PageCopy = COPY_DONE
        self.moved = {"l1_to_l2": 0, "l2_to_l3": 0, "l2_to_l1": 0, "l3_to_l1": 0}   # pages
        self._sweep_needed = False
        super().__init__(pool, page_size)
        if self.l3_on:
            self._rebuild_from_disk()

    def _init_tree(self) -> None:
        super()._init_tree()
        self.host_size = 0       # L2 pages held by nodes
        self.disk_size = 0       # L3 pages held by nodes

    @property
    def l3_on(self) -> bool:
        return self.disk is not None and self.disk.enabled

    # ---- lookup ----------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """The longest cached prefix on any tier; its L2/L3 tail is loaded into L1 (as far as L1
        has room) and the result covers what is on L1 now. result.load: wait before reading."""
        self._write_pending()
        ps = self.page_size
        path = self._walk(token_ids)
        on_l1 = next((i for i, n in enumerate(path) if not n.pages), len(path))
        result = MatchResult([], 0, self.root)
        usable = on_l1 + self._load(path[on_l1:], result)
        for n in path[:usable]:
            result.pages += n.pages
        result.num_tokens = len(result.pages) * ps
        result.last_node = path[usable - 1] if usable else self.root
        self._sweep()
        return result

    def _load(self, tail: list[TreeNode], result: MatchResult) -> int:
        """Bring the nodes of tail (top down) into L1; returns how many made it."""
        if not tail:
            return 0
        self.inc_lock_ref(tail[-1])         # protects the path, and the tail's lower copies
        loaded, bad = 0, None
        for node in tail:
            n = len(node.key) // self.page_size
            pages = self._allocate_l1(n)
            if pages is None:
                break
            from_disk = not node.host_pages
            if from_disk:
                status = self._disk_to_host(node) if node.on_disk else "gone"
                if status != "ok":
                    self.pool.free(pages)
                    bad = node if status == "bad" else None
                    break
            result.load = self.last_load = self.kv_store.copy_pages(Tier.HOST, Tier.DEVICE, node.host_pages, pages)
            node.pages = pages
            self.protected_size += n
            self.moved["l3_to_l1" if from_disk else "l2_to_l1"] += n
            if from_disk:
                result.disk_tokens += len(node.key)
            else:
                result.host_tokens += len(node.key)
            loaded += 1
        self.dec_lock_ref(tail[-1])
        if bad is not None and bad.parent is not None:
            self._remove_subtree(bad)        # its file failed its checks: recompute from here
        return loaded

    # ---- insert ----------------------------------------------------------------------------
    def insert(self, token_ids: list[int], pages: list[int]) -> int:
        """RadixCache.insert; a node found on L2/L3 only takes the request's pages as its L1 copy."""
        self._write_pending()
        ps = self.page_size
        assert len(token_ids) == len(pages) * ps, (len(token_ids), len(pages), ps)
        tokens = tuple(token_ids)
        now = next(self._clock)
        node, pos, duplicates, fresh = self.root, 0, [], []
        while pos < len(tokens):
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                leaf = TreeNode(tokens[pos:], list(pages[pos // ps:]), node, 0, now)
                node.children[tokens[pos:pos + ps]] = leaf
                self.evictable_size += len(leaf.pages)
                fresh.append(leaf)
                break
            child.last_access_time = now
            m = self._match_len(child.key, tokens[pos:])
            if m < len(child.key) and (pos + m < len(tokens) or not child.pages):
                child = self._split_node(child, m)
            theirs = pages[pos // ps:(pos + m) // ps]
            if child.pages:
                duplicates += [t for ours, t in zip(child.pages[:m // ps], theirs, strict=True) if ours != t]
            else:
                assert child.lock_ref == 0, child     # locked nodes are on L1
                child.pages = list(theirs)
                self.evictable_size += len(theirs)
                fresh.append(child)
            pos += m
            node = child
        self.pool.free(duplicates)
        if self.write_policy == "write_through":
            self.pending_through += fresh     # copied down by flush_writes, after the step's tokens are out
        self._sweep()
        return pos

    def flush_writes(self) -> None:
        """Do the write-through copies queued so far. The engine calls it once a step's events are
        sent, so the copies never delay a first token; every other call into the cache does it too."""
        self._write_pending()
        self._sweep()

    def _write_through(self, node: TreeNode) -> None:
        if node.host_pages or node.parent is None:
            return
        slots = self._take_host(len(node.pages))
        if slots is None:
            return
        copy = self.kv_store.copy_pages(Tier.DEVICE, Tier.HOST, node.pages, slots)
        node.host_pages = slots
        self.host_size += len(slots)
        self.moved["l1_to_l2"] += len(slots)
        if self.l3_on and not node.on_disk:
            self.pending_writes.append((node, copy))

    def _write_pending(self) -> None:
        """write_through: copy queued nodes to L2, and nodes (and ancestors) whose L2 copy has landed
        on to L3."""
        through, self.pending_through = self.pending_through, []
        for node in through:
            if node.parent is not None and node.pages:
                self._write_through(node)
        if not self.pending_writes:
            return
        waiting, self.pending_writes = self.pending_writes, []
        for node, copy in waiting:
            if not copy.done():
                self.pending_writes.append((node, copy))
                continue
            chain = []
            while node is not None and node is not self.root and node.host_pages and not node.on_disk:
                chain.append(node)
                node = node.parent
            for n in reversed(chain):
                if self.l3_on and n.parent is not None and n.host_pages and not n.on_disk:
                    self._host_to_disk(n)

    # ---- eviction, tier by tier ---------------------------------------------------------------
    def _l1_evictable(self, node: TreeNode) -> bool:
        return bool(node.pages) and node.lock_ref == 0 and not any(c.pages for c in node.children.values())

    def _l2_evictable(self, node: TreeNode) -> bool:
        return bool(node.host_pages) and not (node.lock_ref and not node.pages) and (
            bool(node.pages) or node.on_disk or self.l3_on or not node.children)

    def _evict_tier(self, num_pages: int, evictable: Callable[[TreeNode], bool],
                    move_down: Callable[[TreeNode], None]) -> int:
        """LRU over the nodes `evictable` admits; a node larger than what is still wanted is split
        and only its tail goes (a locked one goes whole). Returns pages taken off the tier."""
        heap = [(n.last_access_time, n.id, n) for n in self._all_nodes() if evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            if node.parent is None or not evictable(node):
                continue            # removed or changed since it was pushed
            count = len(node.key) // self.page_size
            want = num_pages - freed
            if want < count and not node.lock_ref:
                # only the tail goes; a locked node (on a path a match is loading, its host copy
                # evictable because it has L1 pages) is never split: callers hold its object
                self._split_node(node, len(node.key) - want * self.page_size)
                count = want
            parent = node.parent
            move_down(node)
            freed += count
            if parent is not self.root and parent.parent is not None and evictable(parent):
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages L1 pages, least recently used first, moving them down to L2."""
        self._write_pending()
        freed = self._evict_tier(num_pages, self._l1_evictable, self._l1_down)
        self.evictions += freed
        self._sweep()
        return freed

    def _l1_down(self, node: TreeNode) -> None:
        if not node.host_pages and not node.on_disk:
            slots = self._take_host(len(node.pages))
            if slots is not None:
                self.kv_store.copy_pages(Tier.DEVICE, Tier.HOST, node.pages, slots)
                node.host_pages = slots
                self.host_size += len(slots)
                self.moved["l1_to_l2"] += len(slots)
        self._free_l1(node)
        if not has_copy(node):
            self._remove_subtree(node)       # no room below: it goes, with what hangs below it

    def _evict_host(self, num_pages: int) -> int:
        return self._evict_tier(num_pages, self._l2_evictable, self._l2_down)

    def _l2_down(self, node: TreeNode) -> None:
        if not node.pages and not node.on_disk and self.l3_on:
            self._host_to_disk(node)
        self.host_pool.free(node.host_pages)
        self.host_size -= len(node.host_pages)
        node.host_pages = []
        if not has_copy(node):
            self._remove_subtree(node)

    # ---- moving pages ---------------------------------------------------------------------
    def _allocate_l1(self, n: int) -> list[int] | None:
        if n > self.pool.num_free + self.evictable_size:
            return None                      # (evicting would not make room: keep what is cached)
        if self.pool.num_free < n:
            self.evict(n - self.pool.num_free)
        return self.pool.allocate(n)

    def _take_host(self, n: int) -> list[int] | None:
        if n > self.host_pool.num_pages:
            return None
        if self.host_pool.num_free < n:
            self._evict_host(n - self.host_pool.num_free)
        return self.host_pool.allocate(n)

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        upper = super()._split_node(child, split_len)
        k = split_len // self.page_size
        upper.host_pages, child.host_pages = child.host_pages[:k], child.host_pages[k:]
        upper.on_disk = child.on_disk
        if child.hashes is not None:
            upper.hashes, child.hashes = child.hashes[:k], child.hashes[k:]
        return upper

    def _wait_loads(self) -> None:
        """Before an L1 page is freed: a load into it may still be on its way (CUDA)."""
        if not self.last_load.done():
            self.last_load.wait()

    def _free_l1(self, node: TreeNode) -> None:
        assert node.lock_ref == 0, node
        self._wait_loads()
        self.pool.free(node.pages)
        self.evictable_size -= len(node.pages)
        node.pages = []

    def _remove_subtree(self, node: TreeNode) -> None:
        """Detach node and everything below it, freeing their copies on every tier."""
        del node.parent.children[node.key[:self.page_size]]
        for n in self._all_nodes(node):
            if n.pages:
                self._free_l1(n)
            if n.host_pages:
                self.host_pool.free(n.host_pages)
                self.host_size -= len(n.host_pages)
                n.host_pages = []
            if n.on_disk:
                self._drop_disk_copy(n)
            n.parent = None

    # ---- reset -------------------------------------------------------------------------------
    def reset(self) -> int:
        """Empty every tier of what no request holds (a held node keeps only its L1 pages);
        returns the L1 pages freed."""
        self._wait_loads()
        self.pending_writes.clear()
        self.pending_through.clear()
        freed = 0
        for node in self._all_nodes():
            if node.parent is None:
                continue                      # went with an ancestor
            if node.lock_ref == 0:
                freed += sum(len(n.pages) for n in self._all_nodes(node))
                self._remove_subtree(node)
                continue
            if node.host_pages:
                self.host_pool.free(node.host_pages)
                self.host_size -= len(node.host_pages)
                node.host_pages = []
            if node.on_disk:
                self._drop_disk_copy(node)
        if self.disk is not None:
            self.disk.clear()
        return freed

    # ---- introspection -------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Structure and exact counts of every tier (module docstring)."""
        ps = self.page_size
        evictable = protected = host = disk = 0
        l1_seen: set[int] = set()
        l2_seen: set[int] = set()
        for node in self._all_nodes():
            count = len(node.key) // ps
            assert count > 0 and len(node.key) == count * ps, node
            assert node.parent.children.get(node.key[:ps]) is node, node
            assert has_copy(node), f"{node} is on no tier"
            assert node.lock_ref >= 0 and (node.lock_ref == 0 or node.pages), f"locked {node} is not on L1"
            if node.parent is not self.root:
                assert node.parent.lock_ref >= node.lock_ref, (node.parent, node)
                assert node.parent.pages or not node.pages, f"L1 {node} under a node not on L1"
            if node.pages:
                assert len(node.pages) == count, node
                for page in node.pages:
                    assert page not in l1_seen and self.pool.is_allocated(page), f"L1 page {page}"
                    l1_seen.add(page)
                if node.lock_ref:
                    protected += count
                else:
                    evictable += count
            if node.host_pages:
                assert len(node.host_pages) == count, node
                for slot in node.host_pages:
                    assert slot not in l2_seen and self.host_pool.is_allocated(slot), f"L2 page {slot}"
                    l2_seen.add(slot)
                host += count
            if node.on_disk:
                assert self.l3_on and len(node.hashes) == count, node
                assert all(name in self.disk.pages for name in node.hashes), f"{node}: L3 file missing"
                disk += count
        assert (evictable, protected) == (self.evictable_size, self.protected_size), (
            evictable, protected, self.evictable_size, self.protected_size)
        assert self.pool.num_allocated >= evictable + protected
        assert host == self.host_size == self.host_pool.num_allocated, (host, self.host_size,
                                                                        self.host_pool.num_allocated)
        if self.disk is not None:
            assert disk == self.disk_size == len(self.disk.pages) <= max(self.disk.capacity_pages, 0), (
                disk, self.disk_size, len(self.disk.pages), self.disk.capacity_pages)

    def tier_stats(self) -> dict[str, Any]:
        stats = super().tier_stats()
        ps = self.page_size
        stats.update(l2_pages=self.host_size, l2_tokens=self.host_size * ps, l2_capacity_pages=self.host_pool.num_pages,
                     l3_pages=self.disk_size, l3_tokens=self.disk_size * ps, l3_enabled=self.l3_on,
                     l3_capacity_pages=self.disk.capacity_pages if self.l3_on else 0,
                     write_policy=self.write_policy, **{f"pages_{k}": v for k, v in self.moved.items()})
        return stats

