"""The gateway's side of an engine: it starts the engine process and turns its messages into async streams.

The HTTP side only sends commands (add, cancel, call) down the pipe and reads its own asyncio
queues; requests, pages and the radix tree live in the engine process (gateway/engine/worker.py).
The event loop itself watches the pipe (loop.add_reader): a step's message wakes it once and its
events go straight into the requests' queues, with no thread hop per token.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import AsyncIterator

from backends.base import BackendInfo
from gateway.engine import worker
from gateway.engine.request import TokenEvent
from gateway.engine.sampling import SamplingParams
from gateway.engine.worker import EngineSettings, EngineSpec, RequestSpec
from gateway.grammar import GrammarSpec

log = logging.getLogger("radixgate.engine")

__all__ = ["Engine", "EngineSettings", "EngineSpec", "EngineStartError", "EngineUnavailable",
           "QueueFull", "RequestHandle"]


class QueueFull(Exception):
    """More requests wait than the engine admits; the HTTP side answers 429."""


class EngineUnavailable(Exception):
    """The engine process is gone (crashed or stopped); the HTTP side answers 503."""


class EngineStartError(Exception):
    """The engine process could not load its model; the message says why."""


class RequestHandle:
    """The HTTP side's view of one submitted request (all n choices): an async stream of events."""

    def __init__(self, engine: Engine, request_ids: list[str], loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_ids = request_ids
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._open = len(request_ids)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while self._open:
            event = await self.events.get()
            if event.finish_reason is not None:
                self._open -= 1
            yield event

    def deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            self.events.put_nowait(event)

    def cancel(self) -> None:
        if self._open:
            self.engine.cancel(self)


class Engine:
    """One engine process: submit() returns a RequestHandle whose events arrive as the engine steps."""

    _ids = itertools.count()

    def __init__(self, spec: EngineSpec):
        self.settings = spec.settings
        self.info: BackendInfo | None = None
        self.context_length = 0
        self.fatal_error: str | None = None
        self._spec = spec
        self._context = multiprocessing.get_context("spawn")      # fork would copy threads and locks
        self._conn, self._child_conn = self._context.Pipe()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._open: dict[str, tuple[RequestHandle, int]] = {}     # request id -> (handle, choice index)
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._adds_sent = 0
        self._adds_handled = 0
        self._waiting = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until its model is loaded (raises EngineStartError)."""
        # The child dies with this process (gateway/engine/parent_watch.py); the kernel's death
        # signal follows the forking thread, so say whether that thread lives as long as we do.
        on_main_thread = threading.current_thread() is threading.main_thread()
        self._process = self._context.Process(
            target=worker.main, args=(self._child_conn, self._spec, os.getpid(), on_main_thread),
            name="radixgate-engine", daemon=True)
        self._process.start()
        self._child_conn.close()      # the child holds its end: EOF here means it is gone
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise EngineStartError(f"the engine process exited while loading (exit code "
                                   f"{self._process.exitcode})") from None
        if message[0] == "failed":
            self._process.join(timeout=5)
            raise EngineStartError(message[1])
        assert message[0] == "ready", message
        self.info, self.context_length = message[1], message[2]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages on `loop` (the server's event loop; call it on that loop)."""
        if self._loop is loop:
            return
        assert self._loop is None, "an engine reads on one event loop"
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._on_readable)

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (OSError, ValueError, RuntimeError):
                pass
        if self._process is not None and self._process.is_alive():
            try:
                self._send(("stop",))
            except (OSError, EngineUnavailable):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()            # it ignores SIGTERM (worker.main)
                self._process.join(timeout=5)
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive() and not self._stopping

    # ---- HTTP side -----------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as error:      # ValueError: the connection is closed
                raise EngineUnavailable(self.fatal_error or "the engine process is not running") from error

    def submit(self, choices: list[tuple[list[int], SamplingParams]], *, max_new_tokens: int,
               stop: list[str], ignore_eos: bool = False, priority: int = 0,
               grammar: GrammarSpec | None = None) -> RequestHandle:
        """Queue one request per (prompt ids, sampling params) choice; returns their event stream.

        Choices with the same prompt wait for the first of them to cache it, so n>1 computes the
        prompt once. `priority`: lower is admitted first (within the fair policy's age bound).
        `grammar`: every choice's output must match it (constrained decoding).
        """
        if not self.alive:
            raise EngineUnavailable(self.fatal_error or "the engine process is not running")
        if self._loop is None:
            self.attach(asyncio.get_running_loop())
        pending = self._adds_sent - self._adds_handled
        if self._waiting + pending >= self.settings.max_waiting_requests:
            raise QueueFull(f"{self._waiting + pending} requests are waiting; try again shortly")
        base = f"req-{next(self._ids)}"
        handle = RequestHandle(self, [f"{base}-{i}" for i in range(len(choices))], asyncio.get_running_loop())
        specs: list[RequestSpec] = []
        for index, (prompt_ids, params) in enumerate(choices):
            first_same = next((s.id for s in specs if s.prompt_ids == prompt_ids), None)
            specs.append(RequestSpec(id=handle.request_ids[index], index=index, prompt_ids=list(prompt_ids),
                                     params=params, max_new_tokens=max_new_tokens, stop=list(stop),
                                     ignore_eos=ignore_eos, wait_for=first_same, priority=priority,
                                     grammar=grammar))
        with self._state_lock:
            for index, request_id in enumerate(handle.request_ids):
                self._open[request_id] = (handle, index)
            self._adds_sent += 1
        try:
            self._send(("add", specs))
        except EngineUnavailable:
            with self._state_lock:
                for request_id in handle.request_ids:
                    self._open.pop(request_id, None)
            raise
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        for request_id in handle.request_ids:
            try:
                self._send(("cancel", request_id))
            except EngineUnavailable:
                return

    def _start_call(self, name: str) -> concurrent.futures.Future:
        assert name in worker.CALLS, name
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._state_lock:
            self._calls[call_id] = future
        try:
            self._send(("call", call_id, name))
        except EngineUnavailable as error:
            with self._state_lock:
                self._calls.pop(call_id, None)
            future.set_exception(error)
        return future

    async def call(self, name: str) -> object:
        """Run one of worker.CALLS on the engine's scheduler, between two steps."""
        return await asyncio.wrap_future(self._start_call(name))

    def call_sync(self, name: str, timeout_s: float = 30.0) -> object:
        """call() for code outside any event loop (tests, tools)."""
        return self._start_call(name).result(timeout=timeout_s)

    # ---- messages from the engine (on the attached loop) -----------------------------------
    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._engine_gone()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            self._dispatch(message[1])
            self._waiting, self._adds_handled = message[2], message[3]
        elif kind == "result":
            with self._state_lock:
                future = self._calls.pop(message[1])
            if message[2]:
                future.set_result(message[3])
            else:
                future.set_exception(RuntimeError(message[3]))
        elif kind == "fatal":
            self.fatal_error = self.fatal_error or message[1]
        else:
            log.error("unexpected message from the engine: %r", kind)

    def _dispatch(self, events: list[tuple[str, TokenEvent]]) -> None:
        batches: dict[int, tuple[RequestHandle, list[TokenEvent]]] = {}
        with self._state_lock:
            for request_id, event in events:
                entry = self._open.get(request_id)
                if entry is None:
                    continue
                handle = entry[0]
                batches.setdefault(id(handle), (handle, []))[1].append(event)
                if event.finish_reason is not None:
                    del self._open[request_id]
        for handle, batch in batches.values():
            self._deliver(handle, batch)

    def _deliver(self, handle: RequestHandle, events: list[TokenEvent]) -> None:
        if handle.loop is self._loop:
            handle.deliver(events)
            return
        try:
            handle.loop.call_soon_threadsafe(handle.deliver, events)
        except RuntimeError:           # that event loop is closed: nobody is listening
            pass

    def _engine_gone(self) -> None:
        """The pipe closed: end every open request and call with an error (unless we stopped it)."""
        if not self._stopping:
            self._process.join(timeout=5)
            self.fatal_error = self.fatal_error or (
                f"the engine process exited unexpectedly (exit code {self._process.exitcode})")
            log.error("%s", self.fatal_error)
        message = self.fatal_error or "the engine was stopped"
        self._end_open_requests(message)
        with self._state_lock:
            calls, self._calls = self._calls, {}
        for future in calls.values():
            future.set_exception(EngineUnavailable(message))

    def fail_open_requests(self, message: str) -> int:
        """End every open request now with an error event and cancel it in the engine (a shutdown
        past its grace period); the engine frees their pages at its next step. Returns how many."""
        ended = self._end_open_requests(message)
        for request_id in ended:
            try:
                self._send(("cancel", request_id))
            except EngineUnavailable:
                break
        return len(ended)

    def _end_open_requests(self, message: str) -> list[str]:
        with self._state_lock:
            open_requests, self._open = self._open, {}
        for handle, index in open_requests.values():
            self._deliver(handle, [TokenEvent(index, "", [], [], finish_reason="error", error=message)])
        return list(open_requests)
