"""The L3 side of TieredRadixCache (gateway/engine/tiers.py): page files under a DiskStore.

Reading a node's files back into host pages (checksums verified), writing host pages out, the
content hashes that name a node's files, L3 eviction, turning L3 off after a failed write, and
rebuilding the tree from the files at start-up. A mixin over TieredRadixCache's state (its tree,
host pool, KV store and disk); the policies and the accounting are tiers.py's.
"""
from __future__ import annotations

import logging
from collections import defaultdict

from gateway.engine.disk_store import ROOT_HASH, PageFile, page_hash
from gateway.engine.radix_cache import TreeNode

log = logging.getLogger("radixgate.cache")


def has_copy(node: TreeNode) -> bool:
    return bool(node.pages or node.host_pages or node.on_disk)


class DiskTier:
    """L3 methods of TieredRadixCache."""

    def _disk_to_host(self, node: TreeNode) -> str:
        """Read node's L3 files into fresh L2 pages: ok | full (no L2 room) | bad (a file failed)."""
        slots = self._take_host(len(node.key) // self.page_size)
        if slots is None:
            return "full"
        for slot, name in zip(slots, self._hashes(node), strict=True):
            data = self.disk.read(name)
            if data is None:
                self.host_pool.free(slots)
                return "bad"
            self.kv_store.write_host_page(slot, data)
        node.host_pages = slots
        self.host_size += len(slots)
        return "ok"

    def _l3_evictable(self, node: TreeNode) -> bool:
        return node.on_disk and not (node.lock_ref and not node.pages) and (
            bool(node.pages or node.host_pages) or not node.children)

    def _evict_disk(self, num_pages: int) -> int:
        return self._evict_tier(num_pages, self._l3_evictable, self._l3_down)

    def _l3_down(self, node: TreeNode) -> None:
        self._drop_disk_copy(node)
        if not has_copy(node):
            self._remove_subtree(node)

    def _host_to_disk(self, node: TreeNode) -> bool:
        """Write node's L2 pages to L3 files (evicting L3 LRU for room); False when it could not."""
        count = len(node.host_pages)
        if count > self.disk.capacity_pages:
            return False
        if len(self.disk.pages) + count > self.disk.capacity_pages:
            self._evict_disk(len(self.disk.pages) + count - self.disk.capacity_pages)
        if not self.l3_on or len(self.disk.pages) + count > self.disk.capacity_pages or node.parent is None:
            return False
        names = self._hashes(node)
        parent = ROOT_HASH if node.parent is self.root else node.parent.hashes[-1]
        ps = self.page_size
        for i, (slot, name) in enumerate(zip(node.host_pages, names, strict=True)):
            page = PageFile(name, parent, node.key[i * ps:(i + 1) * ps])
            if not self.disk.write(page, self.kv_store.read_host_page(slot)):
                for written in names[:i]:
                    self.disk.delete(written)
                self._disable_disk()
                return False
            parent = name
        node.on_disk = True
        self.disk_size += count
        self.moved["l2_to_l3"] += count
        return True

    def _hashes(self, node: TreeNode) -> list[bytes]:
        """node's page names (hashes chained from the root), computed once per node and kept."""
        chain, n = [], node
        while n is not self.root and n.hashes is None:
            chain.append(n)
            n = n.parent
        previous = ROOT_HASH if n is self.root else n.hashes[-1]
        ps = self.page_size
        for n in reversed(chain):
            names = []
            for i in range(0, len(n.key), ps):
                previous = page_hash(previous, n.key[i:i + ps])
                names.append(previous)
            n.hashes = names
        return node.hashes

    def _drop_disk_copy(self, node: TreeNode) -> None:
        for name in node.hashes:
            self.disk.delete(name)
        self.disk_size -= len(node.hashes)
        node.on_disk = False

    def _disable_disk(self) -> None:
        """L3 turned itself off (a write failed): forget every disk copy; nodes left without a
        copy go at the next sweep."""
        for node in self._all_nodes():
            if node.on_disk:
                node.on_disk = False
                self.disk_size -= len(node.hashes)
        assert self.disk_size == 0, self.disk_size
        self.pending_writes.clear()
        self._sweep_needed = True

    def _sweep(self) -> None:
        """After L3 turned off: remove the nodes it left without a copy (at the end of each call
        from outside, when no eviction loop holds nodes)."""
        if not self._sweep_needed:
            return
        self._sweep_needed = False
        for node in self._all_nodes():
            if node.parent is not None and not has_copy(node) and node.lock_ref == 0:
                self._remove_subtree(node)

    def _rebuild_from_disk(self) -> None:
        """The tree of every valid page file, at start-up: disk-only nodes, least recent of all.
        Single-child chains of files become one node; files whose parent is missing are deleted."""
        files = [f for f in self.disk.scan() if len(f.tokens) == self.page_size]
        children: dict[bytes, list[PageFile]] = defaultdict(list)
        for f in files:
            children[f.parent_hash].append(f)
        stack = [(self.root, ROOT_HASH)]
        while stack:
            parent, name = stack.pop()
            for f in children.get(name, []):
                key, names = list(f.tokens), [f.page_hash]
                while len(children.get(names[-1], [])) == 1:
                    nxt = children[names[-1]][0]
                    key += nxt.tokens
                    names.append(nxt.page_hash)
                node = TreeNode(tuple(key), [], parent, 0, 0)
                node.on_disk, node.hashes = True, names
                if node.key[:self.page_size] in parent.children:
                    continue                 # (two files claim one place: both headers cannot be right)
                parent.children[node.key[:self.page_size]] = node
                for n in names:
                    self.disk.adopt(n)
                self.disk_size += len(names)
                stack.append((node, names[-1]))
        orphans = [f.page_hash for f in files if f.page_hash not in self.disk.pages]
        for name in orphans:
            self.disk.pages.add(name)
            self.disk.delete(name)
        if self.disk_size > self.disk.capacity_pages:
            self._evict_disk(self.disk_size - self.disk.capacity_pages)
        log.info("KV disk tier: %d pages (%d tokens) found in %s%s", self.disk_size, self.disk_size * self.page_size,
                 self.disk.dir, f"; {len(orphans)} orphan files deleted" if orphans else "")
