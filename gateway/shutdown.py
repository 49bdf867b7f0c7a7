"""Graceful shutdown: on SIGTERM (or Ctrl-C) stop admitting, let running requests finish, free every page.

1. New requests get 503 with Retry-After (the listening socket stays open, so clients get an answer
   they can act on rather than a refused connection); /health answers "draining" with 503.
2. Running requests get `server.shutdown_grace_s` to finish; a second signal ends the wait at once.
3. Local requests still open then end with an error event of their API and are cancelled in the engine.
4. Every engine is checked: no KV page held by a request or locked in the radix cache (logged per model).
5. uvicorn closes the connections, the lifespan stops the engines, `radixgate serve` exits 0
   (1 when a page was still held: a leak is reported, never hidden).
"""
from __future__ import annotations

import asyncio
import logging
import math
import signal

import uvicorn
from starlette.requests import Request

from gateway.engine.engine import EngineUnavailable
from gateway.errors import error_response

log = logging.getLogger("radixgate.shutdown")

# Probes keep answering while draining: load balancers read "draining" there and stop sending.
PROBE_PATHS = frozenset({"/health", "/metrics"})
CANCEL_WAIT_S = 10.0         # after the grace: for cancelled streams to send their error event
IDLE_WAIT_S = 30.0           # for an engine to drop cancelled requests (it may be inside a long step)
SHUTTING_DOWN = "The server is shutting down and accepts no new requests; retry later or on another instance."
CUT_SHORT = ("The server is shutting down: this request did not finish within the shutdown grace period "
             "(server.shutdown_grace_s) and was cancelled.")


class Drain:
    """The shutdown state shared by the HTTP middleware, the signal handler and the lifespan."""

    def __init__(self, grace_s: float, router):
        self.grace_s = grace_s
        self.router = router
        self.draining = False
        self.in_flight = 0                   # HTTP requests being served (probes not counted)
        self.exit_code = 0
        self.on_drained = lambda: None       # set by the server: close and exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.grace_s))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._idle, self._hurry = asyncio.Event(), asyncio.Event()
        self._idle.set()

    def request_started(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def request_ended(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0, self.in_flight
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def signal(self, sig: int) -> None:
        """From the signal handler (main thread): the first signal starts the drain, the next ends its grace."""
        if self._loop is None or self._loop.is_closed():
            self.on_drained()
            return
        self.draining = True
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._task is None:
            log.warning("%s: no new requests; %d running get up to %gs to finish", name, self.in_flight,
                        self.grace_s)
            self._task = self._loop.create_task(self._run())
        else:
            log.warning("%s again: the grace period ends now", name)
            self._hurry.set()

    async def _wait_idle(self, timeout_s: float) -> bool:
        hurry = asyncio.ensure_future(self._hurry.wait())
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait({idle, hurry}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            idle.cancel()
        return self._idle.is_set()

    async def _run(self) -> None:
        try:
            if not await self._wait_idle(self.grace_s):
                ended = sum(m.engine.fail_open_requests(CUT_SHORT) for m in self.router.models.values())
                log.warning("grace period over: %d request(s) ended with an error; %d HTTP request(s) open",
                            ended, self.in_flight)
                self._hurry.clear()
                if not await self._wait_idle(CANCEL_WAIT_S):
                    log.warning("%d HTTP request(s) still open: the server closes them", self.in_flight)
            if not await self.check_pages():
                self.exit_code = 1
        except Exception:
            log.exception("graceful shutdown failed")
            self.exit_code = 1
        finally:
            self.on_drained()

    async def check_pages(self) -> bool:
        """Every engine idle, its accounting exact, no page held by a request or locked; logged per model."""
        clean = True
        for name, model in self.router.models.items():
            engine = model.engine
            try:
                for _ in range(int(IDLE_WAIT_S / 0.05)):
                    if await engine.call("idle"):
                        break
                    await asyncio.sleep(0.05)
                await engine.call("check")           # free + cached + held == total, tree invariants
                snap = await engine.call("snapshot")
            except (EngineUnavailable, RuntimeError) as error:
                log.error("shutdown: model %s: cannot check its KV pages: %s", name, error)
                clean = False
                continue
            cache = snap["radix_cache_stats"]
            in_use = snap["kv_pages_held_by_requests"] + cache["protected_pages"]
            clean = clean and in_use == 0 and snap["running_requests"] == 0 and snap["waiting_requests"] == 0
            report = log.info if in_use == 0 else log.error
            report("shutdown: model %s: %d of %d KV pages in use (%d free, %d cached), %d running, %d waiting",
                   name, in_use, snap["kv_pages_total"], snap["kv_pages_free"], cache["evictable_pages"],
                   snap["running_requests"], snap["waiting_requests"])
        return clean


class DrainMiddleware:
    """Plain ASGI: counts the requests being served and answers 503 once draining (probes excepted)."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            response = error_response(Request(scope), 503, SHUTTING_DOWN, "server_error", code="shutting_down",
                                      headers={"Retry-After": str(self.drain.retry_after_s)})
            return await response(scope, receive, send)
        self.drain.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.request_ended()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain first (above) instead of closing at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        drain.on_drained = self._close

    def _close(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after serving, and the
        # process would end by the signal instead of with its exit code.
        if self.should_exit:
            self.force_exit = sig == signal.SIGINT     # a Ctrl-C while closing: stop waiting
            return
        self.drain.signal(sig)
