"""From a validated OpenAI request to engine events: limits, sampling params, disconnect handling."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request as HTTPRequest

from gateway.engine.engine import EngineUnavailable, QueueFull, RequestHandle
from gateway.engine.sampling import SamplingParams
from gateway.errors import APIError, engine_unavailable
from gateway.grammar import GrammarSpec
from gateway.local_model import LocalModel
from gateway.protocol import SamplingFields
from gateway.services.base import Delta, DeltaStream

T = TypeVar("T")


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    """Tokens the completion may have; a prompt that does not fit is a 400 naming both numbers."""
    if prompt_tokens >= context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, "
                            f"your prompt is {prompt_tokens} tokens, which leaves no room for a completion.",
                       param="messages", code="context_length_exceeded")
    room = context_length - prompt_tokens
    if requested is not None and requested > room:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you "
                            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                            f"{requested} for the completion).", param="max_tokens",
                       code="context_length_exceeded")
    return requested if requested is not None else room


def sampling_params(body: SamplingFields, index: int, logprobs: bool, top_logprobs: int,
                    vocab_size: int) -> SamplingParams:
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    bad = [token for token in bias if not 0 <= token < vocab_size]
    if bad:
        raise APIError(400, f"logit_bias names token ids outside the vocabulary (0..{vocab_size - 1}): {bad}",
                       param="logit_bias")
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        seed=None if body.seed is None else body.seed + index,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, logprobs=logprobs, top_logprobs=top_logprobs)


def submit(model: LocalModel, prompts: list[list[int]], body: SamplingFields, max_new_tokens: int,
           logprobs: bool, top_logprobs: int, grammar: GrammarSpec | None = None) -> RequestHandle:
    """n choices for each prompt; choice index = prompt index * n + i. `grammar`: constrained decoding."""
    vocab = model.info.vocab_size
    choices = [(prompt, sampling_params(body, i, logprobs, top_logprobs, vocab))
               for prompt in prompts for i in range(body.n)]
    try:
        return model.engine.submit(choices, max_new_tokens=max_new_tokens, stop=body.stop_list(),
                                   ignore_eos=body.ignore_eos, priority=body.priority or 0, grammar=grammar)
    except QueueFull as error:
        raise APIError(429, f"The server is busy: {error}.", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    except EngineUnavailable as error:
        raise engine_unavailable(f"The model `{model.name}`", error) from None


@dataclass
class ChoiceResult:
    """One choice's whole output, gathered from its deltas."""

    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    error: str | None = None
    error_status: int = 500


async def _wait_disconnect(http_request: HTTPRequest) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(opening: Awaitable[T], http_request: HTTPRequest) -> T:
    """What `opening` gives (a service's chat or complete; a worker pool waits there for the
    upstream's first answer, which can be a whole prefill away), given up if the client leaves
    first: the upstream request is cancelled (its connection closed, so the worker stops computing
    it) and the replica it held is freed at once, not when that answer comes."""
    work = asyncio.ensure_future(opening)
    gone = asyncio.ensure_future(_wait_disconnect(http_request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise asyncio.CancelledError("client disconnected")
    return work.result()


async def collect(stream: DeltaStream, num_choices: int, http_request: HTTPRequest) -> list[ChoiceResult]:
    """Gather every choice's whole output; a client that goes away cancels the work."""
    results = [ChoiceResult() for _ in range(num_choices)]

    async def gather() -> None:
        async for delta in stream:
            merge(results[delta.index], delta)

    try:
        await unless_gone(gather(), http_request)
    except asyncio.CancelledError:          # the client left (or this request was cancelled)
        stream.cancel()
        raise
    errors = [r for r in results if r.error]
    if errors:
        first = errors[0]
        raise APIError(first.error_status, first.error or "internal error in the engine", type="server_error",
                       code="timeout" if first.error_status == 504 else None)
    return results


def merge(result: ChoiceResult, delta: Delta) -> None:
    result.text += delta.text
    result.tool_calls += delta.tool_calls
    result.logprobs += delta.logprobs
    if delta.finish_reason is not None:
        result.finish_reason = delta.finish_reason
        result.stop_sequence = delta.stop_sequence
    if delta.error:
        result.error, result.error_status = delta.error, delta.error_status
