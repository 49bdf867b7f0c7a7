"""The model seam: an API surface hands a model service one internal request and reads a stream of
deltas back. Local engines, litellm providers and pools of workers implement the same interface, so
no route handler reaches into a tokenizer or an engine (the request path in DESIGN.md)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from gateway.errors import APIError
from gateway.protocol import SamplingFields
from gateway.tools import ToolSet

# (token text, logprob, [(token text, logprob), ...]) per generated token
TokenLogprob = tuple[str, float, list[tuple[str, float]]]


@dataclass
class ChatCall:
    """One chat request, whichever API surface it came in through."""

    messages: list[dict]                       # OpenAI chat messages (template form)
    sampling: SamplingFields                   # temperature, top_p, n, stop, seed, ... (model = the alias asked for)
    max_tokens: int | None = None
    tools: ToolSet | None = None
    response_format: dict | None = None        # the chat completions shape
    format_param: str = "response_format"      # the field a bad schema is reported against
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False


@dataclass
class TextCall:
    """One text completion request (/v1/completions)."""

    prompt: str | list                         # as the client sent it: text(s) or token ids
    sampling: SamplingFields
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False


@dataclass
class Delta:
    """What one choice produced since the last delta."""

    index: int
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # complete calls: {"name", "arguments"}
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None           # the stop string that ended the choice, when known
    error: str | None = None
    error_status: int = 500                    # a non-streamed answer ending in `error` gets this status


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class DeltaStream(Protocol):
    """Deltas of every choice in arrival order; `usage` is final once the stream is exhausted."""

    usage: Usage
    prompt_tokens: int | None                  # known before generation (local), else None

    def __aiter__(self) -> AsyncIterator[Delta]: ...
    def cancel(self) -> None: ...


class ModelService(Protocol):
    """Name -> stream of deltas. `chat`/`complete` raise APIError for anything refused before the
    first delta (bad input 4xx, an upstream's own status); later failures arrive as a Delta.error."""

    kind: str                                  # local | litellm | pool

    async def chat(self, call: ChatCall) -> DeltaStream: ...
    async def complete(self, call: TextCall) -> DeltaStream: ...
    async def count_tokens(self, call: ChatCall) -> int: ...   # the prompt's tokens (call.max_tokens unused)
    def attach(self, loop) -> None: ...
    def stop(self) -> None: ...
    def describe(self) -> dict: ...


class UpstreamError(APIError):
    """A remote model or worker refused or failed: the upstream's status, as an OpenAI error."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        default_type = "rate_limit_error" if status == 429 else (
            "server_error" if status >= 500 else "invalid_request_error")
        headers = {"Retry-After": f"{retry_after_s:g}"} if retry_after_s else None
        super().__init__(status, message, type=type or default_type, code=code, headers=headers)

    @property
    def retryable(self) -> bool:
        """429, 5xx and failed connections (502/504): the request produced nothing and may go elsewhere."""
        return self.status == 429 or self.status >= 500


class ListStream:
    """Deltas that arrived whole (a non-streamed upstream answer)."""

    def __init__(self, deltas: list[Delta], usage: Usage | None, prompt_tokens: int | None = None):
        self.deltas, self.usage = deltas, usage or Usage()
        self.prompt_tokens = prompt_tokens

    async def __aiter__(self) -> AsyncIterator[Delta]:
        for delta in self.deltas:
            yield delta

    def cancel(self) -> None:
        pass


class WrappedStream:
    """A DeltaStream over `inner`: usage, prompt_tokens and cancel are the inner stream's; a
    subclass changes how the deltas flow (__aiter__) and what else cancel does."""

    def __init__(self, inner: DeltaStream):
        self.inner = inner

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    @property
    def prompt_tokens(self) -> int | None:
        return self.inner.prompt_tokens

    def cancel(self) -> None:
        self.inner.cancel()


class PeekedStream(WrappedStream):
    """A stream whose first delta has already arrived: errors before the first token surface from
    `open` (as an UpstreamError the caller can retry or fall back on), not mid-response."""

    def __init__(self, inner: DeltaStream, first: Delta | None):
        super().__init__(inner)
        self.first = first

    @classmethod
    async def open(cls, inner: DeltaStream) -> PeekedStream:
        iterator = inner.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            inner.cancel()
            raise
        if first is not None and first.error:         # failed before producing anything: retryable
            inner.cancel()
            raise UpstreamError(502, first.error)
        stream = cls(inner, first)
        stream._iterator = iterator
        return stream

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self.first is not None:
            yield self.first
        async for delta in self._iterator:
            yield delta
