"""A delta stream that ends with an error delta when its model produces nothing for too long, so a
stalled engine or upstream cannot hold a client (and its key's stream slot) forever."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.services.base import Delta, DeltaStream, WrappedStream


class IdleTimeoutStream(WrappedStream):
    """`inner`'s deltas; after `timeout_s` without one (the wait for the first included) the inner
    stream is cancelled and one error delta ends this one. Time the consumer spends between deltas
    (a slow client) does not count: only the wait for the next delta is timed."""

    def __init__(self, inner: DeltaStream, timeout_s: float):
        super().__init__(inner)
        self.timeout_s = timeout_s

    async def __aiter__(self) -> AsyncIterator[Delta]:
        deltas = self.inner.__aiter__()
        while True:
            # a timer per delta (call_at, no task), not asyncio.wait_for: that wraps each wait in a task
            deadline = asyncio.timeout(self.timeout_s)
            try:
                async with deadline:
                    delta = await deltas.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not deadline.expired():
                    raise                      # the stream's own TimeoutError, not ours
                self.inner.cancel()
                yield Delta(0, finish_reason="error", error_status=504,
                            error=f"The model produced nothing for {self.timeout_s:g} s "
                                  "(server.limits.stream_idle_timeout_s); the request was ended.")
                return
            yield delta
