"""POST /v1/messages: Anthropic's Messages API on the same engine (system, content blocks, tools with
tool_use / tool_result blocks, streaming events), and POST /v1/messages/count_tokens: the input tokens
of such a request, counted as the model would count them (services' count_tokens: a local model
renders and tokenises, a worker pool asks the worker the request would go to, litellm estimates).
Errors leave in Anthropic's shape (gateway/errors.py).
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from pydantic import Field, field_validator

from gateway import generation
from gateway.errors import APIError
from gateway.gate import track
from gateway.protocol import SamplingFields, _Lenient, new_id
from gateway.router import Router
from gateway.services.base import ChatCall, Usage
from gateway.sse import Batch, DeltaEventResponse
from gateway.tools import parse_tools

ANTHROPIC_PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"


class CountTokensRequest(_Lenient):
    """What a Messages request's input is: its model, system, messages and tools."""
    model: str = Field(min_length=1)
    messages: list[dict] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None          # how many, how long: server.limits
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty(cls, value):
        if value and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content blocks", param=where)
    return content


def _text(blocks, where: str) -> str:
    texts = []
    for block in _blocks(blocks, where):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"{where}: only text blocks are supported here", param=where)
        texts.append(block["text"])
    return "\n".join(texts)


def to_messages(body: CountTokensRequest) -> list[dict]:
    """Anthropic system + messages -> chat messages: tool_use blocks become an assistant's tool_calls,
    tool_result blocks become tool messages."""
    messages = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, message in enumerate(body.messages):
        where, role = f"messages.{i}", message.get("role")
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be 'user' or 'assistant'", param=where)
        texts, calls = [], []
        for block in _blocks(message.get("content"), where):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text", ""))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result" and role == "user":
                content = block.get("content", "")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": content if isinstance(content, str) else _text(content, where)})
            else:
                raise APIError(400, f"content block type {kind!r} is not supported in a {role} message",
                               param=where)
        if texts or calls or not message.get("content"):
            out = {"role": role, "content": "\n".join(texts)}
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
    return messages


def _tools(body: CountTokensRequest):
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                               "parameters": t.get("input_schema")}} for t in body.tools or []]
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    chat_choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        chat_choice = {"type": "function", "function": {"name": choice.get("name")}}
    if chat_choice is None:
        raise APIError(400, "tool_choice.type must be auto, any, tool or none", param="tool_choice")
    return parse_tools(tools, chat_choice if tools else None, not choice.get("disable_parallel_tool_use"))


def _usage(counts: Usage) -> dict:
    # Anthropic counts cached input apart: input_tokens are the ones computed for this request
    cached = counts.cached_tokens
    return {"input_tokens": counts.prompt_tokens - cached, "output_tokens": counts.completion_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": new_id("toolu"), "name": call["name"], "input": json.loads(call["arguments"])}


class MessagesService:
    def __init__(self, router: Router):
        self.router = router

    @staticmethod
    def stop_of(result: generation.ChoiceResult, has_calls: bool):
        """(stop_reason, stop_sequence) in Anthropic's terms."""
        if result.finish_reason == "length":
            return "max_tokens", None
        if has_calls:
            return "tool_use", None
        if result.stop_sequence is not None:
            return "stop_sequence", result.stop_sequence
        return "end_turn", None

    async def create(self, body: MessagesRequest, request: Request):
        service = self.router.service(body.model)
        tools = _tools(body)
        sampling = SamplingFields(model=body.model, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, stop=body.stop_sequences)
        call = ChatCall(to_messages(body), sampling, body.max_tokens, tools, stream=body.stream)
        stream = track(request, await generation.unless_gone(service.chat(call), request))
        mid = new_id("msg")
        if body.stream:
            return DeltaEventResponse(self.stream(stream, body, mid), stream)
        [result] = await generation.collect(stream, 1, request)
        calls = result.tool_calls
        text = result.text.strip() if calls else result.text
        content = ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_use(c) for c in calls]
        reason, sequence = self.stop_of(result, bool(calls))
        return {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(stream.usage)}

    async def count_tokens(self, body: CountTokensRequest, request: Request):
        service = self.router.service(body.model)
        call = ChatCall(to_messages(body), SamplingFields(model=body.model), None, _tools(body))
        return {"input_tokens": await service.count_tokens(call)}

    async def stream(self, deltas, body: MessagesRequest, mid: str):
        """The Messages events, one write per delta (gateway/sse.py Batch): message_start goes out with
        the first content, and the closing events end the body in the last write."""
        def event(kind: str, **fields) -> dict:
            return {"event": kind, "data": json.dumps({"type": kind, **fields})}

        out = [event("message_start", message={
            "id": mid, "type": "message", "role": "assistant", "model": body.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": deltas.prompt_tokens or 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}})]
        index, text_open, any_call = -1, False, False
        result = generation.ChoiceResult()
        async for delta in deltas:
            if delta.error:
                yield Batch([*out, event("error", error={"type": "api_error", "message": delta.error})], final=True)
                return
            generation.merge(result, delta)
            text, calls = delta.text, delta.tool_calls
            if text:
                if not text_open:
                    index, text_open = index + 1, True
                    out.append(event("content_block_start", index=index, content_block={"type": "text", "text": ""}))
                out.append(event("content_block_delta", index=index, delta={"type": "text_delta", "text": text}))
            for call in calls:
                if text_open:
                    out.append(event("content_block_stop", index=index))
                    text_open = False
                index, any_call = index + 1, True
                block = {**_tool_use(call), "input": {}}
                out += [event("content_block_start", index=index, content_block=block),
                        event("content_block_delta", index=index,
                              delta={"type": "input_json_delta", "partial_json": call["arguments"]}),
                        event("content_block_stop", index=index)]
            if out:
                yield Batch(out)
                out = []
        if text_open:
            out.append(event("content_block_stop", index=index))
        reason, sequence = self.stop_of(result, any_call)
        out += [event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                      usage=_usage(deltas.usage)),
                event("message_stop")]
        yield Batch(out, final=True)


def register(app: FastAPI, router: Router) -> None:
    service = MessagesService(router)
    app.post(ANTHROPIC_PATH)(service.create)
    app.post(COUNT_PATH)(service.count_tokens)
