"""Admission policies over the FakeBackend (gateway/engine/admission.py): no head-of-line blocking
behind long prompts, the starvation bound for long prompts, prefix-aware ordering, priority within
the age bound, bounded prefix measurements, and the same outputs and page accounting as fcfs.

Every test runs sync and overlapped (the `overlap` fixture), and the harness of
tests/test_scheduler_fake.py checks page accounting, the radix tree, seq slots and the prefill
budget after every step; FairRun adds the fair policy's own invariants.
"""
from __future__ import annotations

import math

import pytest

from gateway.engine import admission
from gateway.engine.admission import FairPolicy, FcfsPolicy, make_policy, prefill_left
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import RequestState
from tests import test_scheduler_fake as harness
from tests.test_scheduler_fake import Run, alone, tokens

CHUNK = 64             # prefill budget B per step in these tests
LONG = CHUNK // 2      # L: the fair policy's default long share


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def overlap(request):
    """Each test runs with a backend that finishes a step before returning and with one that
    overlaps (as harness.overlap does for tests/test_scheduler_fake.py)."""
    harness.OVERLAP[0] = request.param
    yield request.param
    harness.OVERLAP[0] = False


class FairRun(Run):
    """Run with the fair policy; at every forward it also checks the fair invariants: at most
    LONG_PREFILLS_AT_ONCE long prefills running, long chunks within L in a step that prefills a
    short prompt, and a short prefill left out of a step only when the step's budget B is used up
    (so short prompts get at least B - L of every step)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("chunk", CHUNK)
        super().__init__(policy="fair", **kwargs)
        self.long_tokens = self.sched.policy.long_tokens
        inner = self.backend.check

        def check(batch):
            inner(batch)
            self.check_fair(batch)
        self.backend.check = check

    def check_fair(self, batch) -> None:
        # num_computed already counts this batch: before it, a request had prefill_left + its chunk
        chunk = {r.seq_slot: 0 for r in self.sched.running}
        chunk.update({c.seq_slot: len(c.token_ids) for c in batch.sequences})
        before = {r.seq_slot: prefill_left(r) + chunk[r.seq_slot] for r in self.sched.running}
        longs = [slot for slot, left in before.items() if left > self.long_tokens]
        assert len(longs) <= admission.LONG_PREFILLS_AT_ONCE, longs
        long_tokens = sum(chunk[slot] for slot in longs)
        if any(chunk[slot] > 1 and slot not in longs for slot in chunk):
            assert long_tokens <= self.long_tokens, (long_tokens, self.long_tokens)
        prefill = sum(n for n in chunk.values() if n > 1)
        if any(1 < left <= self.long_tokens and not chunk[slot] for slot, left in before.items()):
            assert prefill == self.sched.prefill_chunk_tokens, (prefill, before, chunk)


def first_token_step(run: Run, request) -> int:
    return next(step for step, event in run.events[id(request)] if event.token_ids)


# ---- no head-of-line blocking ------------------------------------------------------------------------

@pytest.mark.parametrize("num_long", [2, 6])
def test_short_prompt_behind_long_ones_is_served_at_once(num_long, overlap):
    """A short request arriving behind N long prompts is admitted in the next step and has its
    first token in that step (a step later under overlap), whatever N. Under fcfs it waits for a
    long prompt to finish and free a seq slot, or, with slots to spare, for their prefill."""
    waits = {}
    for policy in ("fcfs", "fair"):
        run = Run(policy=policy, max_running=4, chunk=CHUNK) if policy == "fcfs" else FairRun(max_running=4)
        longs = [run.request(tokens(200 + i, 300), max_new=4) for i in range(num_long)]
        short = run.request(tokens(199, 12), max_new=4)
        admitted = None
        run.add(*longs)
        run.step()
        run.step()
        run.add(short)                  # queued after step 2: behind every long prompt
        while short.state is not RequestState.FINISHED:
            run.step()
            if admitted is None and short.state is RequestState.RUNNING:
                admitted = run.steps
        run.run()
        waits[policy] = (admitted - 2, first_token_step(run, short) - 2)
        for request in longs + [short]:
            assert run.result(request) == alone(request.prompt_ids, max_new=4)
    assert waits["fair"] == (1, 1 + overlap)
    if num_long >= 4:              # every seq slot holds a long prompt under fcfs
        assert waits["fcfs"][0] >= math.ceil(300 / CHUNK)
    else:                          # admitted at once, but its prefill comes after what is left of theirs
        assert waits["fcfs"][1] >= (num_long * 300 - 2 * CHUNK) // CHUNK


def test_long_prompt_completes_within_its_bound_under_a_stream_of_shorts(overlap):
    """Two short prompts a step (more than their B - L share: they queue) cannot hold back a long
    prompt: it prefills L tokens every step, its last L as a short prompt, so its first token comes
    within ceil(U / L) steps of its arrival (a step more under overlap)."""
    run = FairRun(max_running=24, num_pages=1024)
    long_prompt = run.request(tokens(300, 400), max_new=4)
    shorts = [run.request(tokens(301 + i, 24), max_new=3) for i in range(80)]
    arrivals = {step: shorts[2 * step:2 * step + 2] for step in range(40)}
    arrivals[0] = [long_prompt] + arrivals[0]
    run.run(arrivals)
    assert first_token_step(run, long_prompt) <= math.ceil(400 / LONG) + overlap
    for request in [long_prompt] + shorts[::9]:
        assert run.result(request) == alone(request.prompt_ids, max_new=request.max_new_tokens)


def test_without_short_prompts_a_long_one_prefills_as_under_fcfs(overlap):
    """The cap only makes room for short prompts: beside decoding streams alone a long prompt takes
    the whole budget, and has its first token in the same step as under fcfs."""
    firsts = []
    for run in (Run(policy="fcfs", chunk=CHUNK), FairRun()):
        streams = [run.request(tokens(311 + i, 6), max_new=30) for i in range(3)]
        request = run.request(tokens(310, 300), max_new=3)
        run.run({0: streams, 2: [request]})
        firsts.append(first_token_step(run, request))
        assert run.result(request) == alone(request.prompt_ids, max_new=3)
    assert firsts[0] == firsts[1] == 2 + math.ceil(300 / CHUNK) + overlap


def test_long_prompts_prefill_one_at_a_time_in_arrival_order(overlap):
    run = FairRun(max_running=8)
    longs = [run.request(tokens(320 + i, 200), max_new=2) for i in range(4)]
    run.run({0: longs})
    firsts = [first_token_step(run, r) for r in longs]
    assert firsts == sorted(firsts) and len(set(firsts)) == 4
    # once it heads its class each needs at most ceil(U / L) steps (at least L tokens a step)
    assert firsts[-1] <= 4 * math.ceil(200 / LONG) + overlap


# ---- prefix-aware ordering, priority and the age bound ------------------------------------------------

def test_prefix_aware_order_raises_cached_tokens(overlap):
    """A pool that holds one 48-token prefix besides the running request; the queue alternates
    between the prefix in the cache and another. fcfs evicts each prefix just before it is needed
    again; fair serves the cached prefix's requests first, then the other's."""
    cached, other = tokens(400, 48), tokens(401, 48)
    results = {}
    for policy in ("fcfs", "fair"):
        run = Run(policy=policy, num_pages=20, max_running=1, chunk=CHUNK, context=64)
        warm = run.add(run.request(cached + [1, 2], max_new=2))    # (kept: Run logs events by id())
        run.run()
        queue = [run.request((other if i % 2 == 0 else cached) + tokens(402 + i, 4), max_new=4) for i in range(8)]
        before = run.sched.stats.cached_prompt_tokens
        run.run({run.steps: queue})
        results[policy] = run.sched.stats.cached_prompt_tokens - before
        for request in queue + [warm]:
            assert run.result(request) == alone(request.prompt_ids, max_new=request.max_new_tokens)
    # fair: every request but the first of `other` finds its whole 48-token prefix
    assert results["fair"] == 7 * 48
    assert results["fair"] > 1.5 * results["fcfs"], results


def test_priority_orders_the_queue_within_the_age_bound(overlap):
    """One seq slot, a low-priority request and a stream of high-priority ones: the high ones go
    first, until the low one has waited max_wait_steps; then it is admitted as soon as the slot is
    free. Without the bound (a huge one) it waits for the whole stream."""
    admitted_at = {}
    for bound in (6, 10_000):
        run = FairRun(max_running=1, max_wait_steps=bound)
        low = run.request(tokens(500, 8), max_new=2, priority=5)
        highs = [run.request(tokens(501 + i, 8), max_new=2, priority=-1) for i in range(30)]
        arrivals = {0: [low, highs[0]], **{step: [highs[step]] for step in range(1, 30)}}
        steps_running = {}
        while arrivals or run.sched.has_work:
            run.add(*arrivals.pop(run.steps, []))
            run.step()
            for request in [low] + highs:
                if request.state is not RequestState.WAITING:
                    steps_running.setdefault(id(request), run.steps)
        admitted_at[bound] = steps_running[id(low)]
        assert steps_running[id(highs[0])] == 1          # priority: the later, higher one went first
        assert run.result(low) == alone(low.prompt_ids, max_new=2)
    # aged at step 6; the slot frees within one request's lifetime (2 tokens, +1 step overlapped)
    assert admitted_at[6] <= 6 + 3 + overlap
    assert admitted_at[10_000] > 30


def test_fcfs_ignores_priority():
    run = Run(policy="fcfs", max_running=1)
    low = run.request(tokens(510, 8), max_new=2, priority=5)
    high = run.request(tokens(511, 8), max_new=2, priority=-5)
    run.add(low, high)
    run.step()
    assert low.state is RequestState.RUNNING and high.state is RequestState.WAITING
    run.run()


def test_prefix_measurements_are_bounded_per_step(overlap):
    """A long queue is measured PROBES_PER_STEP requests a step (new ones first, then the least
    recently measured), never all of it every step."""
    run = FairRun(max_running=1)
    calls = []
    measure = run.cache.cached_prefix_len
    run.cache.cached_prefix_len = lambda ids: calls.append(run.steps) or measure(ids)
    queue = [run.request(tokens(600 + i, 10), max_new=1) for i in range(100)]
    run.add(*queue)
    for _ in range(8):
        run.step()
    per_step = [calls.count(step) for step in range(1, 9)]
    assert max(per_step) == admission.PROBES_PER_STEP and sum(per_step) == run.sched.policy.probes
    # measured only in steps that can admit (the slot is free every step, every other one overlapped),
    # the never measured first: after ceil(100 / PROBES_PER_STEP) such steps every one has been
    assert all(r.measured_step >= 0 for r in queue if r.state is RequestState.WAITING)
    run.run()


def test_cached_prefix_len_matches_match_prefix_and_changes_nothing():
    pool = PagePool(64)
    cache = RadixCache(pool, page_size=4)
    base = tokens(700, 40)
    for variant in (base, base[:24] + tokens(701, 16), base[:8] + tokens(702, 20), tokens(703, 12)):
        pages = pool.allocate(len(variant) // 4)
        cache.insert(variant[:len(variant) // 4 * 4], pages)
    queries = [base, base[:30], base[:24] + tokens(704, 9), base[:9], tokens(705, 20), [], base[:3],
               base[:24] + tokens(701, 16)[:6]]
    state = [(n.id, n.key, n.last_access_time, n.lock_ref) for n in cache._all_nodes()]
    measured = [cache.cached_prefix_len(q) for q in queries]
    assert [(n.id, n.key, n.last_access_time, n.lock_ref) for n in cache._all_nodes()] == state
    assert measured == [cache.match_prefix(q).num_tokens for q in queries]
    assert measured[:4] == [40, 28, 24, 8]
    cache.check_invariants()
    assert RadixCache(PagePool(4), 4, enabled=False).cached_prefix_len(base) == 0


# ---- same outputs, same accounting --------------------------------------------------------------------

def test_fair_gives_every_request_what_it_gets_alone_under_page_pressure(overlap):
    """Long and short prompts, shared prefixes, priorities, preemption: tokens as alone, pages exact."""
    shared = tokens(800, 16)
    specs = [(shared + tokens(801, 90), 10, 0), (tokens(802, 9), 12, 0), (shared + tokens(803, 4), 8, -1),
             (tokens(804, 120), 6, 3), (shared + tokens(805, 30), 9, 0), (tokens(806, 5), 14, -2)]
    run = FairRun(num_pages=40, context=160, max_running=4, chunk=32)      # 40 pages: 160 tokens
    requests = [run.request(p, max_new=m, priority=pr) for p, m, pr in specs]
    run.run({0: requests[:2], 1: requests[2:4], 3: requests[4:]})
    for request, (prompt, max_new, _) in zip(requests, specs, strict=True):
        assert run.result(request) == alone(prompt, max_new=max_new)
    assert run.sched.stats.preemptions > 0


def test_make_policy_chooses_once():
    cache = RadixCache(PagePool(8), 4)
    assert isinstance(make_policy("fcfs", cache, prefill_chunk_tokens=512, long_prefill_tokens=None,
                                  max_wait_steps=64), FcfsPolicy)
    fair = make_policy("fair", cache, prefill_chunk_tokens=512, long_prefill_tokens=None, max_wait_steps=64)
    assert isinstance(fair, FairPolicy) and fair.long_tokens == 256 and fair.max_wait_steps == 64
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        make_policy("lpm", cache, prefill_chunk_tokens=512, long_prefill_tokens=None, max_wait_steps=64)
    with pytest.raises(AssertionError, match="below prefill_chunk_tokens"):
        make_policy("fair", cache, prefill_chunk_tokens=512, long_prefill_tokens=512, max_wait_steps=64)
