from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache


def make(num_pages=64, page_size=2, enabled=True):
    pool = PagePool(num_pages)
    return pool, RadixCache(pool, page_size, enabled)


def put(cache, tokens):
    """Insert tokens' full pages as a request would: reuse the matched pages, allocate the rest."""
    ps = cache.page_size
    tokens = tokens[: len(tokens) // ps * ps]
    m = cache.match_prefix(tokens)
    new = cache.pool.allocate(len(tokens) // ps - len(m.pages))
    assert new is not None
    return cache.insert(tokens, m.pages + new), m.pages + new


def tree_pages(cache):
    """{page-aligned cached prefix: the page id holding its last page}, read from the tree itself."""
    out, stack = {}, [(cache.root, ())]
    while stack:
        node, path = stack.pop()
        for child in node.children.values():
            for i, page in enumerate(child.pages):
                out[path + child.key[: (i + 1) * cache.page_size]] = page
            stack.append((child, path + child.key))
    return out


def accounted(pool, cache, outside=0):
    return pool.num_free + cache.evictable_size + cache.protected_size + outside == pool.num_pages


# ---- unit tests ----------------------------------------------------------------------------


def test_multi_turn_extension_reuses_every_cached_page():
    pool, cache = make(page_size=2)
    turn1 = [1, 2, 3, 4, 5, 6]
    assert put(cache, turn1)[0] == 0
    turn2 = turn1 + [7, 8, 9, 10, 11]
    m = cache.match_prefix(turn2[:-1])
    assert m.num_tokens == 6 and len(m.pages) == 3
    cached, pages = put(cache, turn2)
    assert cached == 6 and pages[:3] == m.pages
    assert cache.stats()["total_nodes"] == 2 and cache.stats()["cached_tokens"] == 10
    assert pool.num_allocated == 5 and accounted(pool, cache)
    cache.check_invariants()


def test_branching_edit_reuses_up_to_the_edit_page():
    pool, cache = make(page_size=4)
    a = list(range(16))
    put(cache, a)
    b = a[:10] + [99] * 6  # edit at token 10: pages 0-1 (8 tokens) are still good
    m = cache.match_prefix(b)
    assert m.num_tokens == 8 and m.pages == cache.match_prefix(a).pages[:2]
    assert put(cache, b)[0] == 8
    st_ = cache.stats()
    assert st_["shared_prefix_count"] == 1 and st_["avg_sharing_depth"] == 8.0
    assert st_["total_nodes"] == 3 and st_["cached_tokens"] == 16 + 8
    assert cache.match_prefix(a).num_tokens == 16 and cache.match_prefix(b).num_tokens == 16
    assert accounted(pool, cache)
    cache.check_invariants()


def test_shared_system_prompt():
    pool, cache = make(page_size=2)
    system = [7] * 8
    users = [[1, 2], [3, 4, 5, 6], [8, 9]]
    for u in users:
        put(cache, system + u)
    for u in users:
        assert cache.match_prefix(system + u).num_tokens == len(system) + len(u)
    assert cache.match_prefix(system + [0, 0]).num_tokens == 8
    st_ = cache.stats()
    assert st_["shared_prefix_count"] == 1 and st_["avg_sharing_depth"] == 8.0
    assert st_["cached_tokens"] == 8 + 2 + 4 + 2 == pool.num_allocated * 2
    cache.check_invariants()


def test_page_size_16_partial_pages_not_matched():
    pool, cache = make(page_size=16)
    tokens = list(range(40))
    assert put(cache, tokens)[0] == 0  # only 32 tokens (2 pages) go in
    assert pool.num_allocated == 2
    assert cache.match_prefix(tokens).num_tokens == 32
    assert cache.match_prefix(tokens[:31]).num_tokens == 16
    assert cache.match_prefix(tokens[:15]).num_tokens == 0
    assert cache.match_prefix(tokens[:20] + [0] * 20).num_tokens == 16
    with pytest.raises(AssertionError):
        cache.insert(tokens[:20], pool.allocate(2))  # partial pages are the caller's bug


def test_duplicate_insert_frees_the_duplicate_pages():
    pool, cache = make(page_size=2)
    tokens = [1, 2, 3, 4]
    first = pool.allocate(2)
    assert cache.insert(tokens, first) == 0
    dup = pool.allocate(2)
    assert cache.insert(tokens, dup) == 4
    assert not any(pool.is_allocated(p) for p in dup)
    assert cache.match_prefix(tokens).pages == first
    # Overlap plus extension: the overlapping page goes back, the new one stays.
    more = pool.allocate(3)
    assert cache.insert(tokens + [5, 6], [more[0], first[1], more[1]]) == 4
    assert not pool.is_allocated(more[0]) and pool.is_allocated(more[1])
    pool.free([more[2]])
    assert cache.match_prefix(tokens + [5, 6]).pages == first + [more[1]]
    assert pool.num_allocated == 3 and accounted(pool, cache)
    cache.check_invariants()


def test_insert_inside_a_node_does_not_split_it():
    pool, cache = make(page_size=2)
    put(cache, [1, 2, 3, 4, 5, 6])
    dup = pool.allocate(2)
    assert cache.insert([1, 2, 3, 4], dup) == 4  # no match first, so nothing split the node
    assert cache.stats()["total_nodes"] == 1 and pool.num_allocated == 3


def test_evict_lru_order_and_parent_becomes_leaf():
    pool, cache = make(page_size=2)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    for t in (a, b, c):
        put(cache, t)
    cache.match_prefix(a)  # a is now the most recently used
    assert cache.evict(2) == 2
    assert cache.match_prefix(b).num_tokens == 0
    assert cache.match_prefix(c).num_tokens == 4 and cache.match_prefix(a).num_tokens == 4
    # c is now older than a; a partial request trims c's tail page only.
    assert cache.evict(1) == 1
    assert cache.match_prefix(c).num_tokens == 2 and cache.match_prefix(a).num_tokens == 4
    # A parent whose children all go is evicted too.
    pool, cache = make(page_size=2)
    put(cache, [5, 5, 1, 1])
    put(cache, [5, 5, 2, 2])
    assert cache.evict(10) == 3
    assert cache.stats()["total_nodes"] == 0 and pool.num_free == pool.num_pages
    assert cache.stats()["evictions"] == 3
    cache.check_invariants()


def test_locked_path_survives_evict_and_reset():
    pool, cache = make(page_size=2)
    put(cache, [1, 2, 3, 4, 5, 6])
    put(cache, [9, 9])
    m = cache.match_prefix([1, 2, 3, 4, 0, 0])
    cache.inc_lock_ref(m.last_node)
    assert (cache.protected_size, cache.evictable_size) == (2, 2)
    assert cache.evict(100) == 2  # only [5,6] and [9,9]
    assert cache.match_prefix([1, 2, 3, 4]).pages == m.pages
    put(cache, [7, 7])
    assert cache.reset() == 1
    assert cache.match_prefix([1, 2, 3, 4]).pages == m.pages
    cache.check_invariants()
    cache.dec_lock_ref(m.last_node)
    assert (cache.protected_size, cache.evictable_size) == (0, 2)
    with pytest.raises(AssertionError):
        cache.dec_lock_ref(m.last_node)


def test_splitting_a_locked_node_keeps_both_halves_locked():
    pool, cache = make(page_size=2)
    put(cache, [1, 2, 3, 4, 5, 6])
    held = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.inc_lock_ref(held.last_node)
    short = cache.match_prefix([1, 2, 9, 9])  # splits the locked node after one page
    assert short.num_tokens == 2 and short.last_node.lock_ref == 1
    assert (cache.protected_size, cache.evictable_size) == (3, 0)
    assert cache.evict(10) == 0
    cache.check_invariants()
    cache.dec_lock_ref(held.last_node)
    assert (cache.protected_size, cache.evictable_size) == (0, 3)
    cache.check_invariants()


def test_reset_frees_everything_unlocked():
    pool, cache = make(page_size=1)
    for t in ([1, 2, 3], [1, 2, 4], [5]):
        put(cache, t)
    assert cache.reset() == 5
    assert pool.num_free == pool.num_pages and cache.stats()["total_nodes"] == 0
    assert cache.evictable_size == cache.protected_size == 0


def test_disabled_cache_matches_nothing_and_frees_inserts():
    pool, cache = make(page_size=2, enabled=False)
    pages = pool.allocate(2)
    assert cache.insert([1, 2, 3, 4], pages) == 0
    assert pool.num_free == pool.num_pages
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.pages, m.num_tokens) == ([], 0)
    cache.inc_lock_ref(m.last_node)
    cache.dec_lock_ref(m.last_node)
    assert cache.evict(5) == 0 and cache.reset() == 0
    cache.check_invariants()


# ---- property test against a naive model -----------------------------------------------------


@dataclass
class Req:
    tokens: tuple      # page-aligned sequence it will insert
    matched: tuple     # the prefix it matched and locked
    node: object
    pages: list        # matched pages, then its own new pages (outside the tree until insert)
    num_new: int


tokens_st = st.lists(st.integers(0, 2), max_size=14)


class RadixMachine(RuleBasedStateMachine):
    """Random traffic against a naive model: `model` is the set of cached page-aligned prefixes,
    `content` says which prefix each page id holds KV for."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(6, 40))
    def setup(self, page_size, num_pages):
        self.ps = page_size
        self.pool = PagePool(num_pages)
        self.cache = RadixCache(self.pool, page_size)
        self.model: set[tuple] = set()
        self.content: dict[int, tuple] = {}
        self.reqs: list[Req] = []
        self.seen: list[tuple] = []

    # -- helpers

    def draw_tokens(self, data):
        if self.seen and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.seen))
            base = base[: data.draw(st.integers(0, len(base)))]
            seq = tuple(base) + tuple(data.draw(tokens_st))
        else:
            seq = tuple(data.draw(tokens_st))
        self.seen.append(seq)
        return seq[: len(seq) // self.ps * self.ps]

    def naive_match(self, tokens):
        n = 0
        while n + self.ps <= len(tokens) and tokens[: n + self.ps] in self.model:
            n += self.ps
        return n

    def check_match(self, tokens, m):
        assert m.num_tokens == self.naive_match(tokens) == len(m.pages) * self.ps
        for i, page in enumerate(m.pages):
            assert self.content[page] == tokens[: (i + 1) * self.ps]

    def new_pages(self, n):
        pages = self.pool.allocate(n)
        if pages is None:
            self.do_evict(n - self.pool.num_free)
            pages = self.pool.allocate(n)
        return pages

    def do_evict(self, n):
        before = self.cache.evictable_size
        freed = self.cache.evict(n)
        assert freed == min(n, before)
        after = set(tree_pages(self.cache))
        assert after <= self.model and len(self.model) - len(after) == freed
        self.model = after

    def learn(self, tokens):
        for k in range(self.ps, len(tokens) + 1, self.ps):
            self.model.add(tokens[:k])

    def settle(self, tokens, pages, cached):
        """After insert(tokens, pages): pages before `cached` that the tree did not own are free."""
        tree = tree_pages(self.cache)
        for i, page in enumerate(pages):
            prefix = tokens[: (i + 1) * self.ps]
            if tree[prefix] != page:
                assert i * self.ps < cached and not self.pool.is_allocated(page)
                del self.content[page]

    # -- rules

    @rule(data=st.data())
    def insert_fresh(self, data):
        """Insert without matching first: every already-cached page is a duplicate."""
        tokens = self.draw_tokens(data)
        pages = self.new_pages(len(tokens) // self.ps)
        if pages is None:
            return
        for i, page in enumerate(pages):
            self.content[page] = tokens[: (i + 1) * self.ps]
        expect = self.naive_match(tokens)
        assert self.cache.insert(list(tokens), pages) == expect
        self.learn(tokens)
        self.settle(tokens, pages, expect)

    @rule(data=st.data())
    def match(self, data):
        tokens = self.draw_tokens(data)
        self.check_match(tokens, self.cache.match_prefix(list(tokens)))

    @rule(data=st.data())
    def start_request(self, data):
        tokens = self.draw_tokens(data)
        m = self.cache.match_prefix(list(tokens))
        self.check_match(tokens, m)
        self.cache.inc_lock_ref(m.last_node)
        num_new = (len(tokens) - m.num_tokens) // self.ps
        pages = self.new_pages(num_new)
        if pages is None:
            self.cache.dec_lock_ref(m.last_node)
            return
        for i, page in enumerate(pages):
            self.content[page] = tokens[: m.num_tokens + (i + 1) * self.ps]
        self.reqs.append(Req(tokens, tokens[: m.num_tokens], m.last_node, m.pages + pages, num_new))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), abort=st.booleans())
    def finish_request(self, data, abort):
        req = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        if abort:
            own = req.pages[len(req.pages) - req.num_new:]
            self.pool.free(own)
            for page in own:
                del self.content[page]
        else:
            expect = self.naive_match(req.tokens)
            assert expect >= len(req.matched)
            assert self.cache.insert(list(req.tokens), req.pages) == expect
            self.learn(req.tokens)
            self.settle(req.tokens, req.pages, expect)
        self.cache.dec_lock_ref(req.node)

    @rule(n=st.integers(0, 12))
    def evict(self, n):
        self.do_evict(n)

    @rule()
    def reset(self):
        before = self.cache.evictable_size
        assert self.cache.reset() == before
        self.model = set()
        for req in self.reqs:
            self.learn(req.matched)
        assert set(tree_pages(self.cache)) == self.model

    # -- checks after every step

    @invariant()
    def tree_matches_model(self):
        self.cache.check_invariants()
        outside = sum(r.num_new for r in self.reqs)
        assert accounted(self.pool, self.cache, outside)
        tree = tree_pages(self.cache)
        assert set(tree) == self.model
        for prefix, page in tree.items():
            assert self.content[page] == prefix
        for req in self.reqs:  # locked paths are never evicted nor swapped
            for i, page in enumerate(req.pages[: len(req.matched) // self.ps]):
                assert tree[req.matched[: (i + 1) * self.ps]] == page
        st_ = self.cache.stats()
        assert st_["cached_tokens"] == len(self.model) * self.ps
        assert st_["evictable_pages"] + st_["protected_pages"] == len(self.model)

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for req in self.reqs:
            self.pool.free(req.pages[len(req.pages) - req.num_new:])
            self.cache.dec_lock_ref(req.node)
        self.cache.reset()
        self.cache.check_invariants()
        assert self.pool.num_free == self.pool.num_pages  # nothing leaked
        assert self.cache.protected_size == self.cache.evictable_size == 0


RadixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestRadixMachine = RadixMachine.TestCase
