"""OpenAI response and stream-chunk objects for chat and text completions."""
from __future__ import annotations

from gateway.generation import ChoiceResult
from gateway.tool_calls import ToolCallStream, new_call_id, parse_tool_calls


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """`cached_tokens` is always present: 0 when nothing came from the cache, never null."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def usage_of(results: list[ChoiceResult], num_prompts: int, n: int) -> dict:
    """Each prompt counts once however many choices it has; cached tokens likewise."""
    firsts = results[::n][:num_prompts]
    return usage(sum(r.prompt_tokens for r in firsts), sum(r.completion_tokens for r in results),
                 sum(r.cached_tokens for r in firsts))


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text; special tokens keep their names (e.g. <|im_end|>)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, entries: list) -> dict | None:
    content = []
    for token_id, logprob, top in entries:
        item = _token_entry(tokenizer, token_id, logprob)
        item["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in top]
        content.append(item)
    return {"content": content}


def text_logprobs(tokenizer, entries: list, offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, logprob, top in entries:
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append({token_text(tokenizer, t): lp for t, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_completion(response_id: str, created: int, model: str, results: list[ChoiceResult],
                    tokenizer, want_logprobs: bool) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(tokenizer, r.logprobs) if want_logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_of(results, 1, len(results))}


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


def text_completion(response_id: str, created: int, model: str, results: list[ChoiceResult],
                    tokenizer, want_logprobs: bool, prefixes: list[str], num_prompts: int, n: int) -> dict:
    choices = []
    for i, r in enumerate(results):
        prefix = prefixes[i // n]
        choices.append({"index": i, "text": prefix + r.text, "finish_reason": r.finish_reason,
                        "logprobs": text_logprobs(tokenizer, r.logprobs, len(prefix)) if want_logprobs else None})
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_of(results, num_prompts, n)}


def attach_tool_calls(choice: dict, names: set[str]) -> None:
    """Move tool calls found in a chat choice's text into message.tool_calls (finish "tool_calls")."""
    message = choice["message"]
    content, calls = parse_tool_calls(message["content"], names)
    if not calls:
        return
    message["content"] = content or None
    message["tool_calls"] = [{"id": new_call_id(), "type": "function", "function": call} for call in calls]
    if choice["finish_reason"] == "stop":
        choice["finish_reason"] = "tool_calls"


class ToolCallDeltas:
    """One streamed chat choice's text -> deltas: content as it is safe, each call as two
    tool_calls deltas (id, type and name, then the arguments) that the openai SDK joins."""

    def __init__(self, names: set[str]):
        self.stream = ToolCallStream(names)

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = self.stream.feed(text)
        if finish_reason is not None:
            rest, more = self.stream.finish()
            content, calls = content + rest, calls + more
        delta: dict = {"content": content} if content else {}
        if calls:
            start = len(self.stream.calls) - len(calls)
            delta["tool_calls"] = []
            for k, call in enumerate(calls):
                delta["tool_calls"] += [
                    {"index": start + k, "id": new_call_id(), "type": "function",
                     "function": {"name": call["name"], "arguments": ""}},
                    {"index": start + k, "function": {"arguments": call["arguments"]}}]
        if finish_reason == "stop" and self.stream.calls:
            finish_reason = "tool_calls"
        return delta, finish_reason
