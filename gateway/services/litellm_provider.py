"""A remote model through litellm (`backend: litellm`): requests go through litellm.acompletion /
atext_completion with the entry's litellm_params as LiteLLM's proxy writes them; chunks come back as
deltas with the usage block kept whole (cached tokens included); litellm's exceptions become
OpenAI errors with the upstream's status.

Importing this module imports litellm, so only configs with a litellm model do; litellm is told to
use its packaged price map first (it fetches one from the network when imported otherwise).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx  # noqa: E402
import litellm  # noqa: E402
import openai  # noqa: E402

from gateway.services.base import ChatCall, Delta, ListStream, TextCall, UpstreamError, Usage  # noqa: E402
from gateway.services.openai_wire import ChunkReader, chat_body, response_deltas, text_body  # noqa: E402

log = logging.getLogger("radixgate.litellm")
litellm.suppress_debug_info = True        # errors leave as OpenAI error objects, not printed help banners

ENV_PREFIX = "os.environ/"
LIMIT_KEYS = ("rpm", "tpm")          # deployment limits the router enforces; litellm itself takes neither


def resolve_env(params: dict, where: str) -> dict:
    """`os.environ/NAME` values read from the environment once, at start-up; an unset one is left out
    (named once in the log), so the provider answers 401 rather than the gateway failing to start."""
    out = {}
    for key, value in params.items():
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX):]
            if name not in os.environ:
                log.warning("%s: litellm_params.%s names the environment variable %s, which is not set",
                            where, key, name)
                continue
            value = os.environ[name]
        out[key] = value
    return out


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def upstream_error(error: Exception) -> UpstreamError:
    """litellm's exception -> our error with the upstream's status: timeout 504, no connection 502.

    litellm reports a refused connection as an InternalServerError (500) whose causes hold the
    connection error, so the whole chain of causes is read."""
    message = str(getattr(error, "message", None) or error) or type(error).__name__
    causes = list(_causes(error))
    if any(isinstance(c, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)) for c in causes):
        return UpstreamError(504, message, code="upstream_timeout")
    if any(isinstance(c, (openai.APIConnectionError, httpx.TransportError, ConnectionError)) for c in causes):
        return UpstreamError(502, message, code="upstream_unreachable")
    status = getattr(error, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return UpstreamError(status, message, code=getattr(error, "code", None) or None)
    return UpstreamError(502, f"{type(error).__name__}: {message}", code="upstream_error")


class RateWindow:
    """rpm / tpm over the last minute; over a limit the deployment answers 429 itself."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()

    def admit(self) -> None:
        now = time.monotonic()
        while self.requests and now - self.requests[0] > 60:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] > 60:
            self.tokens.popleft()
        if self.rpm is not None and len(self.requests) >= self.rpm:
            raise UpstreamError(429, f"rpm limit {self.rpm} reached for this deployment", retry_after_s=1)
        if self.tpm is not None and sum(n for _, n in self.tokens) >= self.tpm:
            raise UpstreamError(429, f"tpm limit {self.tpm} reached for this deployment", retry_after_s=1)
        self.requests.append(now)

    def spent(self, usage: Usage) -> None:
        self.tokens.append((time.monotonic(), usage.prompt_tokens + usage.completion_tokens))


class LiteLLMStream:
    """litellm's stream wrapper -> deltas; an exception before the first delta raises (retryable)."""

    prompt_tokens = None

    def __init__(self, response, chat: bool, window: RateWindow):
        self.response, self.window = response, window
        self.reader = ChunkReader(chat)
        self.usage = Usage()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        started = False
        try:
            async for chunk in self.response:
                for delta in self.reader.read(chunk.model_dump(exclude_none=True)):
                    started = True
                    yield delta
        except Exception as error:                  # litellm raises its own exceptions mid-stream
            if not started:
                raise upstream_error(error) from None
            yield Delta(0, finish_reason="error", error=upstream_error(error).message)
        finally:
            self.usage = self.reader.usage or self.usage
            self.window.spent(self.usage)

    def cancel(self) -> None:
        close = getattr(self.response, "aclose", None)
        if close is not None:
            asyncio.ensure_future(close())


class LiteLLMDeployment:
    """One litellm_params entry: a provider model, its endpoint and key, its limits."""

    kind = "litellm"

    def __init__(self, name: str, params: dict, timeout_s: float):
        params = resolve_env(params, f"model {name}")
        self.window = RateWindow(params.pop("rpm", None), params.pop("tpm", None))
        self.model = params.pop("model")
        params.setdefault("timeout", timeout_s)
        params["max_retries"] = 0           # retries and fallbacks are the gateway's (pool.py, fallback.py)
        self.params = params
        self.label = f"{self.model}" + (f" at {params['api_base']}" if params.get("api_base") else "")

    async def chat(self, call: ChatCall):
        body = chat_body(call, self.model)
        return await self._send(litellm.acompletion, body, call.stream, True)

    async def complete(self, call: TextCall):
        body = text_body(call, self.model)
        return await self._send(litellm.atext_completion, body, call.stream, False)

    async def count_tokens(self, call: ChatCall) -> int:
        """litellm.token_counter: the provider's tokenizer where litellm knows the model, else its
        default (an estimate). Not a generation: a paid provider would bill the whole prompt."""
        tools = [{"type": "function", "function": f} for f in call.tools.functions] if call.tools else None
        try:
            return int(await asyncio.to_thread(litellm.token_counter, model=self.model, messages=call.messages,
                                               tools=tools))
        except Exception as error:
            raise upstream_error(error) from None

    async def _send(self, function, body: dict, stream: bool, chat: bool):
        self.window.admit()
        try:
            response = await function(**body, **self.params)
        except Exception as error:
            raise upstream_error(error) from None
        if stream:
            return LiteLLMStream(response, chat, self.window)
        deltas, usage = response_deltas(response.model_dump(), chat)
        self.window.spent(usage or Usage())
        return ListStream(deltas, usage)

    def attach(self, loop) -> None:
        pass

    def stop(self) -> None:
        pass
