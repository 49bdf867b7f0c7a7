"""The tiered radix cache (gateway/engine/tiers.py) over FakeBackend pages: every tier's accounting
after every operation, page contents that come back from L2 and L3 exactly as they left L1, and the
scheduler serving a working set larger than L1 with the same output as without tiers.

FakeBackend pages hold the tokens and prefix hashes they were computed under; a page that returns
from a lower tier wrong (another page's, stale, half copied) fails the check here or the fake's
own prefix check when a request reads it.
"""
from __future__ import annotations

import shutil
import tempfile

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from backends.fake import FakeBackend
from backends.sampling_params import SamplingParams
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine.disk_store import DiskStore
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request
from gateway.engine.scheduler import Scheduler
from gateway.engine.tiers import TieredRadixCache

VOCAB = 64


def make_tiered(page_size=2, l1=16, l2=32, disk_dir=None, disk_pages=64, policy="write_through"):
    backend = FakeBackend(VOCAB, page_size, l1, host_pages=l2, context_length=4096)
    pool = PagePool(l1)
    store = backend.kv_store
    disk = None
    if disk_dir is not None:
        disk = DiskStore(disk_dir, store.layout, disk_pages * (store.layout.page_bytes + 4096))
    return backend, TieredRadixCache(pool, page_size, store, disk, policy)


def write_pages(backend: FakeBackend, tokens: list[int], pages: list[int]) -> None:
    """Fill pages with what a model would have written for tokens (page i holds tokens' page i)."""
    ps = backend.page_size
    hashes = backend._prefix_hashes(np.asarray(tokens, dtype=np.int64))
    for i, page in enumerate(pages):
        backend.kv_tokens[page * ps:(page + 1) * ps] = tokens[i * ps:(i + 1) * ps]
        backend.kv_hashes[page * ps:(page + 1) * ps] = hashes[i * ps:(i + 1) * ps]


def check_pages(backend: FakeBackend, tokens: list[int], pages: list[int]) -> None:
    ps = backend.page_size
    hashes = backend._prefix_hashes(np.asarray(tokens, dtype=np.int64))
    for i, page in enumerate(pages):
        assert backend.kv_tokens[page * ps:(page + 1) * ps].tolist() == list(tokens[i * ps:(i + 1) * ps]), (i, page)
        assert (backend.kv_hashes[page * ps:(page + 1) * ps] == hashes[i * ps:(i + 1) * ps]).all(), (i, page)


def put(backend, cache, tokens, hold=False):
    """What a request does: match (loads lower tiers), allocate and compute the rest, insert."""
    ps = cache.page_size
    tokens = list(tokens[: len(tokens) // ps * ps])
    m = cache.match_prefix(tokens)
    check_pages(backend, tokens, m.pages)
    cache.inc_lock_ref(m.last_node)
    need = len(tokens) // ps - len(m.pages)
    if cache.pool.num_free < need:
        cache.evict(need - cache.pool.num_free)
    new = cache.pool.allocate(need)
    if new is None:
        cache.dec_lock_ref(m.last_node)
        return None
    write_pages(backend, tokens, m.pages + new)      # (rewrites matched pages with equal values)
    cache.insert(tokens, m.pages + new)
    cache.dec_lock_ref(m.last_node)
    cache.flush_writes()                          # (the engine loop does it after each step)
    if hold:
        m2 = cache.match_prefix(tokens)
        assert m2.num_tokens == len(tokens)
        cache.inc_lock_ref(m2.last_node)
        return m2.last_node
    return m


def seq(seed, n):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


# ---- unit tests ----------------------------------------------------------------------------


def test_l1_eviction_moves_to_l2_and_a_match_brings_pages_back():
    backend, cache = make_tiered(page_size=2, l1=8, l2=32)
    seqs = [seq(i, 8) for i in range(6)]          # 6 x 4 pages through an 8-page L1
    for s in seqs:
        put(backend, cache, s)
        cache.check_invariants()
    assert cache.tier_stats()["l2_pages"] == 24
    for s in seqs:                                # all of them still cached, on some tier
        m = cache.match_prefix(s)
        assert m.num_tokens == 8, m
        check_pages(backend, s, m.pages)
        cache.check_invariants()
    assert cache.moved["l2_to_l1"] > 0 and cache.moved["l1_to_l2"] == 24


def test_without_tiers_the_same_traffic_loses_what_is_evicted():
    cache = RadixCache(PagePool(8), 2)
    seqs = [seq(i, 8) for i in range(6)]
    for s in seqs:
        m = cache.match_prefix(s)
        need = 4 - len(m.pages)
        cache.evict(max(0, need - cache.pool.num_free))
        cache.insert(s, m.pages + cache.pool.allocate(need))
    assert sum(cache.match_prefix(s).num_tokens for s in seqs) == 16     # only the last two fit


def test_l3_round_trip_and_rebuild_after_restart(tmp_path):
    """L1 -> L2 -> L3 -> (new cache, new backend: a restart) -> L1, contents exact."""
    backend, cache = make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path, policy="write_back")
    seqs = [seq(i, 8) for i in range(8)]
    for s in seqs:
        put(backend, cache, s)
        cache.check_invariants()
    stats = cache.tier_stats()
    assert stats["l3_pages"] > 0 and stats["pages_l2_to_l3"] > 0
    m = cache.match_prefix(seqs[0])                 # the oldest: only on L3 now
    assert m.disk_tokens == 8 and m.num_tokens == 8
    check_pages(backend, seqs[0], m.pages)
    cache.check_invariants()

    # write_through puts everything on disk; a second store of the same layout rebuilds the tree
    backend, cache = make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path / "wt")
    for s in seqs:
        put(backend, cache, s)
    on_disk = cache.tier_stats()["l3_pages"]
    assert on_disk == 32
    backend2, cache2 = make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path / "wt")
    assert cache2.tier_stats()["l3_pages"] == on_disk and cache2.tier_stats()["l1_pages"] == 0
    cache2.check_invariants()
    for s in seqs:
        m = cache2.match_prefix(s)
        assert m.num_tokens == 8, s
        check_pages(backend2, s, m.pages)
        cache2.check_invariants()


