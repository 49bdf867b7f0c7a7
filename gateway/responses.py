"""OpenAI response and stream-chunk objects for chat and text completions."""
from __future__ import annotations

from gateway.generation import ChoiceResult
from gateway.services.base import TokenLogprob, Usage
from gateway.tool_calls import new_call_id


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """`cached_tokens` is always present: 0 when nothing came from the cache, never null."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def usage_of(counts: Usage) -> dict:
    return usage(counts.prompt_tokens, counts.completion_tokens, counts.cached_tokens)


def _token_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob]) -> dict | None:
    content = []
    for text, logprob, top in entries:
        item = _token_entry(text, logprob)
        item["top_logprobs"] = [_token_entry(t, lp) for t, lp in top]
        content.append(item)
    return {"content": content}


def text_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for text, logprob, top in entries:
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append(dict(top))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_message(result: ChoiceResult) -> dict:
    """The assistant message of a chat choice; tool calls go into message.tool_calls."""
    message = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        message["content"] = result.text.strip() or None
        message["tool_calls"] = [{"id": call.get("id") or new_call_id(), "type": "function",
                                  "function": {"name": call["name"], "arguments": call["arguments"]}}
                                 for call in result.tool_calls]
    return message


def chat_completion(response_id: str, created: int, model: str, results: list[ChoiceResult], counts: Usage,
                    want_logprobs: bool) -> dict:
    choices = [{"index": i, "message": chat_message(r),
                "logprobs": chat_logprobs(r.logprobs) if want_logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_of(counts)}


def stream_chunk(kind: str, response_id: str, created: int, model: str, choices: list[dict],
                 usage_block: dict | None = None, with_usage_field: bool = False) -> dict:
    """One SSE chunk; kind is "chat.completion.chunk" or "text_completion".

    With stream_options.include_usage every chunk carries "usage" (null until the last one).
    """
    chunk = {"id": response_id, "object": kind, "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if with_usage_field:
        chunk["usage"] = usage_block
    return chunk


def stream_error(message: str) -> dict:
    """An error that happens after streaming began travels as an SSE event holding an error object."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def text_completion(response_id: str, created: int, model: str, results: list[ChoiceResult], counts: Usage,
                    want_logprobs: bool) -> dict:
    choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                "logprobs": text_logprobs(r.logprobs, 0) if want_logprobs else None} for i, r in enumerate(results)]
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_of(counts)}


def tool_call_deltas(calls: list[dict], start: int) -> list[dict]:
    """Each complete call as two tool_calls deltas (id, type and name, then the arguments), which
    the openai SDK joins; `start` is the index of the first of them within the choice."""
    deltas = []
    for k, call in enumerate(calls):
        deltas += [{"index": start + k, "id": call.get("id") or new_call_id(), "type": "function",
                    "function": {"name": call["name"], "arguments": ""}},
                   {"index": start + k, "function": {"arguments": call["arguments"]}}]
    return deltas
