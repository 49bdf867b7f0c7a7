"""The OpenAI wire format on the upstream side: request bodies from our calls, and deltas from the
responses and stream chunks that workers (and litellm) send back."""
from __future__ import annotations

import json

from gateway.services.base import ChatCall, Delta, TextCall, TokenLogprob, UpstreamError, Usage
from gateway.tools import ToolSet

# sampling fields every OpenAI-compatible server takes; the extensions go only where they were set
_SAMPLING = ("temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "seed")
_EXTENSIONS = ("top_k", "min_p")


def _sampling(call: ChatCall | TextCall) -> dict:
    body = {}
    for name in _SAMPLING + _EXTENSIONS:
        value = getattr(call.sampling, name, None)
        if value is not None and not (name == "n" and value == 1):
            body[name] = value
    if call.max_tokens is not None:
        body["max_tokens"] = call.max_tokens
    return body


def _tools(tools: ToolSet) -> dict:
    body = {"tools": [{"type": "function", "function": f} for f in tools.functions]}
    if tools.mode == "function":
        body["tool_choice"] = {"type": "function", "function": {"name": tools.forced}}
    else:
        body["tool_choice"] = tools.mode
    if not tools.parallel:
        body["parallel_tool_calls"] = False
    return body


def response_format(fmt: dict | None) -> dict | None:
    """Responses' flat text.format {type, name, schema, strict} -> chat's {type, json_schema: {...}}."""
    if not fmt or fmt.get("type") != "json_schema" or "json_schema" in fmt:
        return fmt
    inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    inner.setdefault("name", "output")
    return {"type": "json_schema", "json_schema": inner}


def chat_body(call: ChatCall, model: str) -> dict:
    body = {"model": model, "messages": call.messages, **_sampling(call)}
    if call.tools is not None:
        body.update(_tools(call.tools))
    if call.response_format:
        body["response_format"] = response_format(call.response_format)
    if call.logprobs:
        body["logprobs"] = True
        if call.top_logprobs:
            body["top_logprobs"] = call.top_logprobs
    if call.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def text_body(call: TextCall, model: str) -> dict:
    body = {"model": model, "prompt": call.prompt, **_sampling(call)}
    if call.logprobs is not None:
        body["logprobs"] = call.logprobs
    if call.echo:
        body["echo"] = True
    if call.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def usage_of(block: dict | None) -> Usage | None:
    """OpenAI usage (cached tokens under prompt_tokens_details) -> Usage; cached 0 when absent."""
    if not block:
        return None
    details = block.get("prompt_tokens_details") or {}
    return Usage(block.get("prompt_tokens") or 0, block.get("completion_tokens") or 0,
                 details.get("cached_tokens") or 0)


def _chat_logprobs(block: dict | None) -> list[TokenLogprob]:
    return [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
            for e in (block or {}).get("content") or []]


def _text_logprobs(block: dict | None) -> list[TokenLogprob]:
    if not block:
        return []
    tops = block.get("top_logprobs") or [None] * len(block.get("tokens") or [])
    return [(token, logprob, list((top or {}).items()))
            for token, logprob, top in zip(block.get("tokens") or [], block.get("token_logprobs") or [], tops,
                                           strict=False)]


def _call(entry: dict) -> dict:
    fn = entry.get("function") or {}
    arguments = fn.get("arguments") or "{}"
    return {"id": entry.get("id"), "name": fn.get("name") or "",
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}


def error_of(status: int, body: bytes | str | dict) -> UpstreamError:
    """An upstream's error answer -> UpstreamError with its status and, where it sent one, its message."""
    data = body
    if isinstance(body, (bytes, str)):
        try:
            data = json.loads(body)
        except ValueError:
            data = {"error": {"message": (body.decode(errors="replace") if isinstance(body, bytes) else body)[:500]}}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return UpstreamError(status, str(error.get("message") or f"upstream error {status}"),
                             type=error.get("type"), code=error.get("code"))
    return UpstreamError(status, str(error or data or f"upstream error {status}"))


def response_deltas(data: dict, chat: bool) -> tuple[list[Delta], Usage | None]:
    """A whole (non-streamed) chat or text completion -> one final delta per choice."""
    deltas = []
    for choice in data.get("choices") or []:
        if chat:
            message = choice.get("message") or {}
            delta = Delta(choice.get("index", 0), message.get("content") or "",
                          [_call(c) for c in message.get("tool_calls") or []], _chat_logprobs(choice.get("logprobs")))
        else:
            delta = Delta(choice.get("index", 0), choice.get("text") or "",
                          logprobs=_text_logprobs(choice.get("logprobs")))
        delta.finish_reason = choice.get("finish_reason") or "stop"
        deltas.append(delta)
    return deltas, usage_of(data.get("usage"))


class ChunkReader:
    """Stream chunks -> deltas. Tool-call fragments are joined per choice and leave whole when the
    choice finishes; the usage chunk (stream_options.include_usage) is kept, cached tokens included."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.calls: dict[int, dict[int, dict]] = {}
        self.usage: Usage | None = None

    def read(self, chunk: dict) -> list[Delta]:
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            return [Delta(0, finish_reason="error", error=message or "upstream error")]
        usage = usage_of(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        return [d for d in map(self._choice, chunk.get("choices") or []) if d is not None]

    def _choice(self, choice: dict) -> Delta | None:
        index, finish = choice.get("index", 0), choice.get("finish_reason")
        if not self.chat:
            text, logprobs = choice.get("text") or "", _text_logprobs(choice.get("logprobs"))
            return Delta(index, text, logprobs=logprobs, finish_reason=finish) if text or finish or logprobs else None
        delta = choice.get("delta") or {}
        for fragment in delta.get("tool_calls") or []:
            pending = self.calls.setdefault(index, {}).setdefault(fragment.get("index", 0),
                                                                  {"id": None, "name": "", "arguments": ""})
            fn = fragment.get("function") or {}
            pending["id"] = pending["id"] or fragment.get("id")
            pending["name"] += fn.get("name") or ""
            pending["arguments"] += fn.get("arguments") or ""
        text, logprobs = delta.get("content") or "", _chat_logprobs(choice.get("logprobs"))
        calls = []
        if finish:
            calls = [{**c, "arguments": c["arguments"] or "{}"} for c in self.calls.pop(index, {}).values()]
        if not (text or finish or logprobs or calls):
            return None
        return Delta(index, text, calls, logprobs, finish_reason=finish)
