"""Tool calling: the tools a request offers, how they reach the prompt, the grammar that forces a
call, and the parser that finds calls in the output (whole, or as it streams).

The output format is the one ChatML models are trained on (Hermes, Qwen 2.5):
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
one block per call, several for parallel calls. A template that renders `tools` itself is given
them; one that does not (SmolLM2's, the ChatML fallback) gets them described in the system message,
and earlier calls and results written into the history as text, in this same format.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from gateway.errors import APIError
from gateway.grammar import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolSet:
    """The functions a request offers and how the model may use them.

    mode: "auto" (the model decides), "required" (at least one call), or "function" (exactly
    `forced`); tool_choice "none" means no ToolSet at all.
    """

    functions: tuple[dict, ...]        # {"name", "description", "parameters"} per function
    mode: str = "auto"
    forced: str | None = None
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}


def parse_tools(tools: list[dict] | None, tool_choice, parallel: bool | None = True,
                param: str = "tools") -> ToolSet | None:
    """OpenAI chat `tools` + `tool_choice` -> a ToolSet (None: no tools in play). Bad input is a 400."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           param=f"{param}.{i}")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"{param}.{i}.function.parameters")
        functions.append({"name": fn["name"], "description": fn.get("description") or "",
                          "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", param=param)
    if tool_choice in (None, "auto"):
        mode, forced = "auto", None
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        mode, forced = "required", None
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        mode, forced = "function", tool_choice["function"]["name"]
        if forced not in names:
            raise APIError(400, f"tool_choice names the function {forced!r}, which is not in tools",
                           param="tool_choice")
    else:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    return ToolSet(tuple(functions), mode, forced, parallel is not False)


# ---- the prompt --------------------------------------------------------------------------------

def template_renders_tools(chat_template: str) -> bool:
    return "tools" in chat_template


def _call_text(name: str, arguments) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CLOSE}"


def _system_text(tools: ToolSet) -> str:
    described = "\n".join(json.dumps({"type": "function", "function": f}) for f in tools.functions)
    return ("You may call one or more functions to assist with the user query. The functions are:\n"
            f"<tools>\n{described}\n</tools>\n"
            "To call a function, answer with a JSON object holding its name and arguments inside "
            f"{OPEN}{CLOSE} tags:\n{OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{CLOSE}")


def prepare_messages(messages: list[dict], tools: ToolSet | None, chat_template: str) -> tuple[list[dict], list | None]:
    """Messages (and the `tools` argument) for the template. Templates that render tools get them
    as they are; for others the tools go into the system message and tool calls and results into
    the text of the turns, so the model sees them in the format it is asked to answer in."""
    if template_renders_tools(chat_template):
        specs = [{"type": "function", "function": f} for f in tools.functions] if tools else None
        return messages, specs
    out = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = [_call_text((c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments"))
                     for c in message.pop("tool_calls")]
            text = message.get("content") or ""
            message["content"] = "\n".join(([text] if isinstance(text, str) and text else []) + calls)
        elif message.get("role") == "tool":
            message.pop("tool_call_id", None)
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            message["content"] = f"<tool_response>\n{content}\n</tool_response>"
        out.append(message)
    if tools:
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + _system_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": _system_text(tools)})
    return out, None


# ---- the grammar -------------------------------------------------------------------------------

def call_grammar(tools: ToolSet) -> GrammarSpec | None:
    """For required / a named function: the output is one or more (one if not parallel) call blocks,
    nothing else, each call's arguments valid for that function's parameters schema."""
    if tools.mode == "auto":
        return None
    chosen = [f for f in tools.functions if tools.mode == "required" or f["name"] == tools.forced]
    tags = [{"type": "tag", "begin": f'{OPEN}\n{{"name": {json.dumps(f["name"])}, "arguments": ',
             "content": {"type": "json_schema", "json_schema": f["parameters"]},
             "end": f"}}\n{CLOSE}"} for f in chosen]
    single = tools.mode == "function" or not tools.parallel
    tag = {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                "at_least_one": True, "stop_after_first": single}}
    return GrammarSpec("structural_tag", json.dumps(tag))


# ---- parsing the output ------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_of(body: str, names: set[str]) -> dict | None:
    """{"name", "arguments" (a JSON string)} from one block's JSON, or None if it is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return {"name": value["name"], "arguments": arguments}
    return {"name": value["name"], "arguments": json.dumps(arguments)}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict]]:
    """(the text outside call blocks, the calls) from a whole output; a block that does not parse
    as a call of an offered function stays in the text."""
    content, calls, last = [], [], 0
    for match in _CALL.finditer(text):
        call = _call_of(match.group(1), names)
        if call is None:
            continue
        content.append(text[last:match.start()])
        calls.append(call)
        last = match.end()
    content.append(text[last:])
    return "".join(content).strip() if calls else text, calls


@dataclass
class ToolCallStream:
    """Splits streamed text into content and whole calls: text that may begin a call block is held
    back until it does or cannot; a block is emitted once it closes (or the output ends)."""

    names: set[str]
    buffer: str = ""
    calls: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content safe to send now, calls completed by this text)."""
        self.buffer += text
        content, done = "", []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, OPEN)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return content, done
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                content += self.buffer[:start]
                self.buffer = self.buffer[start:]
                return content, done
            call = _call_of(self.buffer[start + len(OPEN):end].strip(), self.names)
            block_end = end + len(CLOSE)
            if call is None:
                content += self.buffer[:block_end]
            else:
                content += self.buffer[:start]
                done.append(call)
                self.calls.append(call)
            self.buffer = self.buffer[block_end:].lstrip("\n") if call else self.buffer[block_end:]

    def finish(self) -> tuple[str, list[dict]]:
        """What is left when the output ends: an unclosed block that parses is a call."""
        rest, self.buffer = self.buffer, ""
        if rest.startswith(OPEN):
            call = _call_of(rest[len(OPEN):].strip(), self.names)
            if call is not None:
                self.calls.append(call)
                return "", [call]
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
