"""Who leaves the waiting queue first, and how one step's prefill tokens are shared (`scheduler.policy`).

The scheduler asks its policy, chosen once at start-up, two things per step: the order in which to
try waiting requests for admission, and a StepBudget (the running requests in batch order and the
prefill tokens each may take). Decodes always come first and never count against the budget.

fcfs: arrival order everywhere, the scheduler's behaviour before policies existed. Chunked prefill
keeps streams decoding, but a short prompt that arrives behind long ones waits for all of their
prefill (the issue measured 22.5 s for one 4.4k-token prompt on 2 CPU cores).

fair (opt-in: fcfs stays the default until fair meets its bounds at full load). With
B = prefill_chunk_tokens and L = long_prefill_tokens (default B / 2):
  * A prompt is *long* while more than L of its tokens are left to compute (uncached), else
    *short*. A long prompt turns short for its last L tokens, so it is never kept from finishing.
  * In a step that prefills a short prompt, long prefills take at most L tokens between them and
    short ones the rest, at least B - L; in any other step long prompts take all of B, as under
    fcfs. A short prompt therefore never waits for a long prompt's prefill, and its own step stays
    short (on a CPU a step's time is about proportional to its prefill tokens), while long prompts
    lose no throughput to the cap when there is no short prompt to make room for.
  * One long prompt is admitted at a time (LONG_PREFILLS_AT_ONCE): long prompts prefill one after
    the other (a second one could only take the first one's tokens), and cannot fill the seq slots
    that short requests need. (A waiting request's class comes from its last measured cached
    prefix; a measurement gone stale can let a second long prompt in.)
  * Within a class, and in the waiting queue, requests go by (priority, lower first; short before
    long; longest cached prefix, as SGLang's lpm: the cached tokens cost nothing and the prefix is
    in the cache now; arrival). The cached prefix of a waiting request is measured read-only, for
    at most PROBES_PER_STEP requests per step (never measured first, then the least recently).
  * Age bound K = max_wait_steps: a request queued K or more steps ago goes ahead of every later
    arrival, in arrival order; priority and cached prefixes reorder only younger requests.

Starvation bound (fair; a step is one scheduler step; pages permitting: a request preempted for
pages recomputes what the cache no longer holds of it): a request is passed by later arrivals
for at most K steps, in the waiting queue and in its class's prefill order. Long prompts as a
class get at least min(L, what they need) tokens of every step, so a long prompt of U uncached
tokens that heads its class has all but its last L tokens computed within ceil((U - L) / L)
steps; those last ones go with the short prompts, ahead of every short one that arrived after it
(after K steps whatever their priority). It heads its class once the long prompts ahead of it
(earlier arrivals, or later ones of higher priority or longer cached prefix within their K steps)
have had theirs. A short prompt admitted behind any number of long ones starts its prefill in
that step unless older short ones fill the short class's share (at least B - L tokens of every
step): its wait does not depend on how many long prompts are queued.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request

PROBES_PER_STEP = 32          # cached-prefix measurements of waiting requests per step (each O(prompt))
LONG_PREFILLS_AT_ONCE = 1     # running requests with a long prefill left, at most (fair)


def prefill_left(request: Request) -> int:
    """Tokens to compute before the request's next draw: 1 for a decode, more for a prefill."""
    return request.known_len - request.num_computed


@dataclass
class StepBudget:
    """One step's plan: running requests in batch order, the prefill tokens left for all of them
    (`left`) and for the ones counted long this step (`long_left`, a part of `left`)."""

    order: list[Request]
    left: int
    long_left: int
    longs: frozenset[int] = frozenset()      # id() of the requests counted long this step

    def grant(self, request: Request, remaining: int) -> int:
        """Prefill tokens `request` may take now (0: none are left for it this step)."""
        cap = min(self.left, self.long_left) if id(request) in self.longs else self.left
        return min(remaining, cap)

    def spend(self, request: Request, count: int) -> None:
        self.left -= count
        if id(request) in self.longs:
            self.long_left -= count
        assert self.left >= 0 and self.long_left >= 0, (self.left, self.long_left)


