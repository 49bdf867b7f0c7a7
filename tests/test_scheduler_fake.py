"""The scheduler driven step by step over backends/fake.py: batching, chunking, radix reuse,
preemption, cancellation, n>1, seeds, stops, seq slots and the error path, in milliseconds.

The fake backend keeps every sequence's tokens (and the prefix hash they were computed under) in
its KV pages and computes logits from what it reads back through each chunk's page table, so a
wrong table, a reused page or a bad radix hit changes the output or fails loudly. Its logits
depend only on a sequence's tokens: every request must get, token for token, what it gets alone.
After every step the page accounting, the radix tree, the seq slots and the prefill budget are
checked.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends.base import ForwardBatch, SampleSpec, SequenceChunk
from backends.fake import FakeBackend
from backends.sampling_params import SamplingParams, draw_uniform
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine.admission import make_policy
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request, RequestState, TokenEvent
from gateway.engine.scheduler import Scheduler

VOCAB = 64
GREEDY = SamplingParams(temperature=0.0)
_arrival = itertools.count()     # explicit arrival times: preemption order is deterministic


OVERLAP = [False]      # set per test by the `overlap` fixture: every test runs both ways


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def overlap(request):
    """Each test runs with a backend that finishes a step before returning (CPU) and with one that
    overlaps (the scheduler builds step N+1 before taking in step N's draws, as on a GPU)."""
    OVERLAP[0] = request.param
    yield request.param
    OVERLAP[0] = False


class Tok:
    """Just enough tokenizer for IncrementalDetokenizer: id 7 decodes to "<7>"."""

    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


class RecordingFake(FakeBackend):
    """FakeBackend that remembers the shape of every batch and lets the test look at it first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[tuple[int, bool, int, int]]] = []   # (new tokens, samples, slot, epoch)
        self.check = None

    def forward(self, batch: ForwardBatch):
        if self.check is not None:
            self.check(batch)
        self.batches.append([(len(c.token_ids), c.sample is not None, c.seq_slot, c.table_epoch)
                             for c in batch.sequences])
        return super().forward(batch)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


class Run:
    """A Scheduler over a RecordingFake, stepped by hand, every invariant checked after each step."""

    def __init__(self, *, page_size=4, num_pages=512, max_running=8, chunk=64, context=512, radix=True,
                 policy="fcfs", long_prefill_tokens=None, max_wait_steps=64):
        self.backend = RecordingFake(VOCAB, page_size, num_pages, max_sequences=max_running,
                                     context_length=context, overlap=OVERLAP[0])
        self.pool = PagePool(num_pages)
        self.cache = RadixCache(self.pool, page_size, enabled=radix)
        self.sched = Scheduler(self.backend, self.pool, self.cache, max_running=max_running,
                               prefill_chunk_tokens=chunk, context_length=context,
                               policy=make_policy(policy, self.cache, prefill_chunk_tokens=chunk,
                                                  long_prefill_tokens=long_prefill_tokens,
                                                  max_wait_steps=max_wait_steps))
        self.events: dict[int, list[tuple[int, TokenEvent]]] = {}
        self.slots_seen: set[int] = set()
        self.steps = 0
        self.backend.check = self.check_batch

    def check_batch(self, batch: ForwardBatch) -> None:
        """At forward time: each chunk is a running request's, in its slot, with its table; the
        pages requests hold outside the tree are allocated and held by one request only."""
        by_slot = {r.seq_slot: r for r in self.sched.running}
        for c in batch.sequences:
            request = by_slot.get(c.seq_slot)
            assert request is not None and request.state is RequestState.RUNNING, f"slot {c.seq_slot} not running"
            assert list(c.page_table) == request.page_table and c.table_epoch == request.table_epoch
            assert c.end_position == request.num_computed     # counted as computed once launched
        owned = [p for r in self.sched.running for p in r.page_table[r.tree_pages:]]
        assert len(set(owned)) == len(owned) and all(self.pool.is_allocated(p) for p in owned)

    def request(self, prompt, *, max_new=8, params=GREEDY, stop_ids=(), stop=None, index=0, wait_for=None,
                rid=None, priority=0) -> Request:
        arrival = next(_arrival)
        request = Request(id=rid or f"r{arrival}", index=index, prompt_ids=list(prompt), params=params,
                          max_new_tokens=max_new, stop_token_ids=frozenset(stop_ids),
                          detokenizer=IncrementalDetokenizer(Tok(), stop), emit=None, wait_for=wait_for,
                          arrival_s=float(arrival), priority=priority)
        log = self.events.setdefault(id(request), [])
        request.emit = lambda event: log.append((self.steps, event))
        return request

    def add(self, *requests: Request) -> Request | None:
        for request in requests:
            self.sched.add(request)
        return requests[0] if requests else None

    def step(self) -> None:
        self.steps += 1
        self.sched.step()
        sched = self.sched
        sched.check_accounting()
        self.cache.check_invariants()
        slots = [r.seq_slot for r in sched.running]
        assert len(slots) <= sched.max_running
        assert sorted(slots + sched.free_slots) == list(range(sched.max_running)), (slots, sched.free_slots)
        assert all(r.seq_slot == -1 and r.lock_node is None and not r.page_table for r in sched.waiting)
        self.slots_seen.update(slots)
        if self.backend.batches:
            prefill = sum(n for n, *_ in self.backend.batches[-1] if n > 1)
            assert prefill <= sched.prefill_chunk_tokens

    def run(self, arrivals: dict[int, list[Request]] | None = None, max_steps: int = 3000) -> None:
        """Step until idle; arrivals[k] are added before step k + 1."""
        arrivals = dict(arrivals or {})
        while arrivals or self.sched.has_work:
            self.add(*arrivals.pop(self.steps, []))
            assert self.steps < max_steps, "the scheduler does not make progress"
            self.step()
        self.check_idle()

    def check_idle(self) -> None:
        """No request left: every page is free or evictable cache, every slot free."""
        assert not self.sched.has_work
        assert self.cache.protected_size == 0
        assert self.pool.num_free + self.cache.evictable_size == self.pool.num_pages
        assert sorted(self.sched.free_slots) == list(range(self.sched.max_running))

    def result(self, request: Request) -> tuple[list[int], str]:
        """The request's tokens and finish reason, after checking its event stream is coherent."""
        events = [event for _, event in self.events[id(request)]]
        assert events and events[-1].finish_reason is not None
        assert all(e.finish_reason is None for e in events[:-1]), "events after the finish"
        streamed = [t for e in events for t in e.token_ids]
        assert streamed == request.output_ids
        last = events[-1]
        assert (last.prompt_tokens, last.completion_tokens) == (len(request.prompt_ids), len(request.output_ids))
        if not request.detokenizer.stopped:
            assert "".join(e.text for e in events) == Tok().decode(request.output_ids)
        assert request.state is RequestState.FINISHED and request.finish_reason == last.finish_reason
        return request.output_ids, last.finish_reason

    def last_event(self, request: Request) -> TokenEvent:
        return self.events[id(request)][-1][1]


def alone(prompt, **kwargs) -> tuple[list[int], str]:
    """What a request gets with the scheduler to itself (plenty of pages, one big chunk)."""
    run = Run(chunk=4096)
    request = run.add(run.request(prompt, **kwargs))
    run.run()
    return run.result(request)


# ---- the fake itself ---------------------------------------------------------------------------

def chunk(ids, start, table, slot=0, epoch=1, sample=True):
    spec = SampleSpec(GREEDY, 0.5) if sample else None
    return SequenceChunk(list(ids), start, list(table), slot, epoch, spec)


def test_fake_backend_reads_its_pages_and_fails_loudly_on_bad_tables():
    fake = FakeBackend(VOCAB, page_size=4, num_pages=8, max_sequences=4, context_length=64)
    prompt = tokens(1, 9)
    cold = FakeBackend(VOCAB, 4, 8, 4, 64).forward(
        ForwardBatch([chunk(prompt, 0, [5, 6, 7])], return_logits=True))
    fake.forward(ForwardBatch([chunk(prompt[:8], 0, [0, 1], sample=False)]))
    warm = fake.forward(ForwardBatch([chunk(prompt[8:], 8, [0, 1, 2], slot=1, epoch=2)], return_logits=True))
    assert warm.tokens == cold.tokens and np.array_equal(warm.logits, cold.logits)   # cached == cold
    assert (fake.steps, fake.tokens_computed) == (2, 9)
    with pytest.raises(AssertionError, match="another prefix"):       # prefix pages in the wrong order
        fake.forward(ForwardBatch([chunk(prompt[8:], 8, [1, 0, 3], slot=2, epoch=3)]))
    with pytest.raises(AssertionError, match="never written"):        # a radix hit on empty pages
        fake.forward(ForwardBatch([chunk(prompt[8:], 8, [3, 4, 5], slot=2, epoch=4)]))
    with pytest.raises(AssertionError, match="stale page table"):     # rewritten without a new epoch
        fake.forward(ForwardBatch([chunk(prompt[8:], 8, [0, 3, 2], slot=1, epoch=2)]))
    with pytest.raises(AssertionError, match="same KV slot"):
        fake.forward(ForwardBatch([chunk([1], 0, [6], slot=0, epoch=5), chunk([2], 0, [6], slot=1, epoch=6)]))
    with pytest.raises(AssertionError, match="share seq_slot"):
        fake.forward(ForwardBatch([chunk([1], 0, [6], slot=0, epoch=7), chunk([2], 0, [7], slot=0, epoch=8)]))
    for bad in (chunk([1], 0, [8]), chunk([1], 0, [6], slot=4), chunk([VOCAB], 0, [6]), chunk([1] * 5, 0, [6])):
        with pytest.raises(AssertionError):
            fake.forward(ForwardBatch([bad]))
    # a page of a live sequence handed to another one: the owner's next step notices
    fake.forward(ForwardBatch([chunk(tokens(2, 4), 0, [1], slot=3, epoch=9, sample=False)]))
    with pytest.raises(AssertionError, match="another prefix"):
        fake.forward(ForwardBatch([chunk(prompt[8:], 8, [0, 1, 2], slot=1, epoch=2)]))


def test_fake_greedy_run_is_varied():
    out, reason = alone(tokens(3, 10), max_new=40)
    assert reason == "length" and len(out) == 40 and len(set(out)) > 10


# ---- chunked prefill and continuous batching -----------------------------------------------------

def test_chunked_prefill_matches_one_chunk(overlap):
    prompt = tokens(4, 150)
    results = {}
    for budget in (16, 7, 4096):
        run = Run(chunk=budget)
        request = run.add(run.request(prompt, max_new=12))
        run.run()
        first_step = run.events[id(request)][0][0]
        # one chunk per step until the prompt is in (overlap: its draw is taken in a step later)
        assert first_step == -(-150 // budget) + overlap
        assert run.backend.tokens_computed == 150 + 11    # every prompt token once, then decodes
        results[budget] = run.result(request)
    assert results[16] == results[7] == results[4096]
    assert results[16][1] == "length" and len(results[16][0]) == 12


def test_continuous_batching_matches_alone():
    lengths, max_new = [3, 17, 40, 9, 64, 1, 23], [5, 20, 9, 30, 12, 7, 16]
    arrive = [0, 0, 1, 3, 4, 10, 15]
    run = Run(chunk=16)
    requests = [run.request(tokens(10 + i, n), max_new=m)
                for i, (n, m) in enumerate(zip(lengths, max_new, strict=True))]
    arrivals: dict[int, list[Request]] = {}
    for request, step in zip(requests, arrive, strict=True):
        arrivals.setdefault(step, []).append(request)
    run.run(arrivals)
    for request in requests:
        assert run.result(request) == alone(request.prompt_ids, max_new=request.max_new_tokens)
    batches = run.backend.batches
    assert max(len(b) for b in batches) >= 4
    assert any(any(n == 1 for n, *_ in b) and any(n > 1 for n, *_ in b) for b in batches)  # decode + prefill
    assert run.sched.stats.generated_tokens == sum(max_new)


# ---- radix reuse -----------------------------------------------------------------------------------

def test_radix_hit_computes_fewer_tokens_same_output():
    prefix = tokens(20, 64)
    first, second = prefix + [1, 2, 3, 4, 5], prefix + [9, 8, 7, 6, 5, 4, 3]
    run = Run()
    a = run.add(run.request(first, max_new=6))
    run.run()
    before = run.backend.tokens_computed
    b = run.add(run.request(second, max_new=6))
    run.run()
    assert run.backend.tokens_computed - before == len(second) - 64 + 5
    assert run.last_event(a).cached_tokens == 0 and run.last_event(b).cached_tokens == 64
    assert run.sched.stats.cached_prompt_tokens == 64
    assert run.result(b) == alone(second, max_new=6)
    # the same prompt again: all of it but the last page-aligned remainder comes from the cache
    c = run.add(run.request(second, max_new=6))
    run.run()
    assert run.last_event(c).cached_tokens == (len(second) - 1) // 4 * 4
    assert run.result(c) == run.result(b)


def test_radix_hit_on_a_running_request_prompt():
    """A request sharing the prompt of one still decoding reuses its pages (shared at first token)."""
    prefix = tokens(21, 40)
    run = Run(chunk=16)
    a = run.add(run.request(prefix + [1], max_new=30))
    while not a.output_ids:
        run.step()
    before, steps_before = run.backend.tokens_computed, run.steps
    b = run.add(run.request(prefix + [2, 3], max_new=10))
    while b.state is not RequestState.FINISHED:
        run.step()
    assert a.state is RequestState.RUNNING
    assert run.last_event(b).cached_tokens == 40
    # b computed its 2 uncached prompt tokens and 9 decodes; a one decode a step meanwhile
    assert run.backend.tokens_computed - before == 2 + 9 + (run.steps - steps_before)
    run.run()
    assert run.result(a) == alone(prefix + [1], max_new=30)
    assert run.result(b) == alone(prefix + [2, 3], max_new=10)


# ---- preemption ------------------------------------------------------------------------------------

@pytest.mark.parametrize("radix", [True, False])
def test_preemption_under_page_pressure(radix):
    shared = tokens(30, 8)
    specs = [(shared + tokens(31, 4), 24, GREEDY), (shared + tokens(32, 8), 20, SamplingParams(seed=5)),
             (tokens(33, 9), 30, GREEDY), (shared + tokens(34, 12), 16, SamplingParams(temperature=0.7, seed=9)),
             (tokens(35, 20), 14, GREEDY)]
    run = Run(num_pages=20, context=80, max_running=4, chunk=32, radix=radix)   # 20 pages: 80 tokens
    requests = [run.request(p, max_new=m, params=s) for p, m, s in specs]
    run.run({0: requests[:3], 2: requests[3:]})
    for request, (prompt, max_new, params) in zip(requests, specs, strict=True):
        assert run.result(request) == alone(prompt, max_new=max_new, params=params)
    assert run.sched.stats.preemptions > 0
    # cached_tokens is what the first admission found: the 8 shared tokens for the late arrival
    # (the first request's prompt was cached at its first token), not what a re-admission finds
    cached = [0, 0, 0, 8, 0] if radix else [0] * 5
    assert [run.last_event(r).cached_tokens for r in requests] == cached
    assert run.sched.stats.cached_prompt_tokens == sum(cached)


def test_requests_in_the_batch_are_never_preempted():
    """A request whose prompt is cached but for one token decodes first; an older request then
    short of pages must go back to the queue itself, not take the pages of one already batched."""
    cached_prompt = tokens(36, 17)
    run = Run(num_pages=12, context=48, chunk=32)
    first = run.add(run.request(cached_prompt, max_new=1))
    run.run()                                          # 4 pages of cache, 8 free
    old = run.request(tokens(37, 36), max_new=2)       # needs 8 pages for its first chunk
    new = run.request(cached_prompt, max_new=8)        # one token to compute: a decode
    run.add(old, new)
    while new.state is not RequestState.FINISHED:
        run.step()
        assert new.state is not RequestState.WAITING
    run.run()
    assert run.sched.stats.preemptions > 0 and run.last_event(new).cached_tokens == 16
    assert run.result(new) == alone(cached_prompt, max_new=8)
    assert run.result(old) == alone(old.prompt_ids, max_new=2)
    assert run.result(first)[0] == run.result(new)[0][:1]


# ---- cancellation ----------------------------------------------------------------------------------

def test_cancel_running_waiting_and_mid_prefill():
    run = Run(max_running=3, chunk=8)
    a = run.request(tokens(40, 10), max_new=50)
    b = run.request(tokens(41, 12), max_new=10)
    c = run.request(tokens(42, 200), max_new=10)     # prefilled 8 tokens a step
    d = run.request(tokens(43, 5), max_new=10)       # waits: three running already
    run.add(a, b, c, d)
    for _ in range(6):
        run.step()
    assert a.output_ids and 0 < c.num_computed < 200 and d.state is RequestState.WAITING
    for request in (a, c, d):
        run.sched.cancel(request.id)
    run.run()
    for request in (a, c, d):
        assert run.result(request)[1] == "cancelled"
    assert d.output_ids == [] and c.output_ids == [] and len(a.output_ids) < 50
    assert run.sched.stats.cancelled == 3
    assert run.result(b) == alone(b.prompt_ids, max_new=10)
    # what was computed before the cancel stays cached and correct
    again = run.add(run.request(c.prompt_ids, max_new=4))
    run.run()
    assert run.last_event(again).cached_tokens > 0
    assert run.result(again) == alone(c.prompt_ids, max_new=4)


# ---- n > 1 and seeds ---------------------------------------------------------------------------------

def test_n_choices_share_the_prompt_and_seeds_are_reproducible():
    prompt = tokens(50, 41)
    params = SamplingParams(temperature=1.0, seed=7)
    run = Run(chunk=16)
    other = run.request(tokens(51, 30), max_new=8)
    c0 = run.request(prompt, max_new=12, params=params, index=0, rid="n-0")
    c1 = run.request(prompt, max_new=12, params=params, index=1, wait_for=c0, rid="n-1")
    c2 = run.request(prompt, max_new=12, params=params, index=2, wait_for=c0, rid="n-2")
    run.run({0: [other], 1: [c0, c1, c2]})
    outs = [run.result(c)[0] for c in (c0, c1, c2)]
    assert len({tuple(o) for o in outs}) == 3                        # choices differ
    assert [run.last_event(c).cached_tokens for c in (c0, c1, c2)] == [0, 40, 40]
    prompt_work = 41 + 1 + 1 + 30                                     # the shared prompt computed once
    assert run.backend.tokens_computed == prompt_work + sum(len(o) - 1 for o in outs) + 7
    for i, c in enumerate((c0, c1, c2)):                              # same seed: same tokens alone
        assert run.result(c) == alone(prompt, max_new=12, params=params, index=i)
    # the draws: choice 0 keeps the client's seed, token j uses draw_uniform(seed, j)
    assert c0.seed == 7 and len({c.seed for c in (c0, c1, c2)}) == 3
    for c in (c0, c1, c2):
        replay = FakeBackend(VOCAB, 4, 64, 1, 512)
        ids = list(prompt)
        for j in range(len(c.output_ids)):
            spec = SampleSpec(params, draw_uniform(c.seed, j))
            token = replay.forward(ForwardBatch([SequenceChunk(ids, 0, list(range(-(-len(ids) // 4))),
                                                               0, j, spec)])).tokens[0].token_id
            ids.append(token)
        assert ids[len(prompt):] == c.output_ids


def test_seeded_sampling_is_batch_invariant():
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, presence_penalty=0.5, seed=123,
                            logprobs=True, top_logprobs=3)
    prompt = tokens(60, 19)
    ref = Run(chunk=4096)
    solo = ref.add(ref.request(prompt, max_new=20, params=params))
    ref.run()
    run = Run(chunk=8)
    noise = [run.request(tokens(61 + i, 5 + 9 * i), max_new=15, params=SamplingParams(seed=i)) for i in range(4)]
    batched = run.request(prompt, max_new=20, params=params)
    run.run({0: noise[:2], 3: [batched], 5: noise[2:]})
    assert run.result(batched) == ref.result(solo)
    logprobs = [lp for _, e in run.events[id(batched)] for lp in e.logprobs]
    assert len(logprobs) == 20 and all(len(top) == 3 for _, _, top in logprobs)
    assert logprobs == [lp for _, e in ref.events[id(solo)] for lp in e.logprobs]
    other_seed = alone(prompt, max_new=20, params=SamplingParams(temperature=0.8, seed=124))[0]
    assert other_seed != run.result(batched)[0]


# ---- finishing ---------------------------------------------------------------------------------------

def test_stop_token_stop_string_and_length():
    prompt = tokens(70, 12)
    out, reason = alone(prompt, max_new=16)
    assert (reason, len(out)) == ("length", 16)
    k = next(k for k in range(2, 16) if out[k] not in out[:k])
    run = Run()
    by_id = run.add(run.request(prompt, max_new=16, stop_ids={out[k]}))
    by_text = run.add(run.request(prompt, max_new=16, stop=[f"<{out[k]}>"]))
    run.run()
    assert run.result(by_id) == (out[:k + 1], "stop")
    assert run.last_event(by_id).token_ids == [out[k]]
    assert run.result(by_text) == (out[:k + 1], "stop")
    assert "".join(e.text for _, e in run.events[id(by_text)]) == Tok().decode(out[:k])


@pytest.mark.parametrize("prompt_len, expected", [(29, 3), (31, 1)])
def test_context_length_limit(prompt_len, expected):
    run = Run(context=32, chunk=8)            # the fake refuses any position past 32
    request = run.add(run.request(tokens(80, prompt_len), max_new=50))
    run.run()
    out, reason = run.result(request)
    assert (len(out), reason) == (expected, "length")
    assert out == alone(request.prompt_ids, max_new=50)[0][:expected]


# ---- seq slots and table epochs ----------------------------------------------------------------------

def test_seq_slots_bounded_and_reused():
    run = Run(max_running=3, chunk=16)
    requests = [run.request(tokens(90 + i, 3 + 5 * i), max_new=2 + 3 * i) for i in range(10)]
    run.run({i: [r] for i, r in enumerate(requests)})
    assert run.slots_seen == {0, 1, 2}
    assert max(len(b) for b in run.backend.batches) == 3
    for request in requests:
        assert request.seq_slot == -1
        assert run.result(request) == alone(request.prompt_ids, max_new=request.max_new_tokens)


def test_table_rewrite_gets_a_new_epoch(overlap):
    """Two equal prompts prefilled in one step: at their first token both put the prompt in the
    cache, and the second's prompt pages turn out to be duplicates of the first's, so its table
    is rewritten to the tree's pages. The fake keeps a mirror of every slot's table like the GPU
    page-table store: had the epoch stayed the same, it would fail on a stale table."""
    prompt = tokens(100, 22)
    run = Run()
    a, b = run.request(prompt, max_new=10), run.request(prompt, max_new=10)
    run.add(a, b)
    run.step()                                    # admits and prefills both: nothing cached yet
    if overlap:
        run.step()                                # their first draws are taken in a step later
    (_, _, slot_a, epoch_a), (_, _, slot_b, epoch_b) = run.backend.batches[0]
    assert a.output_ids and b.output_ids and (slot_a, slot_b) == (a.seq_slot, b.seq_slot)
    assert b.page_table[:5] == a.page_table[:5]   # b now reads the tree's copy of the prompt
    assert a.table_epoch == epoch_a and b.table_epoch != epoch_b
    # the tree's 5 prompt pages and one partial page each: b's 5 duplicate pages went back
    assert run.pool.num_free == run.pool.num_pages - 7
    run.step()
    # the fake was told, and re-read the table (overlap: the step launched before the rewrite
    # still read the old, still valid pages)
    assert run.backend.batches[1 + overlap][1][3] == b.table_epoch
    run.run()
    assert run.result(a) == run.result(b) == alone(prompt, max_new=10)


# ---- the error path ----------------------------------------------------------------------------------

def test_backend_error_fails_the_step_and_the_scheduler_keeps_serving(overlap):
    run = Run(chunk=16)
    a = run.add(run.request(tokens(110, 12), max_new=20))
    for _ in range(3):
        run.step()
    bad = run.add(run.request([1, 2, VOCAB + 5, 3], max_new=5))    # the fake raises on this token id
    run.step()
    assert run.result(a)[1] == "error" and run.result(bad)[1] == "error"
    assert "internal error" in run.last_event(bad).error
    # overlap: step 3's draw for `a` comes back after the failure, and is dropped
    assert len(a.output_ids) == 3 - overlap and run.sched.stats.steps == 3
    run.check_idle()
    after = run.add(run.request(a.prompt_ids, max_new=20))             # what a computed stays usable
    run.run()
    assert run.result(after) == alone(a.prompt_ids, max_new=20)
    assert run.last_event(after).cached_tokens > 0
