"""One worker: any OpenAI-compatible server (another radixgate, vLLM, SGLang, llama.cpp) reached
over HTTP with a kept-alive connection pool."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from gateway.services.base import ChatCall, Delta, ListStream, TextCall, UpstreamError, Usage
from gateway.services.openai_wire import ChunkReader, chat_body, error_of, response_deltas, text_body


def transport_error(url: str, error: httpx.HTTPError) -> UpstreamError:
    """A request that never got an answer: 504 when it timed out, else 502 (refused, reset, DNS)."""
    if isinstance(error, httpx.TimeoutException):
        return UpstreamError(504, f"The upstream {url} did not answer in time ({type(error).__name__}).",
                             code="upstream_timeout")
    return UpstreamError(502, f"The upstream {url} cannot be reached: {error or type(error).__name__}.",
                         code="upstream_unreachable")


class WorkerStream:
    """Server-sent chunks of one streamed answer -> deltas. A failure before the first delta raises
    (the pool may try another worker); after it, it ends the stream as an error delta."""

    prompt_tokens = None

    def __init__(self, url: str, response: httpx.Response, chat: bool):
        self.url, self.response = url, response
        self.reader = ChunkReader(chat)
        self.usage = Usage()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        started = False
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":       # read on to the body's end: a response closed early
                    continue               # takes its kept-alive connection with it
                for delta in self.reader.read(json.loads(data)):
                    if delta.error and not started:
                        raise UpstreamError(502, f"{self.url}: {delta.error}")
                    started = True
                    yield delta
        except httpx.HTTPError as error:
            if not started:
                raise transport_error(self.url, error) from None
            yield Delta(0, finish_reason="error", error=f"the upstream {self.url} failed mid-stream: {error}")
        finally:
            await self.response.aclose()
            self.usage = self.reader.usage or self.usage

    def cancel(self) -> None:
        asyncio.ensure_future(self.response.aclose())


class WorkerClient:
    """Chat and text completions sent to one worker's …/v1 endpoints."""

    kind = "worker"

    def __init__(self, base_url: str, model: str, timeout_s: float, health_timeout_s: float):
        self.url = base_url.rstrip("/")
        self.model = model
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self.health_timeout_s = health_timeout_s
        self.client: httpx.AsyncClient | None = None

    def attach(self, loop) -> None:
        # keep-alive connections: the hop costs a request on an open socket, not a TCP handshake
        self.client = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_keepalive_connections=64))

    def stop(self) -> None:
        self.client = None

    async def chat(self, call: ChatCall):
        return await self._send("/chat/completions", chat_body(call, self.model), call.stream, True)

    async def complete(self, call: TextCall):
        return await self._send("/completions", text_body(call, self.model), call.stream, False)

    async def _send(self, path: str, body: dict, stream: bool, chat: bool):
        assert self.client is not None, "attach() first"
        try:
            request = self.client.build_request("POST", self.url + path, json=body)
            response = await self.client.send(request, stream=stream)
            if response.status_code != 200:
                content = await response.aread()
                await response.aclose()
                raise error_of(response.status_code, content)
            if stream:
                return WorkerStream(self.url, response, chat)
            deltas, usage = response_deltas(response.json(), chat)
            return ListStream(deltas, usage)
        except httpx.HTTPError as error:
            raise transport_error(self.url, error) from None

    async def probe(self) -> bool:
        """Whether the worker answers GET …/v1/models (every OpenAI-compatible server has it)."""
        try:
            response = await self.client.get(self.url + "/models", timeout=self.health_timeout_s)
            return response.status_code == 200
        except httpx.HTTPError:
            return False
