"""`fallbacks`: when a model answers 429 or 5xx or cannot be reached, the next model is tried. The
first delta is awaited before anything is sent to the client, so a stream falls back only before
its first token and never mixes two models' output."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gateway.services.base import ChatCall, PeekedStream, TextCall, UpstreamError

log = logging.getLogger("radixgate.fallback")


class FallbackService:
    """A model and the models to try after it, in order."""

    def __init__(self, name: str, primary, fallbacks: list[tuple[str, object]]):
        self.name, self.primary, self.fallbacks = name, primary, fallbacks
        self.kind = primary.kind

    async def chat(self, call: ChatCall) -> PeekedStream:
        return await self._first(lambda service: service.chat(call))

    async def complete(self, call: TextCall) -> PeekedStream:
        return await self._first(lambda service: service.complete(call))

    async def count_tokens(self, call: ChatCall) -> int:
        return await self._first(lambda service: service.count_tokens(call), stream=False)

    async def _first(self, start: Callable[[object], Awaitable], stream: bool = True):
        chain = [(self.name, self.primary), *self.fallbacks]
        for position, (name, service) in enumerate(chain):
            try:
                answer = await start(service)
                return await PeekedStream.open(answer) if stream else answer
            except UpstreamError as error:
                if not error.retryable or position == len(chain) - 1:
                    raise
                log.warning("model %s failed (%d %s): falling back to %s", name, error.status, error.message,
                            chain[position + 1][0])
        raise AssertionError("unreachable: the last model's error is raised")

    # the fallbacks are models of their own: the router attaches and stops them
    def attach(self, loop) -> None:
        self.primary.attach(loop)

    def stop(self) -> None:
        self.primary.stop()

    def describe(self) -> dict:
        return {**self.primary.describe(), "fallbacks": [name for name, _ in self.fallbacks]}
