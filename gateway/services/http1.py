"""A small HTTP/1.1 client for the worker pools: kept-alive connections to one origin, a request with
a body, and its response read whole or as the body's pieces as they arrive.

Why our own: the hop through the gateway is mostly the gateway's own Python per request, and a
general client does work a relay does not need on every request and every read (aiohttp builds a
request object, a payload writer, a cookie jar lookup, re-arms a read timer on every packet...).
Here one asyncio Protocol per connection feeds httptools' C parser (uvicorn's) and the parser's
callbacks append body pieces to a list; a read timer is armed only while a reader actually waits.
docs/routing.md has the CPU per relayed request of both.

Failures are `TransportError` (refused, reset, malformed answer) or `Timeout` (connect or a read
waited longer than its timeout). A request sent on a kept-alive connection that the server had
closed meanwhile (nothing came back, not one byte) is sent once more on a new connection, as
browsers and other clients do; any later failure is the caller's.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# A kept-alive connection idle this long is not reused: uvicorn closes its side after 5 s of quiet,
# and a request written into a socket the server is closing can be lost.
IDLE_REUSE_S = 4.0
PAUSE_BYTES = 1 << 20           # a reader this far behind pauses the socket (flow control)


class TransportError(Exception):
    """The request got no (complete) answer: connect refused, connection reset, unparseable reply."""


class Timeout(TransportError):
    """Connecting, or one wait for the next bytes, took longer than its timeout."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: TransportError | None = None
        self.received_any = False
        self.idle_since = 0.0
        self.closed_here = False
        self._waiter: asyncio.Future | None = None

    # ---- asyncio.Protocol ----
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(TransportError(f"malformed HTTP answer: {error}"))

    def eof_received(self) -> bool:
        return False                               # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.transport = None
        if exc is None and not self.closed_here and self.headers_done and not self.complete and self._ends_at_eof():
            self.complete, self.keep_alive = True, False     # a body without a length ends with the connection
        if not self.complete and self.error is None:
            self.error = TransportError(f"connection closed by the upstream{f': {exc}' if exc else ''}")
        self._wake()

    def _ends_at_eof(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # ---- httptools callbacks ----
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # ---- the request's side ----
    def _fail(self, error: TransportError) -> None:
        self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Until the parser or the transport has news (headers, a piece, the end, an error)."""
        self._waiter = self.loop.create_future()
        timer = None
        if timeout_s is not None:
            timer = self.loop.call_later(timeout_s, self._timed_out, self._waiter)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _timed_out(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self._fail(Timeout("the upstream sent nothing within the read timeout"))

    def take(self) -> list[bytes]:
        pieces, self.pieces, self.buffered = self.pieces, [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return pieces

    def reset(self) -> None:
        """Ready for the next request on this kept-alive connection."""
        self.status, self.headers, self.pieces, self.buffered = 0, [], [], 0
        self.headers_done = self.complete = self.received_any = False
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (self.transport is not None and not self.transport.is_closing() and self.error is None
                and time.monotonic() - self.idle_since < IDLE_REUSE_S)

    def close(self) -> None:
        self.closed_here = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Response:
    """Status and headers as they came; the body read whole (read) or as pieces (pieces)."""

    def __init__(self, client: HTTPClient, connection: _Connection, read_timeout_s: float | None):
        self._client, self._connection, self._read_timeout_s = client, connection, read_timeout_s
        self.status = connection.status
        self.headers = dict(connection.headers)
        self._done = False

    async def pieces(self) -> AsyncIterator[bytes]:
        connection = self._connection
        try:
            while True:
                for piece in connection.take():
                    yield piece
                if connection.complete:
                    break
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self._read_timeout_s)
        finally:
            self.release()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.pieces()])

    def release(self) -> None:
        """A completed answer gives its connection back to the pool; anything else closes it."""
        if self._done:
            return
        self._done = True
        self._client._open.release()
        connection = self._connection
        if connection.complete and connection.keep_alive and connection.error is None:
            self._client._put_back(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Stop reading now: the connection closes (the upstream sees the client gone)."""
        if not self._done:
            self._done = True
            self._client._open.release()
            self._connection.close()
            self._connection._wake()


class HTTPClient:
    """Requests to one origin (scheme://host:port), over a pool of kept-alive connections."""

    def __init__(self, base_url: str, connect_timeout_s: float, read_timeout_s: float | None,
                 max_open: int = 256):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = parts.port is None or parts.port == (443 if parts.scheme == "https" else 80)
        self.host_header = (parts.hostname if default_port else f"{parts.hostname}:{parts.port}").encode()
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._idle: list[_Connection] = []
        # at most max_open responses open at once (more wait for one to end), so a burst of clients
        # cannot open more sockets to one worker than either side has file descriptors for
        self.max_open = max_open
        self._open = asyncio.Semaphore(max_open)

    async def request(self, method: str, path: str, body: bytes = b"", content_type: bytes = b"application/json",
                      timeout_s: float | None = None) -> Response:
        """Send; return once the status and headers are in (the body is read from the Response)."""
        read_timeout = self.read_timeout_s if timeout_s is None else timeout_s
        head = b"".join([method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self.host_header,
                         b"\r\nContent-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode(),
                         b"\r\nAccept: */*\r\n\r\n"])
        try:                                           # waiting for a slot counts as connecting (as aiohttp's pool)
            if self._open.locked():                    # a timer only when there is a wait
                async with asyncio.timeout(self.connect_timeout_s):
                    await self._open.acquire()
            else:
                await self._open.acquire()             # free: returns at once
        except TimeoutError:
            raise Timeout(f"every connection to {self.host}:{self.port} is busy (at most "
                          f"{self.max_open}) and none freed within {self.connect_timeout_s} s") from None
        try:                                           # the Response gives the slot back when it ends
            return await self._send(head, body, read_timeout)
        except BaseException:
            self._open.release()
            raise

    async def _send(self, head: bytes, body: bytes, read_timeout: float | None) -> Response:
        for attempt in range(2):
            connection, reused = await self._connection()
            connection.transport.writelines([head, body])
            try:
                while not connection.headers_done:
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait(read_timeout)
            except TransportError as error:
                connection.close()
                if reused and not connection.received_any and attempt == 0 and not isinstance(error, Timeout):
                    continue                           # the server had closed it: once more, on a new one
                raise
            except BaseException:
                connection.close()
                raise
            return Response(self, connection, read_timeout)
        raise AssertionError("unreachable")

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(lambda: _Connection(loop), self.host, self.port,
                                                             ssl=self.ssl)
        except TimeoutError:
            raise Timeout(f"connecting to {self.host}:{self.port} took over {self.connect_timeout_s} s") from None
        except OSError as error:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {error.strerror or error}") from None
        return connection, False

    def _put_back(self, connection: _Connection) -> None:
        connection.reset()
        self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
