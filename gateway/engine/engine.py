"""The engine: a scheduler thread that owns all mutable state, and an async face for the HTTP side.

The HTTP side only enqueues commands (submit, cancel, call) and reads events from its own
asyncio queue; it never touches requests, pages or the radix tree.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from backends.base import Backend
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request, TokenEvent
from gateway.engine.sampling import SamplingParams
from gateway.engine.scheduler import Scheduler

log = logging.getLogger("radixgate.engine")


@dataclass(frozen=True)
class EngineSettings:
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    prefill_chunk_tokens: int = 512
    radix_cache: bool = True
    check_invariants: bool = False      # walk the radix tree after every step (tests)


class QueueFull(Exception):
    """More requests wait than the engine admits; the HTTP side answers 429."""


class RequestHandle:
    """The HTTP side's view of one submitted request (all n choices): an async stream of events."""

    def __init__(self, engine: Engine, request_ids: list[str]):
        self.engine = engine
        self.request_ids = request_ids
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._open = len(request_ids)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while self._open:
            event = await self.events.get()
            if event.finish_reason is not None:
                self._open -= 1
            yield event

    def cancel(self) -> None:
        if self._open:
            self.engine.cancel(self)


class Engine:
    """Submits requests to the scheduler thread and hands their token events back to asyncio."""

    _ids = itertools.count()

    def __init__(self, backend: Backend, tokenizer, settings: EngineSettings):
        self.backend = backend
        self.tokenizer = tokenizer
        self.settings = settings
        self.context_length = min(backend.info.context_length, backend.num_pages * backend.page_size)
        pool = PagePool(backend.num_pages)
        cache = RadixCache(pool, backend.page_size, enabled=settings.radix_cache)
        self.scheduler = Scheduler(
            backend, pool, cache, max_running=settings.max_running_requests,
            prefill_chunk_tokens=settings.prefill_chunk_tokens, context_length=self.context_length)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = 0          # published by the engine thread after each step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="radixgate-engine", daemon=True)
        self.fatal_error: str | None = None

    # ---- HTTP side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    def submit(self, choices: list[tuple[list[int], SamplingParams]], *, max_new_tokens: int,
               stop: list[str], ignore_eos: bool = False) -> RequestHandle:
        """Queue one request per (prompt ids, sampling params) choice; returns their event stream.

        Choices with the same prompt wait for the first of them to cache it, so n>1 computes the
        prompt once.
        """
        if self._waiting + self._inbox.qsize() >= self.settings.max_waiting_requests:
            raise QueueFull(f"{self._waiting} requests are waiting; try again shortly")
        loop = asyncio.get_running_loop()
        base = f"req-{next(self._ids)}"
        handle = RequestHandle(self, [f"{base}-{i}" for i in range(len(choices))])

        def emit(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(handle.events.put_nowait, event)

        stop_ids = frozenset() if ignore_eos else self.tokenizer.eos_token_ids
        requests: list[Request] = []
        for index, (prompt_ids, choice_params) in enumerate(choices):
            first_same = next((r for r in requests if r.prompt_ids == prompt_ids), None)
            requests.append(Request(
                id=handle.request_ids[index], index=index, prompt_ids=list(prompt_ids),
                params=choice_params, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                detokenizer=IncrementalDetokenizer(self.tokenizer, stop),
                emit=emit, wait_for=first_same))
        self._inbox.put(("add", requests))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        for request_id in handle.request_ids:
            self._inbox.put(("cancel", request_id))

    async def call(self, fn: Callable[[Scheduler], object]) -> object:
        """Run fn(scheduler) on the engine thread (the only thread that may touch its state)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    # ---- engine thread -------------------------------------------------------------------
    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            for request in command[1]:
                self.scheduler.add(request)
        elif kind == "cancel":
            self.scheduler.cancel(command[1])
        elif kind == "call":
            fn, future = command[1], command[2]
            try:
                future.set_result(fn(self.scheduler))
            except Exception as error:
                future.set_exception(error)

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(command)
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.scheduler.has_work)
            if not self.scheduler.has_work:
                continue
            try:
                self.scheduler.step()
                self.scheduler.check_accounting()
                if self.settings.check_invariants:
                    self.scheduler.cache.check_invariants()
            except Exception as error:   # keep serving: fail the batch, record what broke
                log.exception("scheduler step failed")
                self.fatal_error = self.fatal_error or repr(error)
                self.scheduler.fail_all(f"internal error: {error}")
            self._waiting = len(self.scheduler.waiting)