class FcfsPolicy:
    """Arrival order for admission and prefill (a preempted request goes back to the queue's front)."""

    name = "fcfs"

    def admission_order(self, waiting: Iterable[Request], running: list[Request], step: int) -> list[Request]:
        return list(waiting)

    def step_budget(self, running: list[Request], budget_tokens: int, step: int) -> StepBudget:
        order = sorted(running, key=lambda r: (prefill_left(r) > 1, r.arrival_s))
        return StepBudget(order, budget_tokens, budget_tokens)


class FairPolicy:
    """Short prompts are not queued behind long ones; priority and cached prefixes order the queue
    within the age bound (this module's docstring states the rules and the bound)."""

    name = "fair"

    def __init__(self, cache: RadixCache, *, long_prefill_tokens: int, max_wait_steps: int):
        assert long_prefill_tokens >= 1 and max_wait_steps >= 0, (long_prefill_tokens, max_wait_steps)
        self.cache = cache
        self.long_tokens = long_prefill_tokens
        self.max_wait_steps = max_wait_steps
        self.probes = 0            # cached-prefix measurements so far (tests check the bound per step)

    def _rank(self, request: Request, step: int, *within: object) -> tuple:
        if step - request.arrival_step >= self.max_wait_steps:
            return (0, request.arrival_s)         # aged: later arrivals no longer pass it
        return (1, request.priority, *within, request.arrival_s)

    def _is_long(self, request: Request) -> bool:
        """A waiting request's class, from its last measured cached prefix."""
        return request.total_len - request.cached_estimate > self.long_tokens

    def admission_order(self, waiting: Iterable[Request], running: list[Request], step: int) -> list[Request]:
        waiting = list(waiting)
        self._measure(waiting, step)
        ranked = sorted(waiting, key=lambda r: self._rank(r, step, self._is_long(r), -r.cached_estimate))
        longs_allowed = LONG_PREFILLS_AT_ONCE - sum(prefill_left(r) > self.long_tokens for r in running)
        order = []
        for request in ranked:
            if self._is_long(request):
                if longs_allowed <= 0:
                    continue
                longs_allowed -= 1
            order.append(request)
        return order

    def _measure(self, waiting: list[Request], step: int) -> None:
        """Refresh the cached-prefix estimate of a bounded number of waiting requests; the tree
        changes as requests run, and the admission itself matches exactly anyway."""
        for request in heapq.nsmallest(PROBES_PER_STEP, waiting, key=lambda r: (r.measured_step, r.arrival_s)):
            # what admission will match: all but the last token (it must be computed for logits)
            request.cached_estimate = self.cache.cached_prefix_len(request.all_ids[:-1])
            request.measured_step = step
            self.probes += 1

    def step_budget(self, running: list[Request], budget_tokens: int, step: int) -> StepBudget:
        decodes, longs, shorts = [], [], []
        for request in running:
            left = prefill_left(request)
            (decodes if left <= 1 else longs if left > self.long_tokens else shorts).append(request)
        decodes.sort(key=lambda r: r.arrival_s)
        longs.sort(key=lambda r: self._rank(r, step))
        shorts.sort(key=lambda r: self._rank(r, step))
        # The cap is for short prompts only: without one to prefill, long prompts take the whole
        # budget as under fcfs (how long a step may stall decoding streams is prefill_chunk_tokens').
        # Long prefills go before short ones in the batch so that under page pressure they preempt
        # the newest request rather than be sent back themselves; the cap keeps the shorts' share.
        long_left = self.long_tokens if shorts else budget_tokens
        return StepBudget(decodes + longs + shorts, budget_tokens, long_left, frozenset(map(id, longs)))


Policy = FcfsPolicy | FairPolicy


def make_policy(name: str, cache: RadixCache, *, prefill_chunk_tokens: int, long_prefill_tokens: int | None,
                max_wait_steps: int) -> Policy:
    """The policy `scheduler.policy` names; long_prefill_tokens None is half the prefill budget."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "fair":
        long_tokens = prefill_chunk_tokens // 2 if long_prefill_tokens is None else long_prefill_tokens
        assert 1 <= long_tokens < prefill_chunk_tokens, (
            f"long_prefill_tokens {long_tokens} must be below prefill_chunk_tokens {prefill_chunk_tokens}")
        return FairPolicy(cache, long_prefill_tokens=long_tokens, max_wait_steps=max_wait_steps)
    raise ValueError(f"unknown scheduler policy {name!r} (fair or fcfs)")
