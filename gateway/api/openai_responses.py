"""POST /v1/responses: the core of OpenAI's Responses API, stateless (nothing is stored).

The request becomes chat messages (gateway/chat.py) and one engine request; the output becomes
`message` and `function_call` items, whole or as the Responses stream of typed events.
"""
from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from pydantic import Field

from gateway import generation
from gateway.errors import APIError
from gateway.gate import track
from gateway.protocol import SamplingFields, _Lenient, new_id
from gateway.responses import stream_error
from gateway.router import Router
from gateway.services.base import ChatCall, Usage
from gateway.sse import Batch, DeltaEventResponse
from gateway.tool_calls import new_call_id
from gateway.tools import parse_tools

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: dict | None = None                      # {"format": {"type": text | json_object | json_schema}}
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict | None = None


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", param=where)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"unsupported content part {kind!r} in {where}: only text parts", param=where)
        texts.append(part["text"])
    return "\n".join(texts)


def to_messages(body: ResponsesRequest) -> list[dict]:
    """instructions + input items -> chat messages (function calls and their outputs included)."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        where, kind = f"input.{i}", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer", param=where)
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or new_call_id(), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)      # parallel calls are one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise APIError(400, f"input item type {kind!r} is not supported", param=where)
    if not messages:
        raise APIError(400, "input must not be empty", param="input")
    return messages


def _chat_tools(body: ResponsesRequest):
    """Responses' flat function tools and tool_choice -> the chat forms gateway/tools.py parses."""
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise APIError(400, f"tool type {tool.get('type')!r} is not supported: only function tools",
                           param=f"tools.{i}")
        tools.append({"type": "function", "function": {k: tool.get(k) for k in ("name", "description", "parameters")}})
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return parse_tools(tools, choice, body.parallel_tool_calls)


def _usage(counts: Usage) -> dict:
    return {"input_tokens": counts.prompt_tokens, "input_tokens_details": {"cached_tokens": counts.cached_tokens},
            "output_tokens": counts.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts.prompt_tokens + counts.completion_tokens}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": new_call_id(), "name": call["name"],
            "arguments": call["arguments"], "status": status}


class ResponsesService:
    """The route and its two output paths."""

    def __init__(self, router: Router):
        self.router = router

    def envelope(self, body: ResponsesRequest, rid: str, created: int, status: str, output: list,
                 counts: Usage | None) -> dict:
        incomplete = status == "incomplete"
        return {"id": rid, "object": "response", "created_at": created, "status": status, "model": body.model,
                "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "tools": body.tools or [],
                "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
                "text": body.text or {"format": {"type": "text"}}, "store": False, "metadata": body.metadata or {},
                "previous_response_id": None, "usage": _usage(counts) if counts else None}

    async def create(self, body: ResponsesRequest, request: Request):
        if body.previous_response_id:
            raise APIError(400, "previous_response_id needs stored responses, which this server does not keep "
                                "(it is stateless): send the whole conversation in `input`",
                           param="previous_response_id")
        service = self.router.service(body.model)
        tools = _chat_tools(body)
        fmt = (body.text or {}).get("format")
        sampling = SamplingFields(model=body.model, temperature=body.temperature, top_p=body.top_p)
        call = ChatCall(to_messages(body), sampling, body.max_output_tokens, tools, fmt, "text.format",
                        stream=body.stream)
        stream = track(request, await generation.unless_gone(service.chat(call), request))
        rid, created = new_id("resp"), int(time.time())
        if body.stream:
            return DeltaEventResponse(self.stream(stream, body, rid, created), stream)
        [result] = await generation.collect(stream, 1, request)
        calls = result.tool_calls
        content = result.text.strip() if calls else result.text
        output = ([_message_item(content)] if content or not calls else []) + [_call_item(c) for c in calls]
        status = "incomplete" if result.finish_reason == "length" else "completed"
        return self.envelope(body, rid, created, status, output, stream.usage)

    async def stream(self, deltas, body: ResponsesRequest, rid: str, created: int):
        seq = iter(range(1 << 62))
        output: list[dict] = []
        text_item: dict | None = None        # the message item being streamed, if one is open

        def event(kind: str, **fields) -> dict:
            return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(seq), **fields})}

        def open_text():
            nonlocal text_item
            text_item = _message_item("", "in_progress")
            text_item["content"] = []
            output.append(text_item)
            index = len(output) - 1
            yield event("response.output_item.added", output_index=index, item=text_item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            text_item["content"].append(part)
            yield event("response.content_part.added", item_id=text_item["id"], output_index=index,
                        content_index=0, part=part)

        def close_text():
            nonlocal text_item
            index, part = output.index(text_item), text_item["content"][0]
            yield event("response.output_text.done", item_id=text_item["id"], output_index=index, content_index=0,
                        text=part["text"], logprobs=[])
            yield event("response.content_part.done", item_id=text_item["id"], output_index=index,
                        content_index=0, part=part)
            text_item["status"] = "completed"
            yield event("response.output_item.done", output_index=index, item=text_item)
            text_item = None

        def text_delta(text: str):
            if text_item is None:
                yield from open_text()
            text_item["content"][0]["text"] += text
            yield event("response.output_text.delta", item_id=text_item["id"], output_index=output.index(text_item),
                        content_index=0, delta=text, logprobs=[])

        def call_events(call: dict):
            if text_item is not None:
                yield from close_text()
            item = _call_item({**call, "arguments": ""}, "in_progress")
            output.append(item)
            index = len(output) - 1
            yield event("response.output_item.added", output_index=index, item=item)
            item["arguments"] = call["arguments"]
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=call["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=call["arguments"])
            item["status"] = "completed"
            yield event("response.output_item.done", output_index=index, item=item)

        # one write per delta (gateway/sse.py Batch): the opening events go out with the first content,
        # the closing ones end the body in the last write
        out = [event("response.created", response=self.envelope(body, rid, created, "in_progress", [], None)),
               event("response.in_progress", response=self.envelope(body, rid, created, "in_progress", [], None))]
        result = generation.ChoiceResult()
        async for delta in deltas:
            if delta.error:
                yield Batch([*out, {"event": "error", "data": json.dumps({
                    "type": "error", "sequence_number": next(seq), **stream_error(delta.error)["error"]})}],
                    final=True)
                return
            generation.merge(result, delta)
            if delta.text:
                out += text_delta(delta.text)
            for call in delta.tool_calls:
                out += call_events(call)
            if out:
                yield Batch(out)
                out = []
        if text_item is not None:
            out += close_text()
        status = "incomplete" if result.finish_reason == "length" else "completed"
        out.append(event(f"response.{status}", response=self.envelope(body, rid, created, status, output,
                                                                     deltas.usage)))
        yield Batch(out, final=True)


def register(app: FastAPI, router: Router) -> None:
    service = ResponsesService(router)
    app.post("/v1/responses")(service.create)
