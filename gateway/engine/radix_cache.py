"""RadixAttention prefix cache: a radix tree over token ids whose nodes own KV page ids.

Matching is page aligned: every node key is a whole number of pages, so a cached prefix always
ends on a page boundary and its pages can be shared as they are. A page's KV depends on every
token before it, so a page id stands for its node's path from the root, not just its own tokens.

Accounting (the scheduler asserts it):
    pool.num_free + evictable_size + protected_size + pages held outside the tree == pool.num_pages
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.page_pool import PagePool

_node_ids = itertools.count()


class TreeNode:
    """A run of whole pages. `pages` are its L1 (device) page ids; with tiers (gateway/engine/tiers.py)
    also `host_pages` (L2 slots), `on_disk` (L3 files named by `hashes`), and `pages` is empty while
    the node is not on L1."""

    __slots__ = ("id", "children", "parent", "key", "pages", "lock_ref", "last_access_time",
                 "host_pages", "on_disk", "hashes")

    def __init__(self, key: tuple[int, ...] = (), pages: list[int] | None = None,
                 parent: TreeNode | None = None, lock_ref: int = 0, last_access_time: int = 0):
        self.id = next(_node_ids)  # heap tie-break: nodes themselves do not compare
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.key = key
        self.pages: list[int] = pages if pages is not None else []
        self.lock_ref = lock_ref
        self.last_access_time = last_access_time
        self.host_pages: list[int] = []
        self.on_disk = False
        self.hashes: list[bytes] | None = None   # per page: the hash chained over its prefix (L3 names)

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, tokens={len(self.key)}, pages={self.pages}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0
    last_node: TreeNode | None = None
    host_tokens: int = 0          # of num_tokens, loaded back from L2 (tiers) for this match
    disk_tokens: int = 0          # of num_tokens, loaded back from L3
    load: Any = None              # a PageCopy to wait for before the pages are read (None: none)


class RadixCache:
    def __init__(self, pool: PagePool, page_size: int, enabled: bool = True):
        assert page_size >= 1, page_size
        self.pool = pool
        self.page_size = page_size
        self.enabled = enabled
        self.evictions = 0
        # A logical clock, not wall time: ties (and thus LRU order) stay deterministic.
        self._clock = itertools.count(1)
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = TreeNode()
        self.evictable_size = 0  # pages in nodes with lock_ref == 0
        self.protected_size = 0  # pages in nodes some request holds

    # ---- lookup and insert ----------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Longest cached page-aligned prefix of token_ids, its pages, and the node it ends in."""
        if not self.enabled:
            return MatchResult([], 0, self.root)
        path = self._walk(token_ids)
        pages = [page for node in path for page in node.pages]
        return MatchResult(pages, sum(len(node.key) for node in path), path[-1] if path else self.root)

    def _walk(self, token_ids: list[int]) -> list[TreeNode]:
        """The nodes of the longest cached page-aligned prefix of token_ids, top down, each marked
        accessed now; a node matched in part is split so the path ends exactly where the match does."""
        ps = self.page_size
        tokens = tuple(token_ids[: len(token_ids) // ps * ps])
        now = next(self._clock)
        node, pos, path = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            child.last_access_time = now
            m = self._match_len(child.key, tokens[pos:])
            if m < len(child.key):
                child = self._split_node(child, m)
            path.append(child)
            pos += m
            node = child
        return path

    def cached_prefix_len(self, token_ids: list[int]) -> int:
        """match_prefix(token_ids).num_tokens, read-only (no split, no access time): the scheduler
        measures waiting requests with it, and a look must not reorder the LRU or the tree."""
        if not self.enabled:
            return 0
        ps = self.page_size
        tokens = tuple(token_ids[: len(token_ids) // ps * ps])
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            key = child.key
            if tokens[pos:pos + len(key)] != key:       # the match ends inside child: count its pages
                end = ps
                while end < len(key) and tokens[pos + end:pos + end + ps] == key[end:end + ps]:
                    end += ps
                return pos + end
            node, pos = child, pos + len(key)
        return pos

    def insert(self, token_ids: list[int], pages: list[int]) -> int:
        """Hand token_ids' full pages to the cache; returns how many leading tokens were cached.

        Every page passed in belongs to the cache afterwards: pages for tokens already in the
        tree are freed unless they are the tree's own page ids, the rest go into a new leaf.
        """
        ps = self.page_size
        assert len(token_ids) == len(pages) * ps, (len(token_ids), len(pages), ps)
        if not self.enabled:
            self.pool.free(pages)
            return 0
        tokens = tuple(token_ids)
        now = next(self._clock)
        node, pos, duplicates = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                leaf = TreeNode(tokens[pos:], list(pages[pos // ps:]), node, 0, now)
                node.children[tokens[pos:pos + ps]] = leaf
                self.evictable_size += len(leaf.pages)
                break
            child.last_access_time = now
            m = self._match_len(child.key, tokens[pos:])
            if m < len(child.key) and pos + m < len(tokens):
                child = self._split_node(child, m)  # the rest of tokens branches off here
            for ours, theirs in zip(child.pages[:m // ps], pages[pos // ps:(pos + m) // ps], strict=True):
                if ours != theirs:
                    duplicates.append(theirs)
            pos += m
            node = child
        self.pool.free(duplicates)
        return pos

    def _match_len(self, key: tuple[int, ...], tokens: tuple[int, ...]) -> int:
        """Tokens shared at the start of key and tokens, rounded down to whole pages."""
        n = min(len(key), len(tokens))
        i = 0
        while i < n and key[i] == tokens[i]:
            i += 1
        return i - i % self.page_size

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut child after split_len tokens; returns the new upper half (child keeps the rest)."""
        ps = self.page_size
        assert 0 < split_len < len(child.key) and split_len % ps == 0, (split_len, len(child.key))
        # Every lock on child also covers the upper half, so it inherits child's lock_ref;
        # pages only move between nodes of the same lock state, so the sizes stay exact.
        upper = TreeNode(child.key[:split_len], child.pages[:split_len // ps], child.parent,
                         child.lock_ref, child.last_access_time)
        child.parent.children[child.key[:ps]] = upper
        child.key = child.key[split_len:]
        child.pages = child.pages[split_len // ps:]
        child.parent = upper
        upper.children[child.key[:ps]] = child
        return upper

    # ---- locking --------------------------------------------------------------------------

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction (a running request reads them)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.pages)
                self.protected_size += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, f"lock_ref would go negative on {node}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_size -= len(node.pages)
                self.evictable_size += len(node.pages)
            node = node.parent

    # ---- eviction -------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages pages from unlocked leaves, least recently used first."""
        leaves = [(n.last_access_time, n.id, n) for n in self._all_nodes()
                  if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            _, _, node = heapq.heappop(leaves)
            want = num_pages - freed
            if want < len(node.pages):
                # Trim the leaf's tail only: its head stays useful and keeps its key in the parent.
                gone = node.pages[-want:]
                node.pages = node.pages[:-want]
                node.key = node.key[:-want * self.page_size]
            else:
                gone = node.pages
                parent = node.parent
                del parent.children[node.key[:self.page_size]]
                if parent is not self.root and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(leaves, (parent.last_access_time, parent.id, parent))
            self.pool.free(gone)
            self.evictable_size -= len(gone)
            freed += len(gone)
        self.evictions += freed
        return freed

    def flush_writes(self) -> None:
        """Deferred copies to lower tiers (gateway/engine/tiers.py); none here."""

    def reset(self) -> int:
        """Drop every node no request holds; returns pages freed."""
        freed = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.lock_ref > 0:
                    stack.append(child)
                    continue
                # Locks cover ancestors, so everything under an unlocked node is unlocked too.
                del node.children[first]
                gone = [p for n in self._all_nodes(child) for p in n.pages]
                self.pool.free(gone)
                self.evictable_size -= len(gone)
                freed += len(gone)
        return freed

    # ---- introspection --------------------------------------------------------------------

    def _all_nodes(self, start: TreeNode | None = None) -> list[TreeNode]:
        """start (default: every node but the root) and all nodes below it."""
        stack = [start] if start is not None else list(self.root.children.values())
        out = []
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_invariants(self) -> None:
        """Walk the tree and assert the counters and structure are exact (for tests and debug)."""
        ps = self.page_size
        evictable = protected = 0
        seen: set[int] = set()
        for node in self._all_nodes():
            assert len(node.key) > 0 and len(node.key) == len(node.pages) * ps, node
            assert node.parent.children.get(node.key[:ps]) is node, node
            assert node.lock_ref >= 0, node
            if node.parent is not self.root:
                assert node.parent.lock_ref >= node.lock_ref, (node.parent, node)
            for page in node.pages:
                assert page not in seen, f"page {page} appears twice in the tree"
                assert self.pool.is_allocated(page), f"page {page} in tree but free in pool"
                seen.add(page)
            if node.lock_ref > 0:
                protected += len(node.pages)
            else:
                evictable += len(node.pages)
        assert (evictable, protected) == (self.evictable_size, self.protected_size), (
            evictable, protected, self.evictable_size, self.protected_size)
        assert self.pool.num_allocated >= evictable + protected

    def stats(self) -> dict[str, Any]:
        nodes = self._all_nodes()
        depths = []
        for node in nodes:
            if len(node.children) >= 2:
                depth, n = 0, node
                while n is not self.root:
                    depth += len(n.key)
                    n = n.parent
                depths.append(depth)
        return {
            "total_nodes": len(nodes),
            "cached_tokens": sum(len(n.key) for n in nodes),
            "shared_prefix_count": len(depths),
            "avg_sharing_depth": sum(depths) / len(depths) if depths else 0.0,
            "evictions": self.evictions,
            "evictable_pages": self.evictable_size,
            "protected_pages": self.protected_size,
            **self.tier_stats(),
        }

    def tier_stats(self) -> dict[str, int]:
        """Pages and tokens cached per tier (here L1 only; gateway/engine/tiers.py adds L2 and L3)."""
        l1 = self.evictable_size + self.protected_size
        return {"l1_pages": l1, "l1_tokens": l1 * self.page_size, "l2_pages": 0, "l2_tokens": 0,
                "l3_pages": 0, "l3_tokens": 0}
