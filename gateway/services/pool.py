"""A replicated model: one name, several replicas (workers, or litellm deployments sharing a name).

Each request goes to the replica the routing policy picks (cache-aware by default); one that fails
before producing anything is retried on another replica, with backoff when it must be the same one.
Replicas that cannot be reached leave the pool until a health check brings them back; replicas that
keep failing (429, 5xx) cool down for a while, as LiteLLM's router does with allowed_fails.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.config import RoutingConfig
from gateway.services.base import ChatCall, Delta, PeekedStream, TextCall, UpstreamError, WrappedStream
from gateway.services.prefix_router import POLICIES, PrefixTree, Replica, chat_key, text_key

log = logging.getLogger("radixgate.pool")

BACKOFF_S = 0.05                # the first wait before retrying on the same replica; doubles each time
FAIL_WINDOW_S = 60.0


class PooledStream(WrappedStream):
    """A replica's stream; the replica's in-flight count drops once it ends or is cancelled."""

    def __init__(self, inner: PeekedStream, release: Callable[[], None]):
        super().__init__(inner)
        self._release = release

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for delta in self.inner:
                yield delta
        finally:
            self.release()

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def cancel(self) -> None:
        super().cancel()
        self.release()


class PoolService:
    """Name -> the replica the policy picks -> its stream of deltas."""

    kind = "pool"

    def __init__(self, name: str, replicas: list[Replica], cfg: RoutingConfig, num_retries: int):
        assert replicas, "a pool needs at least one replica"
        self.name, self.replicas, self.cfg = name, replicas, cfg
        self.policy = POLICIES[cfg.policy](cfg)
        self.num_retries = num_retries
        self._watch: asyncio.Task | None = None

    async def chat(self, call: ChatCall) -> PooledStream:
        return await self._open(_chat_key(call), lambda service: service.chat(call))

    async def complete(self, call: TextCall) -> PooledStream:
        return await self._open(text_key(call.prompt), lambda service: service.complete(call))

    async def count_tokens(self, call: ChatCall) -> int:
        """Counted by the replica the chat itself would go to (a worker counts by a one-token
        completion, which leaves the prompt in that worker's cache), failing over as a chat does."""
        return await self._open(_chat_key(call), lambda service: service.count_tokens(call), stream=False)

    async def _open(self, key: str, start: Callable[[object], Awaitable], stream: bool = True):
        """Another replica is tried at once after a failure; trying one that failed already is a
        retry (num_retries of them, with exponential backoff)."""
        failed: set[int] = set()
        retries, last_error = 0, None
        while True:
            now = time.monotonic()
            candidates = [r for r in self.replicas if r.available(now)]
            if not candidates and not failed:         # all down at the last probe: try them, one may be back
                candidates = [r for r in self.replicas if not r.healthy and now >= r.cooldown_until]
            if not candidates:
                raise last_error or UpstreamError(
                    503, f"No replica of the model `{self.name}` is available (all down or cooling down).",
                    code="no_healthy_replica")
            fresh = [r for r in candidates if id(r) not in failed]
            if not fresh:
                if retries == self.num_retries:
                    raise last_error
                await asyncio.sleep(BACKOFF_S * 2 ** retries)
                retries += 1
                failed.clear()
                continue
            replica = self.policy.choose(key, fresh)
            replica.tree.insert(key)                   # later requests with this prefix follow it here
            replica.in_flight += 1
            try:
                answer = await start(replica.service)
                if not stream:
                    self._done(replica)
                    return answer
                opened = await PeekedStream.open(answer)
            except UpstreamError as error:
                replica.in_flight -= 1
                if not error.retryable:
                    raise
                last_error = error
                self._failed(replica, error)
                failed.add(id(replica))
                log.info("model %s: %s failed before answering (%d %s)", self.name, replica.name, error.status,
                         error.message)
                continue
            except BaseException:
                replica.in_flight -= 1
                raise
            return PooledStream(opened, lambda r=replica: self._done(r))

    def _done(self, replica: Replica) -> None:
        replica.in_flight -= 1
        assert replica.in_flight >= 0, (replica.name, replica.in_flight)

    def _failed(self, replica: Replica, error: UpstreamError) -> None:
        now = time.monotonic()
        if error.status == 502 and hasattr(replica.service, "probe"):
            self._set_health(replica, False, str(error.message))    # unreachable: out until a probe answers
            return
        if len(self.replicas) == 1:          # nothing to send its requests to instead (as LiteLLM)
            return
        replica.failures = [t for t in replica.failures if now - t < FAIL_WINDOW_S] + [now]
        if len(replica.failures) > self.cfg.allowed_fails:
            replica.cooldown_until = now + self.cfg.cooldown_time_s
            replica.failures.clear()
            log.warning("model %s: %s cools down for %.1f s", self.name, replica.name, self.cfg.cooldown_time_s)

    def _set_health(self, replica: Replica, healthy: bool, why: str = "") -> None:
        if replica.healthy == healthy:
            return
        replica.healthy = healthy
        if healthy:
            log.warning("model %s: %s is back", self.name, replica.name)
        else:
            replica.tree.clear()          # its cache is gone or unknown: do not route by it
            log.warning("model %s: %s is down: %s", self.name, replica.name, why)

    async def _watch_health(self) -> None:
        probed = [r for r in self.replicas if hasattr(r.service, "probe")]
        while probed:
            results = await asyncio.gather(*(r.service.probe() for r in probed))
            for replica, ok in zip(probed, results, strict=True):
                self._set_health(replica, ok, "no answer to the health check")
            await asyncio.sleep(self.cfg.health_interval_s)

    def attach(self, loop) -> None:
        for replica in self.replicas:
            replica.service.attach(loop)
        self._watch = loop.create_task(self._watch_health())

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for replica in self.replicas:
            with contextlib.suppress(Exception):
                replica.service.stop()

    def describe(self) -> dict:
        now = time.monotonic()
        return {"kind": self.kind, "policy": self.cfg.policy, "replicas": [
            {"name": r.name, "healthy": r.healthy, "cooling_down": now < r.cooldown_until,
             "in_flight": r.in_flight, "tree_chars": r.tree.chars} for r in self.replicas]}


def _chat_key(call: ChatCall) -> str:
    """The routing key of a chat: its messages and the names of the tools it offers."""
    return chat_key(call.messages, sorted(f["name"] for f in call.tools.functions) if call.tools else [])


def replica(name: str, service, cfg: RoutingConfig) -> Replica:
    return Replica(name, service, PrefixTree(cfg.max_tree_chars))
