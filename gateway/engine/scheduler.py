"""Continuous batching over paged KV: admission, chunked prefill, decode, preemption, cancellation.

Runs in the engine process (gateway/engine/worker.py) only; nothing here is shared with the HTTP
side except through the requests' `emit` callbacks. Every step builds one ForwardBatch holding one
decode token for every running request that has finished its prompt plus prefill chunks within
`prefill_chunk_tokens`. Which waiting requests are admitted first, and how the prefill tokens of a
step are shared, is the policy's (gateway/engine/admission.py); the mechanics are here.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque

from backends.base import PENDING_TOKEN, Backend, ForwardBatch, SampleSpec, SequenceChunk
from backends.sampling_params import SampledToken, draw_uniform
from gateway.engine.admission import FcfsPolicy, Policy
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request, RequestState, TokenEvent
from gateway.engine.scheduler_stats import SchedulerStats

log = logging.getLogger("radixgate.scheduler")


class Scheduler:
    """Owns the waiting queue, the running batch, the page pool and the radix cache."""

    def __init__(self, backend: Backend, pool: PagePool, cache: RadixCache, *,
                 max_running: int, prefill_chunk_tokens: int, context_length: int,
                 policy: Policy | None = None):
        self.backend = backend
        self.pool = pool
        self.cache = cache
        self.page_size = backend.page_size
        self.max_running = max_running
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.context_length = context_length
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self.policy = policy if policy is not None else FcfsPolicy()   # the engine passes the configured one
        self.step_index = 0          # steps begun: requests age in steps (the fair policy's bound)
        # A running request holds one row of the backend's page-table store (its seq slot); the
        # epoch tells the backend when a table was rewritten rather than appended to.
        assert max_running <= backend.max_sequences, (
            f"max_running {max_running} exceeds the backend's {backend.max_sequences} sequence slots")
        self.free_slots = list(range(max_running - 1, -1, -1))
        self._epochs = itertools.count(1)
        # Overlap (backends that run asynchronously, e.g. on a GPU): step N+1 is built and launched
        # before step N's tokens are taken in, so the host's work hides behind the device's. A decode
        # whose last token is still in flight sends PENDING_TOKEN; the backend reads it on the device.
        self.overlap = bool(getattr(backend, "overlap", False))
        self.in_flight = None       # (pending result, scheduled) of the step launched last
        # requests whose cached prefix is still being copied up from a lower tier (gateway/engine/tiers.py)
        self.loading: dict[Request, object] = {}

    # ---- requests in and out -------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. Its draws come from its seed (a fresh one when the client gave none);
        choice i of an n>1 request mixes i in, so choices differ under one seed."""
        bad = [t for t in request.params.logit_bias if t >= self.backend.info.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary "
                             f"(size {self.backend.info.vocab_size})")
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        request.seed = (seed + request.index * 0x9E3779B97F4A7C15) % (1 << 64)
        request.arrival_step = self.step_index
        self.waiting.append(request)

    def cancel(self, request_id: str) -> None:
        for request in list(self.waiting) + self.running:
            if request.id == request_id:
                request.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled work, admit, launch one forward pass; then take in the sampled tokens of
        the step before (overlap) or of this one."""
        self.step_index += 1
        self._drop_cancelled()
        self._admit()
        chunks, scheduled = self._build_batch()
        launched = self._launch(chunks, scheduled) if chunks else None
        if self.overlap:
            previous, self.in_flight = self.in_flight, launched
            if previous is not None:
                self._complete(*previous)
        elif launched is not None:
            self._complete(*launched)

    def _launch(self, chunks: list[SequenceChunk], scheduled: list[tuple[Request, SequenceChunk]]):
        try:
            return self.backend.launch(ForwardBatch(chunks)), scheduled
        except Exception as error:   # a backend bug must not take the server down with it
            self._fail_step(scheduled, error)
            return None

    def _complete(self, pending, scheduled: list[tuple[Request, SequenceChunk]]) -> None:
        """Take in one launched step's sampled tokens. A request that finished (a stop token or
        string, a cancel) after this step was launched discards its draw: one wasted row, never a
        token too many. A request preempted meanwhile keeps it (the draw is valid output)."""
        try:
            result = pending.result()
        except Exception as error:
            self._fail_step(scheduled, error)
            return
        self.stats.steps += 1
        self.stats.pages_read += result.attention.pages_read
        self.stats.pages_skipped += result.attention.pages_skipped
        sampled = iter(result.tokens)
        for request, chunk in scheduled:
            if chunk.sample is None:
                continue
            token = next(sampled)
            request.pending -= 1
            if request.state is not RequestState.FINISHED:
                self._accept_token(request, token)
        assert next(sampled, None) is None, "the backend returned more tokens than were asked for"

    def _fail_step(self, scheduled: list[tuple[Request, SequenceChunk]], error: Exception) -> None:
        log.error("forward failed; failing the %d requests of this step", len(scheduled), exc_info=error)
        for request, chunk in scheduled:
            # the chunk's KV was never (validly) written: do not cache it
            request.num_computed = min(request.num_computed, chunk.start_position)
            request.pending = 0
            if request.state is not RequestState.FINISHED:
                self._finish(request, "error", error=f"internal error in the model runner: {error}")

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into the running batch, in the policy's order, each starting from
        its cached prefix."""
        if len(self.running) >= self.max_running or not self.waiting:
            return
        for request in self.policy.admission_order(self.waiting, self.running, self.step_index):
            if len(self.running) >= self.max_running:
                return
            sibling = request.wait_for
            if sibling is not None and sibling.state is not RequestState.FINISHED \
                    and not sibling.output_ids:
                continue   # an n>1 choice waits for its first sibling to cache the shared prompt
            if request.pending:
                continue   # preempted with a draw in flight: admitted once it is taken in
            self.waiting.remove(request)
            ids = request.all_ids
            match = self.cache.match_prefix(ids[:-1])   # at least one token left for logits
            self.cache.inc_lock_ref(match.last_node)
            request.lock_node = match.last_node
            request.page_table = list(match.pages)
            request.table_epoch = next(self._epochs)
            request.seq_slot = self.free_slots.pop()
            request.tree_pages = len(match.pages)
            request.num_computed = match.num_tokens
            if match.load is not None and not match.load.done():
                self.loading[request] = match.load    # its first chunk waits for its own pages only
            if not request.admitted_once:
                request.admitted_once = True
                request.cached_tokens = match.num_tokens
                self.stats.prompt_tokens += len(request.prompt_ids)
                self.stats.cached_prompt_tokens += match.num_tokens
                self.stats.l2_hit_tokens += match.host_tokens
                self.stats.l3_hit_tokens += match.disk_tokens
            request.state = RequestState.RUNNING
            self.running.append(request)

    def _build_batch(self) -> tuple[list[SequenceChunk], list[tuple[Request, SequenceChunk]]]:
        """Decode tokens first (they keep streams flowing), then prefill chunks within the budget.

        Tokens count as computed once launched (`num_computed`); draws in flight (`pending`) are
        tokens whose ids the host does not know yet. A request whose draws in flight already reach
        its max_new_tokens or the context length is not scheduled again.
        """
        budget = self.policy.step_budget(self.running, self.prefill_chunk_tokens, self.step_index)
        scheduled: list[tuple[Request, SequenceChunk]] = []
        for request in budget.order:
            if request.state is not RequestState.RUNNING:
                continue   # preempted earlier in this loop
            if self.loading and request in self.loading:
                if not self.loading[request].done():
                    continue   # its cached prefix is still on its way up to the device
                del self.loading[request]
            known = request.known_len
            remaining = known - request.num_computed
            if remaining <= 0 or (request.pending and (
                    len(request.output_ids) + request.pending >= request.max_new_tokens
                    or known >= self.context_length or request.needs_last_token)):
                continue      # (penalties and grammars follow every earlier token: they wait for the draw)
            count = remaining if remaining == 1 else budget.grant(request, remaining)
            if count <= 0:
                continue      # the prefill budget (or this request's share of it) is spent
            if not self._ensure_pages(request, request.num_computed + count, scheduled):
                continue
            if remaining > 1:
                budget.spend(request, count)
            start = request.num_computed
            if request.pending:    # the one unknown token is the last: its draw is in flight
                assert count == 1 and start == request.total_len, (request.id, start, count)
                token_ids = [PENDING_TOKEN]
            else:
                token_ids = request.token_slice(start, start + count)
            samples = start + count == known
            chunk = SequenceChunk(
                token_ids=token_ids, start_position=start,
                # by reference: the backend reads it within this step, before anything changes it
                page_table=request.page_table, seq_slot=request.seq_slot, table_epoch=request.table_epoch,
                sample=self._sample_spec(request) if samples else None)
            request.num_computed = start + count
            request.pending += samples
            scheduled.append((request, chunk))
        return [chunk for _, chunk in scheduled], scheduled

    def _sample_spec(self, request: Request) -> SampleSpec:
        params = request.params
        index = len(request.output_ids) + request.pending       # the draw's token index
        uniform = 0.0 if params.greedy else draw_uniform(request.seed, index)
        allowed = None
        if request.constraint is not None:
            # the matcher has taken in exactly the kept tokens (never a draw in flight)
            assert request.pending == 0 and request.constraint.num_accepted == len(request.output_ids), (
                request.id, request.pending, request.constraint.num_accepted, len(request.output_ids))
            allowed = request.constraint.next_mask()
        return SampleSpec(params, uniform, request.output_ids if request.penalized else (), allowed)

    def _ensure_pages(self, request: Request, num_tokens: int,
                      scheduled: list[tuple[Request, SequenceChunk]]) -> bool:
        """Give `request` pages for `num_tokens`; evict cache, then preempt the newest, if short.

        Requests already in this step's batch are never preempted; with no one else left to
        preempt, the request itself goes back to the queue.
        """
        needed = -(-num_tokens // self.page_size) - len(request.page_table)
        while needed > 0:
            if self.pool.num_free < needed:
                self.cache.evict(needed - self.pool.num_free)
            pages = self.pool.allocate(needed)
            if pages is not None:
                request.page_table.extend(pages)
                return True
            in_batch = {id(r) for r, _ in scheduled}
            others = [r for r in self.running if id(r) not in in_batch and r is not request]
            victim = max(others + [request], key=lambda r: r.arrival_s)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Return a running request to the front of the queue; its computed prefix stays cached."""
        self.stats.preemptions += 1
        self._release(request)
        request.state = RequestState.WAITING
        request.num_computed = 0
        self.running.remove(request)
        self.waiting.appendleft(request)
        log.info("preempted %s (%d tokens) to free KV pages", request.id, request.total_len)

    # ---- tokens and finishing ------------------------------------------------------------
    def _accept_token(self, request: Request, sampled: SampledToken) -> None:
        token = sampled.token_id
        request.output_ids.append(token)
        self.stats.generated_tokens += 1
        if request.first_token_s is None:
            request.first_token_s = time.monotonic()
            if request.state is RequestState.RUNNING:    # (not when preempted meanwhile)
                self._share_prompt(request)
        text = request.detokenizer.add_token(token)
        logprobs = [] if sampled.logprob is None else [(token, sampled.logprob, sampled.top_logprobs)]
        reason = None
        if request.constraint is not None and not request.constraint.accept(token):
            # the mask allowed only what the grammar accepts: a rejected token is a sampler bug
            text += request.detokenizer.finish()
            self._finish(request, "error", text=text, token_ids=[token], logprobs=logprobs,
                         error=f"internal error: token {token} broke the request's grammar")
            return
        if token in request.stop_token_ids or request.detokenizer.stopped or (
                request.constraint is not None and request.constraint.finished):
            reason = "stop"
        elif len(request.output_ids) >= request.max_new_tokens or request.total_len >= self.context_length:
            reason = "length"
        if reason is None:
            request.emit(TokenEvent(request.index, text, [token], logprobs))
            return
        text += request.detokenizer.finish()
        self._finish(request, reason, text=text, token_ids=[token], logprobs=logprobs)

    def _share_prompt(self, request: Request) -> None:
        """Put a freshly prefilled prompt into the cache so concurrent requests reuse it now."""
        if not self.cache.enabled:
            return
        full_pages = min(request.num_computed, len(request.prompt_ids)) // self.page_size
        if full_pages <= request.tree_pages:
            return
        tokens = request.prompt_ids[:full_pages * self.page_size]
        self.cache.insert(tokens, request.page_table[:full_pages])
        match = self.cache.match_prefix(tokens)
        assert match.num_tokens == len(tokens), "a just-inserted prefix must match in full"
        self.cache.inc_lock_ref(match.last_node)
        self.cache.dec_lock_ref(request.lock_node)
        request.lock_node = match.last_node
        if request.page_table[:full_pages] != match.pages:    # the tree kept its own copy of a page
            request.page_table[:full_pages] = match.pages
            request.table_epoch = next(self._epochs)
        request.tree_pages = full_pages

    def _release(self, request: Request) -> None:
        """Hand the request's pages back: full computed pages to the cache, the rest to the pool."""
        if request.lock_node is None:
            return
        self.loading.pop(request, None)
        if self.cache.enabled:
            # (launched tokens may include a draw in flight, not yet in all_ids)
            computed = min(request.num_computed, request.total_len)
            full_pages = min(computed // self.page_size, len(request.page_table))
            self.cache.insert(request.all_ids[:full_pages * self.page_size], request.page_table[:full_pages])
            self.pool.free(request.page_table[full_pages:])
        else:
            self.pool.free(request.page_table[request.tree_pages:])
        self.cache.dec_lock_ref(request.lock_node)
        request.lock_node = None
        request.page_table = []
        request.tree_pages = 0
        self.free_slots.append(request.seq_slot)
        request.seq_slot = -1

    def _finish(self, request: Request, reason: str, *, text: str = "", token_ids=None,
                logprobs=None, error: str | None = None) -> None:
        self._release(request)
        if request.state is RequestState.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:      # e.g. preempted with a draw in flight that stopped it
            self.waiting.remove(request)
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        if reason == "cancelled":
            self.stats.cancelled += 1
        request.emit(TokenEvent(
            request.index, text, token_ids or [], logprobs or [], finish_reason=reason,
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.output_ids),
            cached_tokens=request.cached_tokens, error=error))

    # ---- accounting ----------------------------------------------------------------------
    def held_pages(self) -> int:
        return sum(r.owned_pages for r in self.running)

    def check_accounting(self) -> None:
        """free + evictable + protected + held by requests == total pages, exactly."""
        total = self.pool.num_free + self.cache.evictable_size + self.cache.protected_size + self.held_pages()
        assert total == self.pool.num_pages, (
            f"page accounting broken: free {self.pool.num_free} + evictable {self.cache.evictable_size}"
            f" + protected {self.cache.protected_size} + held {self.held_pages()} != {self.pool.num_pages}")

    def fail_all(self, message: str) -> None:
        """Last resort after an unexpected error: end every request with an error event."""
        for request in list(self.running) + list(self.waiting):
            try:
                self._finish(request, "error", error=message)
            except Exception:   # state may be what broke; still tell the client
                log.exception("could not release %s", request.id)
                request.emit(TokenEvent(request.index, "", [], [], finish_reason="error", error=message))
        self.running.clear()
        self.waiting.clear()

    def snapshot(self) -> dict:
        """Counters and cache statistics for /health and /metrics (engine process only)."""
        stats = self.stats
        cache_stats = {**self.cache.stats(), **stats.hit_rates()}
        return {
            "scheduler_policy": self.policy.name,
            "running_requests": len(self.running), "waiting_requests": len(self.waiting),
            "kv_pages_total": self.pool.num_pages, "kv_pages_free": self.pool.num_free,
            "kv_pages_held_by_requests": self.held_pages(), "page_size": self.page_size,
            "radix_cache_enabled": self.cache.enabled, "radix_cache_stats": cache_stats,
            "prompt_tokens_total": stats.prompt_tokens, "cached_prompt_tokens_total": stats.cached_prompt_tokens,
            "generated_tokens_total": stats.generated_tokens, "preemptions_total": stats.preemptions,
            "cancelled_total": stats.cancelled, "steps_total": stats.steps,
            "attention_pages_read_total": stats.pages_read, "attention_pages_skipped_total": stats.pages_skipped,
            "attention_sparsity_ratio": stats.sparsity(),
        }
