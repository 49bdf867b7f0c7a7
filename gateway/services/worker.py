"""One worker: any OpenAI-compatible server (another radixgate, vLLM, SGLang, llama.cpp) reached
over HTTP with kept-alive connections (gateway/services/http1.py: on a CPU-bound host the hop through
the gateway is mostly the gateway's own Python per request, and a relay needs less of it than a
general client spends)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from gateway.services.base import ChatCall, Delta, ListStream, TextCall, UpstreamError, Usage
from gateway.services.http1 import HTTPClient, Response, Timeout, TransportError
from gateway.services.openai_wire import ChunkReader, chat_body, error_of, response_deltas, text_body

# What a request that never got an answer raised: a timeout (504) or anything else of the transport (502).
TIMEOUTS = (Timeout, asyncio.TimeoutError)
TRANSPORT_ERRORS = (TransportError, asyncio.TimeoutError, OSError)


def transport_error(url: str, error: BaseException) -> UpstreamError:
    """A request that never got an answer: 504 when it timed out, else 502 (refused, reset, DNS)."""
    if isinstance(error, TIMEOUTS):
        return UpstreamError(504, f"The upstream {url} did not answer in time ({error or type(error).__name__}).",
                             code="upstream_timeout")
    return UpstreamError(502, f"The upstream {url} cannot be reached: {error or type(error).__name__}.",
                         code="upstream_unreachable")


class WorkerStream:
    """Server-sent chunks of one streamed answer -> deltas. A failure before the first delta raises
    (the pool may try another worker); after it, it ends the stream as an error delta."""

    prompt_tokens = None

    def __init__(self, url: str, response: Response, chat: bool):
        self.url, self.response = url, response
        self.reader = ChunkReader(chat)
        self.usage = Usage()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        started = False
        try:
            async for line in self._lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":      # read on to the body's end: a response released early
                    continue               # takes its kept-alive connection with it
                for delta in self.reader.read(json.loads(data)):
                    if delta.error and not started:
                        raise UpstreamError(502, f"{self.url}: {delta.error}")
                    started = True
                    yield delta
        except TRANSPORT_ERRORS as error:
            if not started:
                raise transport_error(self.url, error) from None
            yield Delta(0, finish_reason="error", error=f"the upstream {self.url} failed mid-stream: {error}")
        finally:
            self.response.release()
            self.usage = self.reader.usage or self.usage

    async def _lines(self) -> AsyncIterator[bytes]:
        """The body's lines as they arrive, of any length (line readers with a cap, as aiohttp's at
        64 KB, stop short of one chunk with many logprobs)."""
        rest = b""
        async for piece in self.response.pieces():
            *lines, rest = (rest + piece).split(b"\n")
            for line in lines:
                yield line
        if rest:
            yield rest

    def cancel(self) -> None:
        self.response.close()       # drops the connection: the worker sees the client gone and stops


async def count_by_generating(service, call: ChatCall) -> int:
    """The prompt tokens of `call` as `service` counts them, by a one-token completion of it (its
    usage): for OpenAI-compatible workers, which have no counting endpoint of their own. It costs the
    worker one prefill, which its prefix cache keeps for the request that usually follows."""
    sampling = call.sampling.model_copy(update={"n": 1, "stream": False, "stream_options": None, "stop": None})
    one = ChatCall(call.messages, sampling, max_tokens=1, tools=call.tools)
    stream = await service.chat(one)
    async for delta in stream:
        if delta.error:
            raise UpstreamError(502, delta.error)
    return stream.usage.prompt_tokens


class WorkerClient:
    """Chat and text completions sent to one worker's …/v1 endpoints."""

    kind = "worker"

    def __init__(self, base_url: str, model: str, timeout_s: float, health_timeout_s: float):
        self.url = base_url.rstrip("/")
        self.path = urlsplit(self.url).path
        self.model = model
        self.timeout_s, self.health_timeout_s = timeout_s, health_timeout_s
        self.client: HTTPClient | None = None

    def attach(self, loop) -> None:
        # timeout_s bounds each wait for the upstream (connecting, then every read), not the whole
        # answer: a long stream that keeps sending is never cut
        self.client = HTTPClient(self.url, connect_timeout_s=min(self.timeout_s, 5.0), read_timeout_s=self.timeout_s)

    def stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    async def chat(self, call: ChatCall):
        return await self._send("/chat/completions", chat_body(call, self.model), call.stream, True)

    async def complete(self, call: TextCall):
        return await self._send("/completions", text_body(call, self.model), call.stream, False)

    async def count_tokens(self, call: ChatCall) -> int:
        return await count_by_generating(self, call)

    async def _send(self, path: str, body: dict, stream: bool, chat: bool):
        assert self.client is not None, "attach() first"
        try:
            response = await self.client.request("POST", self.path + path, json.dumps(body).encode())
            if response.status != 200:
                raise error_of(response.status, await response.read())
            if stream:
                return WorkerStream(self.url, response, chat)
            deltas, usage = response_deltas(json.loads(await response.read()), chat)
            return ListStream(deltas, usage)
        except TRANSPORT_ERRORS as error:
            raise transport_error(self.url, error) from None
        except ValueError as error:                     # a 200 whose body is not JSON
            raise UpstreamError(502, f"The upstream {self.url} answered with a body that is not JSON: {error}",
                                code="upstream_bad_answer") from None

    async def probe(self) -> bool:
        """Whether the worker answers GET …/v1/models (every OpenAI-compatible server has it)."""
        try:
            async with asyncio.timeout(self.health_timeout_s):
                response = await self.client.request("GET", self.path + "/models", timeout_s=self.health_timeout_s)
                await response.read()
                return response.status == 200
        except TRANSPORT_ERRORS:
            return False
