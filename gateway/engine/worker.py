"""The engine process: it loads the backend, owns the scheduler and talks to the gateway over one pipe.

Why a process and not a thread of the HTTP server: on a CPU host the model's OpenMP threads need
every core, and an HTTP event loop in the same process holds the GIL and a core at every token
(measured on 2 cores: decode over HTTP at half the in-process speed, docs/cpu.md). In its own
process the engine never waits for the HTTP side's GIL, and a crash inside a kernel ends this
process, not the server: the gateway fails the open requests with an error and says why.

The loop is single-threaded: commands are read between steps (poll, never block while there is
work), and one message carries every token event of a step back to the gateway.

Messages, gateway -> engine:  ("add", [RequestSpec]) | ("cancel", id) | ("call", call_id, name) | ("stop",)
Messages, engine -> gateway:  ("ready", BackendInfo, context_length) | ("failed", message)
                              ("events", [(request_id, TokenEvent)], waiting, adds_handled)
                              ("result", call_id, ok, value) | ("fatal", message)
"""
from __future__ import annotations

import gc
import logging
import multiprocessing.util
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from backends.base import Backend
from gateway.detokenizer import IncrementalDetokenizer, byte_level_table
from gateway.engine.admission import make_policy
from gateway.engine.cache_factory import create_cache
from gateway.engine.page_pool import PagePool
from gateway.engine.parent_watch import exit_with_parent
from gateway.engine.request import Request, TokenEvent
from gateway.engine.sampling import SamplingParams
from gateway.engine.scheduler import Scheduler
from gateway.grammar import GrammarError, GrammarSpec, compiler_for

log = logging.getLogger("radixgate.engine")

IDLE_POLL_S = 0.5          # how long an idle engine sleeps in poll() before looking again