def test_branches_split_across_tiers_and_continue():
    backend, cache = make_tiered(page_size=2, l1=10, l2=32)
    base = seq(1, 6)
    a, b = base + seq(2, 4), base + seq(3, 4)
    put(backend, cache, a)
    put(backend, cache, b)
    for i in range(5):
        put(backend, cache, seq(10 + i, 6))
        cache.check_invariants()
    longer = a + seq(4, 4)
    m = cache.match_prefix(longer)
    assert m.num_tokens == 10
    check_pages(backend, longer, m.pages)
    put(backend, cache, longer)
    cache.check_invariants()


def test_a_match_loading_its_path_keeps_the_path_whole():
    """Loading a match's L2 tail can make room on L1 by evicting, whose copy down to a full L2 then
    evicts L2 copies, among them that of a path node the load has just given L1 pages (a locked
    node). Splitting it there would put a new node above it that the match's path does not list, and
    the result would miss a page and shift the others (hypothesis found this with a 3-page L2)."""
    backend, cache = make_tiered(page_size=1, l1=7, l2=3, disk_dir=None, policy="write_through")
    cache.dec_lock_ref(put(backend, cache, [0, 0, 0, 0], hold=True))
    cache.evict(2)                                # [0, 0] on L1 (and L2), the rest on L2
    put(backend, cache, [1, 0, 0, 0, 0, 0, 0])    # fills L1; [0, 0, 0] left only on L2
    m = cache.match_prefix([0, 0, 0, 0])
    assert m.num_tokens == 3 and m.host_tokens == 3, m
    check_pages(backend, [0, 0, 0, 0], m.pages)
    cache.check_invariants()


def test_reset_empties_every_tier_but_what_requests_hold(tmp_path):
    backend, cache = make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path)
    for i in range(6):
        put(backend, cache, seq(i, 8))
    held = put(backend, cache, seq(99, 4), hold=True)
    assert cache.tier_stats()["l3_pages"] > 0
    cache.reset()
    cache.check_invariants()
    stats = cache.tier_stats()
    assert (stats["l2_pages"], stats["l3_pages"], stats["l1_pages"]) == (0, 0, 2)
    assert not list(cache.disk.dir.glob("*.kv"))
    assert cache.match_prefix(seq(0, 8)).num_tokens == 0       # nothing old is served after a clear
    cache.dec_lock_ref(held)
    cache.reset()
    assert cache.tier_stats()["l1_pages"] == 0 and cache.pool.num_free == 8
    # and a new store over the same directory finds nothing to rebuild
    assert make_tiered(page_size=2, l1=8, l2=8, disk_dir=tmp_path)[1].tier_stats()["l3_pages"] == 0


# ---- random traffic, every tier checked after every step ------------------------------------

class TieredMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), l1=st.integers(6, 24), l2=st.integers(1, 24),
                disk_pages=st.one_of(st.none(), st.integers(0, 40)),
                policy=st.sampled_from(["write_through", "write_back"]))
    def setup(self, page_size, l1, l2, disk_pages, policy):
        self.dir = tempfile.mkdtemp() if disk_pages is not None else None
        self.backend, self.cache = make_tiered(page_size, l1, l2, self.dir, disk_pages or 0, policy)
        self.held: list = []
        self.seen: list[list[int]] = []

    def teardown(self):
        if getattr(self, "dir", None):
            shutil.rmtree(self.dir, ignore_errors=True)

    def tokens(self, data):
        if self.seen and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.seen))
            base = base[: data.draw(st.integers(0, len(base)))]
        else:
            base = []
        out = base + data.draw(st.lists(st.integers(0, 7), min_size=0, max_size=12))
        self.seen.append(out)
        return out

    @rule(data=st.data(), hold=st.booleans())
    def request(self, data, hold):
        tokens = self.tokens(data)
        if len(tokens) < self.cache.page_size:
            return
        node = put(self.backend, self.cache, tokens, hold=hold and len(self.held) < 3)
        if hold and len(self.held) < 3 and node is not None:
            self.held.append(node)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        node = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.dec_lock_ref(node)

    @rule(n=st.integers(1, 8))
    def evict(self, n):
        self.cache.evict(n)

    @rule(data=st.data())
    def rematch(self, data):
        if self.seen:
            tokens = data.draw(st.sampled_from(self.seen))
            m = self.cache.match_prefix(tokens)
            check_pages(self.backend, tokens, m.pages)

    @rule()
    def reset(self):
        self.cache.reset()
        assert self.cache.host_size == 0 and self.cache.disk_size == 0

    @invariant()
    def exact(self):
        cache = getattr(self, "cache", None)
        if cache is None:
            return
        cache.check_invariants()
        held_outside = 0        # put() hands every page to the tree
        assert cache.pool.num_free + cache.evictable_size + cache.protected_size + held_outside == cache.pool.num_pages
        assert cache.host_pool.num_free + cache.host_size == cache.host_pool.num_pages
        if cache.disk is not None and cache.l3_on:
            assert len(list(cache.disk.dir.glob("*.kv"))) == cache.disk_size


TestTieredMachine = TieredMachine.TestCase
TestTieredMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---- the scheduler over tiers -------------------------------------------------------------

class Tok:
    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def serve(conversations, rounds, *, tiers: bool, l1=24, l2=96, disk_dir=None):
    """Multi-turn traffic (each round extends its conversation) through a Scheduler; returns the
    outputs and the scheduler (accounting checked after every step)."""
    ps = 4
    backend = FakeBackend(VOCAB, ps, l1, max_sequences=4, context_length=4096, host_pages=l2 if tiers else 0)
    pool = PagePool(l1)
    if tiers:
        disk = DiskStore(disk_dir, backend.kv_store.layout, 1 << 20) if disk_dir else None
        cache = TieredRadixCache(pool, ps, backend.kv_store, disk)
    else:
        cache = RadixCache(pool, ps)
    sched = Scheduler(backend, pool, cache, max_running=2, prefill_chunk_tokens=64, context_length=4096)
    history = {c: seq(100 + c, 13) for c in range(conversations)}
    outputs = []
    for r in range(rounds):
        for c in range(conversations):
            prompt = history[c] + seq(1000 * r + c, 3)
            events = []
            request = Request(id=f"c{c}r{r}", index=0, prompt_ids=prompt, params=SamplingParams(temperature=0.0),
                              max_new_tokens=4, stop_token_ids=frozenset(),
                              detokenizer=IncrementalDetokenizer(Tok(), None), emit=events.append)
            sched.add(request)
            while sched.has_work:
                sched.step()
                cache.flush_writes()
                sched.check_accounting()
                cache.check_invariants()
            outputs.append(request.output_ids)
            history[c] = prompt + request.output_ids
    return outputs, sched


def test_scheduler_working_set_larger_than_l1_hits_more_and_outputs_match(tmp_path):
    with_tiers, on = serve(6, 4, tiers=True, disk_dir=tmp_path)
    without, off = serve(6, 4, tiers=False)
    assert with_tiers == without                 # loaded pages are the pages: same tokens out
    snap_on, snap_off = on.snapshot()["radix_cache_stats"], off.snapshot()["radix_cache_stats"]
    assert snap_on["hit_rate"] >= 2 * snap_off["hit_rate"] > 0, (snap_on["hit_rate"], snap_off["hit_rate"])
    assert snap_on["l2_hit_rate"] > 0
    assert abs(snap_on["l1_hit_rate"] + snap_on["l2_hit_rate"] + snap_on["l3_hit_rate"] - snap_on["hit_rate"]) < 1e-9
