"""A model served by a local engine: templating, the engine's token events, and the text side of
tool calls and logprobs turned into deltas, so the HTTP layer never holds the tokenizer."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway import generation
from gateway.chat import output_grammar, plan_chat
from gateway.engine.engine import RequestHandle
from gateway.errors import APIError
from gateway.services.base import ChatCall, Delta, TextCall, TokenLogprob, Usage
from gateway.tool_calls import ToolCallStream
from gateway.tools import ToolSet

if TYPE_CHECKING:
    from gateway.local_model import LocalModel


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text; special tokens keep their names (e.g. <|im_end|>)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class LocalStream:
    """Engine events -> deltas: token ids become texts, tool-call text becomes calls (the model's own
    format), the stop string that ended a choice is named, and usage counts each prompt once."""

    def __init__(self, handle: RequestHandle, tokenizer, n: int, tools: ToolSet | None, stops: list[str],
                 prompt_tokens: int, prefixes: list[str] | None = None):
        self.handle, self.tokenizer, self.n = handle, tokenizer, n
        self.stops, self.prompt_tokens = stops, prompt_tokens
        self.prefixes = prefixes
        self.calls = {}
        self.tools = tools
        self.token_ids: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}
        self.usage = Usage()

    def cancel(self) -> None:
        self.handle.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for event in self.handle:
                yield self._delta(event)
        finally:
            self.handle.cancel()         # a no-op once every choice finished; else the client went away

    def _delta(self, event) -> Delta:
        index = event.index
        if event.error:
            return Delta(index, finish_reason="error", error=event.error)
        text = event.text
        if self.prefixes is not None and index not in self.texts:
            text = self.prefixes[index // self.n] + text          # echo: the prompt leads the choice
        self.texts[index] = self.texts.get(index, "") + event.text
        self.token_ids.setdefault(index, []).extend(event.token_ids)
        delta = Delta(index, logprobs=self._logprobs(event.logprobs), finish_reason=event.finish_reason)
        if self.tools is None:
            delta.text = text
        else:
            calls = self.calls.setdefault(index, ToolCallStream(self.tools.names))
            delta.text, delta.tool_calls = calls.feed(text)
            if event.finish_reason is not None:
                rest, more = calls.finish()
                delta.text, delta.tool_calls = delta.text + rest, delta.tool_calls + more
                if event.finish_reason == "stop" and calls.calls:
                    delta.finish_reason = "tool_calls"
        if event.finish_reason is not None:
            delta.stop_sequence = self._stop_hit(index)
            if index % self.n == 0:              # each prompt counts once however many choices it has
                self.usage.prompt_tokens += event.prompt_tokens
                self.usage.cached_tokens += event.cached_tokens
            self.usage.completion_tokens += event.completion_tokens
        return delta

    def _logprobs(self, entries) -> list[TokenLogprob]:
        text = token_text
        return [(text(self.tokenizer, token), logprob, [(text(self.tokenizer, t), lp) for t, lp in top])
                for token, logprob, top in entries]

    def _stop_hit(self, index: int) -> str | None:
        ids = self.token_ids.get(index)
        if not self.stops or not ids or ids[-1] in self.tokenizer.eos_token_ids:
            return None
        tail = self.tokenizer.decode(ids)[len(self.texts[index]):]   # where the stop string began
        return next((s for s in self.stops if tail.startswith(s)), None)


class LocalService:
    """One local engine behind the model seam."""

    kind = "local"

    def __init__(self, model: LocalModel):
        self.model = model

    async def chat(self, call: ChatCall) -> LocalStream:
        model = self.model
        grammar = output_grammar(call.response_format, call.format_param)
        plan = await plan_chat(model, call.messages, call.tools, grammar, call.format_param)
        max_new = generation.resolve_max_tokens(call.max_tokens, len(plan.prompt), model.engine.context_length)
        handle = generation.submit(model, [plan.prompt], call.sampling, max_new, call.logprobs, call.top_logprobs,
                                   plan.grammar)
        return LocalStream(handle, model.tokenizer, call.sampling.n, plan.tools, call.sampling.stop_list(),
                           len(plan.prompt))

    async def count_tokens(self, call: ChatCall) -> int:
        """The chat template rendered with the tools and tokenised, as chat() plans it (off the loop)."""
        plan = await plan_chat(self.model, call.messages, call.tools)
        return len(plan.prompt)

    async def complete(self, call: TextCall) -> LocalStream:
        model = self.model
        if call.echo and call.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        prompts = await asyncio.to_thread(self._prompt_ids, call.prompt)
        longest = max(len(p) for p in prompts)
        max_new = generation.resolve_max_tokens(call.max_tokens, longest, model.engine.context_length)
        handle = generation.submit(model, prompts, call.sampling, max_new, call.logprobs is not None,
                                   call.logprobs or 0)
        prefixes = [model.tokenizer.decode(p) if call.echo else "" for p in prompts]
        return LocalStream(handle, model.tokenizer, call.sampling.n, None, call.sampling.stop_list(),
                           sum(len(p) for p in prompts), prefixes)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        tokenizer = self.model.tokenizer
        if isinstance(prompt, str):
            prompts = [tokenizer.encode(prompt)]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [tokenizer.encode(p) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        vocab = self.model.info.vocab_size
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be within 0..{vocab - 1}", param="prompt")
        return prompts

    def attach(self, loop) -> None:
        self.model.engine.attach(loop)

    def stop(self) -> None:
        self.model.engine.stop()

    def describe(self) -> dict:
        info = self.model.info
        return {"kind": self.kind, "backend": info.backend, "device": info.device}