@dataclass(frozen=True)
class EngineSettings:
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    prefill_chunk_tokens: int = 512
    radix_cache: bool = True
    policy: str = "fcfs"                # admission and prefill sharing (gateway/engine/admission.py)
    long_prefill_tokens: int | None = None      # fair: None is half of prefill_chunk_tokens
    max_wait_steps: int = 64            # fair: the age bound
    check_invariants: bool = False      # walk the radix tree after every step (tests)
    write_policy: str = "write_through"    # KV tiers (gateway/engine/tiers.py), when the backend has L2
    disk_cache_dir: str | None = None      # L3 files; None: no L3
    disk_cache_bytes: int = 0


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine process needs to start (picklable: it crosses the process boundary).

    The factories are module-level functions bound to their settings (functools.partial), so the
    engine never imports the layers that build backends and tokenizers.
    """

    make_backend: Callable[[], Backend]
    make_tokenizer: Callable[[], object]
    settings: EngineSettings
    log_level: int = logging.INFO


@dataclass(frozen=True)
class RequestSpec:
    """One choice of an HTTP request, as the gateway submits it."""

    id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str]
    ignore_eos: bool
    wait_for: str | None = None      # id of an earlier choice with the same prompt (n > 1)
    priority: int = 0                # lower first (fair policy)
    grammar: GrammarSpec | None = None   # constrained decoding: the output must match it


def _idle(scheduler: Scheduler) -> bool:
    return not scheduler.running and not scheduler.waiting


def _check(scheduler: Scheduler) -> bool:
    scheduler.check_accounting()
    scheduler.cache.check_invariants()
    return True


# What the gateway may ask of the scheduler by name (a function cannot cross the pipe).
CALLS = {
    "snapshot": Scheduler.snapshot,
    "reset_cache": lambda scheduler: scheduler.cache.reset(),
    "idle": _idle,
    "check": _check,
}


class EngineLoop:
    """The scheduler plus the command handling and the step loop of the engine process."""

    def __init__(self, backend, tokenizer, settings: EngineSettings, conn):
        self.conn = conn
        self.tokenizer = tokenizer
        byte_level_table(tokenizer, True)     # built at start-up, not in the first request's TTFT
        self.settings = settings
        self.context_length = min(backend.info.context_length, backend.num_pages * backend.page_size)
        pool = PagePool(backend.num_pages)
        cache = create_cache(pool, backend, enabled=settings.radix_cache, write_policy=settings.write_policy,
                             disk_cache_dir=settings.disk_cache_dir, disk_cache_bytes=settings.disk_cache_bytes)
        policy = make_policy(settings.policy, cache, prefill_chunk_tokens=settings.prefill_chunk_tokens,
                             long_prefill_tokens=settings.long_prefill_tokens,
                             max_wait_steps=settings.max_wait_steps)
        self.scheduler = Scheduler(
            backend, pool, cache, max_running=settings.max_running_requests,
            prefill_chunk_tokens=settings.prefill_chunk_tokens, context_length=self.context_length,
            policy=policy)
        self.outbox: list[tuple[str, TokenEvent]] = []
        self.adds_handled = 0
        self.fatal_error: str | None = None

    def _emitter(self, request_id: str):
        def emit(event: TokenEvent) -> None:
            self.outbox.append((request_id, event))
        return emit

    def _constraint(self, spec: RequestSpec):
        """A fresh matcher for the spec's grammar; the compiled grammar is cached per schema, so
        only a schema's first request pays the compile (milliseconds, between two steps)."""
        if spec.grammar is None:
            return None
        compiler = compiler_for(self.tokenizer, self.scheduler.backend.info.vocab_size)
        return compiler.constraint(spec.grammar)

    def add(self, specs: list[RequestSpec]) -> None:
        by_id: dict[str, Request] = {}
        for spec in specs:
            try:
                if not spec.prompt_ids:       # nothing to compute logits from: it would wait forever
                    raise ValueError("the prompt has no tokens")
                constraint = self._constraint(spec)
            except (GrammarError, ValueError) as error:   # the gateway validated it; still never crash a step
                self.outbox.append((spec.id, TokenEvent(spec.index, "", [], [], finish_reason="error",
                                                        error=f"invalid request: {error}")))
                continue
            request = Request(
                id=spec.id, index=spec.index, prompt_ids=list(spec.prompt_ids), params=spec.params,
                max_new_tokens=spec.max_new_tokens,
                stop_token_ids=frozenset() if spec.ignore_eos else self.tokenizer.eos_token_ids,
                detokenizer=IncrementalDetokenizer(self.tokenizer, spec.stop),
                emit=self._emitter(spec.id), wait_for=by_id.get(spec.wait_for), priority=spec.priority,
                constraint=constraint)
            by_id[spec.id] = request
            self.scheduler.add(request)
        self.adds_handled += 1

    def handle(self, command: tuple) -> bool:
        """Apply one command; False when it asks the loop to stop."""
        kind = command[0]
        if kind == "add":
            self.add(command[1])
        elif kind == "cancel":
            self.scheduler.cancel(command[1])
        elif kind == "call":
            call_id, name = command[1], command[2]
            try:
                self.conn.send(("result", call_id, True, CALLS[name](self.scheduler)))
            except Exception as error:
                self.conn.send(("result", call_id, False, f"{type(error).__name__}: {error}"))
        elif kind == "stop":
            return False
        else:
            raise ValueError(f"unknown engine command {kind!r}")
        return True

    def step(self) -> None:
        try:
            self.scheduler.step()
            self.scheduler.check_accounting()
            if self.settings.check_invariants:
                self.scheduler.cache.check_invariants()
        except Exception as error:   # keep serving: fail the batch, report what broke
            log.exception("scheduler step failed")
            if self.fatal_error is None:
                self.fatal_error = repr(error)
                self.conn.send(("fatal", self.fatal_error))
            self.scheduler.fail_all(f"internal error: {error}")

    def flush(self) -> None:
        self.conn.send(("events", self.outbox, len(self.scheduler.waiting), self.adds_handled))
        self.outbox = []

    def run(self) -> None:
        reported = (0, 0)
        while True:
            busy = self.scheduler.has_work
            if self.conn.poll(0 if busy else IDLE_POLL_S):
                while True:       # everything that arrived, before the next step
                    if not self.handle(self.conn.recv()):
                        return
                    if not self.conn.poll(0):
                        break
            if self.scheduler.has_work:
                self.step()
            state = (len(self.scheduler.waiting), self.adds_handled)
            if self.outbox or state != reported:
                self.flush()
                reported = state
            self.scheduler.cache.flush_writes()     # copies to lower KV tiers, after the tokens went out


def main(conn, spec: EngineSpec, parent_pid: int, parent_is_main_thread: bool) -> None:
    """Entry point of the engine process (multiprocessing spawn target)."""
    exit_with_parent(parent_pid, parent_is_main_thread)
    # The gateway decides when the engine stops (after its shutdown grace): a terminal's Ctrl-C or a
    # service manager's SIGTERM to the whole process group must not cut the running requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        backend = spec.make_backend()
        tokenizer = spec.make_tokenizer()
        loop = EngineLoop(backend, tokenizer, spec.settings, conn)
    except Exception as error:
        log.exception("engine failed to start")
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    # Everything built so far lives as long as the process: freeze it out of the garbage
    # collector's scans, so a full collection in the step loop stays short.
    gc.collect()
    gc.freeze()
    conn.send(("ready", backend.info, loop.context_length))
    try:
        loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass      # the gateway went away: nothing left to serve
    # Served and stopped: stop the backend's own processes (tensor-parallel followers), then leave
    # without the interpreter's finalisation, where Triton's bindings print a page of "nanobind:
    # leaked ..." at every shutdown (nothing of ours needs it: KV page files are written
    # synchronously, the pipe is done).
    try:
        getattr(backend, "close", lambda: None)()
    except Exception:
        log.exception("closing the backend")
    multiprocessing.util._exit_function()     # what atexit would run: release multiprocessing's semaphores
    logging.shutdown()
    os._exit(0)
