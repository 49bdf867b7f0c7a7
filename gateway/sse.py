"""Server-sent events of a model's delta stream, as plain ASGI.

Why not sse-starlette's EventSourceResponse: per response it runs an anyio task group of three or
four tasks (the stream, a pinger, a disconnect listener) with cancel scopes, and on a CPU host where
the model needs every core that machinery was the largest single share of the gateway's own time in
a relayed 1-token answer (docs/routing.md). Here the events are sent from the request's own task and
one plain asyncio task watches the client: it sends a ": ping" comment after `ping_s` without an
event (so proxies keep the connection) and, when the client goes away, cancels the delta stream at
once (the engine frees the request's pages within a step; an upstream's connection is closed) and
stops the sending. However the response ends (finished, failed, client gone before the first event),
the delta stream is cancelled; after a finished stream that is a no-op.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.responses import Response

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]          # nginx: do not buffer the stream


def encode(event: dict) -> bytes:
    """{"data": str, "event": optional str} -> one SSE event (a data line per line of data)."""
    lines = [f"event: {event['event']}"] if event.get("event") else []
    lines += [f"data: {line}" for line in str(event["data"]).split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


@dataclass
class Batch:
    """Events that are ready together, sent in one write; `final`: they end the response (the same
    write ends the body). Every write is a trip through the middleware's send wrappers and a socket
    send on both ends: a relayed 1-token answer went from five writes to three (docs/routing.md)."""
    events: list[dict]
    final: bool = False


class DeltaEventResponse(Response):
    """SSE of `events` (dicts as encode() takes them, or Batches of them), made from the delta
    stream `stream`. A starlette Response (so that FastAPI sends it as it is) whose sending is its own."""

    def __init__(self, events: AsyncIterator[dict], stream, ping_s: float = 15.0):
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events, self.delta_stream, self.ping_s = events, stream, ping_s
        self.client_gone = False
        self.last_sent = 0.0

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()                 # the pinger and the events share `send`
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        self.last_sent = loop.time()
        watcher = loop.create_task(self._watch(receive, send, lock))
        ended = False
        try:
            async for item in self.events:
                if self.client_gone:
                    break
                if isinstance(item, Batch):
                    body, ended = b"".join(encode(event) for event in item.events), item.final
                else:
                    body = encode(item)
                async with lock:
                    await send({"type": "http.response.body", "body": body, "more_body": not ended})
                self.last_sent = loop.time()
                if ended:
                    break
            if not self.client_gone and not ended:
                async with lock:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.delta_stream.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch(self, receive, send, lock: asyncio.Lock) -> None:
        """Until cancelled: ping the client when idle; on its disconnect, cancel the delta stream."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(max(0.0, self.last_sent + self.ping_s - loop.time())):
                    message = await receive()
            except TimeoutError:
                if loop.time() - self.last_sent >= self.ping_s:
                    async with lock:
                        await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                    self.last_sent = loop.time()
                continue
            if message["type"] == "http.disconnect":
                self.client_gone = True
                self.delta_stream.cancel()
                return
