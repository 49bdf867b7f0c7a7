"""From a chat (messages, tools, an output format) to what the engine runs: prompt ids and a grammar.

Every chat-shaped API (chat completions, responses, Anthropic messages) comes through here once it
has turned its own request into OpenAI-style messages. The work (the chat template, tokenising,
compiling the grammar) runs in a worker thread: none of it belongs on the event loop.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.errors import APIError
from gateway.grammar import GrammarError, GrammarSpec, compiler_for, json_schema_spec
from gateway.local_model import LocalModel
from gateway.templating import ChatTemplateError
from gateway.tools import ToolSet, call_grammar, prepare_messages, tool_format


@dataclass(frozen=True)
class ChatPlan:
    prompt: list[int]
    grammar: GrammarSpec | None
    tools: ToolSet | None


def output_grammar(response_format: dict | None, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI response_format -> a grammar: text (none), json_object, json_schema {schema, strict}."""
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise APIError(400, "response_format must be an object", param=param)
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        # chat completions nests {name, schema, strict} under "json_schema"; responses' text.format doesn't
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise APIError(400, "json_schema.schema must be a JSON schema object", param=param)
        return json_schema_spec(schema)
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param=param)


def _plan(model: LocalModel, messages: list[dict], tools: ToolSet | None, grammar: GrammarSpec | None,
          param: str) -> ChatPlan:
    if tools is not None:
        # the model's call format, chosen once per chat template; set on the request's ToolSet so
        # the parsers given `tools.names` afterwards read the format this model writes
        tools.format = tool_format(model.tokenizer.chat_template)
    if tools is not None and tools.mode != "auto":
        grammar = call_grammar(tools)       # a forced call overrides any output format
        param = "tools"
    if grammar is not None:
        try:
            compiler_for(model.tokenizer, model.info.vocab_size).compile(grammar)
        except GrammarError as error:
            raise APIError(400, f"Invalid schema for {param}: {error}", param=param,
                           code="invalid_json_schema") from None
    rendered, tool_specs = prepare_messages(messages, tools, model.tokenizer.chat_template)
    try:
        prompt = model.tokenizer.apply_chat_template(rendered, tool_specs)
    except ChatTemplateError as error:
        raise APIError(400, f"The messages cannot be rendered by this model's chat template: {error}",
                       param="messages") from None
    return ChatPlan(prompt, grammar, tools)


async def plan_chat(model: LocalModel, messages: list[dict], tools: ToolSet | None = None,
                    grammar: GrammarSpec | None = None, param: str = "response_format") -> ChatPlan:
    """Prompt ids and grammar for a chat, computed in a worker thread; bad input is a 400."""
    return await asyncio.to_thread(_plan, model, messages, tools, grammar, param)
