"""gateway/services/http1.py against real sockets on 127.0.0.1: a small HTTP/1.1 server written here
answers each request as the test scripts it (lengths, chunks, pauses, early closes, garbage)."""
from __future__ import annotations

import asyncio

import pytest

from gateway.services import http1
from tests.conftest import free_port


class ScriptedServer:
    """Reads one request at a time per connection and answers with `script(request_number, head)`:
    an async function that writes onto the writer. Counts connections and what each request carried."""

    def __init__(self, script):
        self.script, self.connections, self.requests, self.closed = script, 0, [], asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if await self.script(len(self.requests), head, reader, writer) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def client_of(server, read_timeout_s=5.0) -> http1.HTTPClient:
    return http1.HTTPClient(server.url, connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


def run(coro):
    return asyncio.run(coro)


def test_a_body_read_whole_and_the_connection_kept_for_the_next_request():
    async def script(n, head, reader, writer):
        writer.write(ok(b'{"n": %d}' % n))

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            for n in (1, 2, 3):
                response = await client.request("POST", "/v1/chat/completions", b'{"hello": 1}')
                assert response.status == 200 and response.headers[b"content-length"] == b"8"
                assert await response.read() == b'{"n": %d}' % n
            head, body = server.requests[0]
            assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and body == b'{"hello": 1}'
            assert b"Host: 127.0.0.1:" in head
            assert server.connections == 1              # one kept-alive connection for all three
            client.close()
    run(main())


def test_a_chunked_stream_arrives_piece_by_piece_as_sent():
    release = asyncio.Event()

    async def script(n, head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n"))
        await writer.drain()
        await release.wait()
        writer.write(chunk(b"data: two\n\n") + b"0\r\n\r\n")

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            response = await client.request("POST", "/v1/x", b"{}")
            pieces = response.pieces()
            assert await anext(pieces) == b"data: one\n\n"       # before the server sends the rest
            release.set()
            assert [p async for p in pieces] == [b"data: two\n\n"]
            again = await client.request("POST", "/v1/x", b"{}")  # complete: the connection is reused
            release.set()
            assert await again.read() == b"data: one\n\ndata: two\n\n"
            assert server.connections == 1
            client.close()
    run(main())


def test_an_idle_connection_the_server_closed_is_replaced_and_the_request_sent_again():
    async def script(n, head, reader, writer):
        writer.write(ok(b"first" if n == 1 else b"again"))
        return "close" if n == 1 else None          # the server ends its side after the first answer

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            assert await (await client.request("POST", "/v1/x", b"{}")).read() == b"first"
            await server.closed.wait()
            await asyncio.sleep(0.05)
            assert await (await client.request("POST", "/v1/x", b"{}")).read() == b"again"
            assert server.connections == 2
            client.close()
    run(main())


def test_connection_close_is_not_reused_and_a_body_to_eof_is_read():
    async def script(n, head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        return "close"

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            for _ in range(2):
                assert await (await client.request("GET", "/v1/models")).read() == b"until the end"
            assert server.connections == 2
            client.close()
    run(main())


def test_a_read_that_waits_past_its_timeout_is_a_timeout_and_the_connection_is_dropped():
    async def script(n, head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n"))
        await reader.read()                           # until the client closes its side
        return "close"

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server, read_timeout_s=0.3)
            response = await client.request("POST", "/v1/x", b"{}")
            with pytest.raises(http1.Timeout):
                [p async for p in response.pieces()]
            await asyncio.wait_for(server.closed.wait(), 2)    # the client closed its side
            client.close()
    run(main())


def test_no_headers_within_the_timeout_is_a_timeout():
    async def script(n, head, reader, writer):
        await asyncio.sleep(5)

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server, read_timeout_s=0.3)
            with pytest.raises(http1.Timeout):
                await client.request("POST", "/v1/x", b"{}")
            client.close()
    run(main())


def test_refused_garbage_and_a_reset_mid_body_are_transport_errors():
    async def garbage(n, head, reader, writer):
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async def cut(n, head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        return "close"

    async def main():
        refused = http1.HTTPClient(f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=2.0,
                                   read_timeout_s=2.0)             # a port nobody listens on
        with pytest.raises(http1.TransportError) as error:
            await refused.request("GET", "/v1/models")
        assert not isinstance(error.value, http1.Timeout) and "cannot connect" in str(error.value)
        async with ScriptedServer(garbage) as server:
            with pytest.raises(http1.TransportError, match="malformed"):
                await client_of(server).request("GET", "/v1/models")
        async with ScriptedServer(cut) as server:
            response = await client_of(server).request("GET", "/v1/models")
            with pytest.raises(http1.TransportError, match="closed"):
                await response.read()
    run(main())


def test_closing_a_response_mid_stream_closes_its_connection():
    async def script(n, head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n"))
        await writer.drain()
        await reader.read()                           # until the client closes its side
        return "close"

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            response = await client.request("POST", "/v1/x", b"{}")
            assert await anext(response.pieces()) == b"data: one\n\n"
            response.close()
            await asyncio.wait_for(server.closed.wait(), 2)      # the server sees the client gone
            assert not client._idle
            client.close()
    run(main())


def test_a_large_body_goes_out_whole_and_a_slow_reader_is_paused_not_flooded():
    big = bytes(range(256)) * (3 * http1.PAUSE_BYTES // 256)

    async def script(n, head, reader, writer):
        writer.write(ok(big))

    async def main():
        async with ScriptedServer(script) as server:
            client = client_of(server)
            upload = b"x" * 200_000
            response = await client.request("POST", "/v1/x", upload)
            await asyncio.sleep(0.2)                  # the server sends while nobody reads
            assert response._connection.buffered <= http1.PAUSE_BYTES + (1 << 18)
            assert await response.read() == big
            assert server.requests[0][1] == upload
            client.close()
    run(main())


def test_at_most_max_open_responses_and_a_wait_past_the_connect_timeout_is_a_timeout():
    async def script(n, head, reader, writer):
        writer.write(ok(b"done %d" % n))

    async def main():
        async with ScriptedServer(script) as server:
            client = http1.HTTPClient(server.url, connect_timeout_s=0.3, read_timeout_s=5.0, max_open=1)
            first = await client.request("GET", "/v1/models")           # open until read or closed
            with pytest.raises(http1.Timeout, match="busy"):
                await client.request("GET", "/v1/models")
            waiting = asyncio.ensure_future(client.request("GET", "/v1/models"))
            await asyncio.sleep(0.05)
            assert not waiting.done()                                  # waits for the open one
            assert await first.read() == b"done 1"
            assert await (await waiting).read() == b"done 2"
            client.close()
    run(main())
