"""Tool calling: the tools a request offers, how they reach the prompt, the grammar that forces a
call (the parsers that find calls in the output: gateway/tool_calls.py).

Models are trained on different call formats. Each model's is chosen once, from its chat template
(`tool_format`, cached per template text), and the same choice drives the parser, the forced-call
grammar and how earlier calls and results are rendered in follow-ups:

- hermes (Qwen 2 / 2.5, Hermes, and every template that does not render tools itself):
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
  one block per call, several for parallel calls, text allowed around them.
- llama3 (Llama 3.1 / 3.2 / 3.3): the call is the whole reply, a bare JSON object
      {"name": "get_weather", "parameters": {"city": "Paris"}}
  optionally after <|python_tag|>; several separated by ";" where the template allows it.
- mistral (templates that write [TOOL_CALLS]):
      [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]
  or, in the newer templates that write [ARGS], [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} per call.

A template that renders `tools` itself is given them, and earlier calls and results as messages
(adjusted to what it requires); one that does not (SmolLM2's, the ChatML fallback) gets them
described in the system message and earlier calls and results written into the turns' text, in the
hermes format, which is also what it is asked to answer in.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

from gateway.errors import APIError
from gateway.grammar import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


# ---- the model's call format -------------------------------------------------------------------

@dataclass(frozen=True)
class CallFormat:
    """How one model writes calls, read from its chat template."""

    name: str                       # "hermes", "llama3" or "mistral"
    template_tools: bool = False    # the template renders `tools`, calls and results itself
    parallel: bool = True           # the template lets one reply hold several calls
    opener: str = ""                # mistral: what its template writes before the calls
    result_role: str = "tool"       # the role the template renders tool results under


HERMES = CallFormat("hermes")       # and the system-prompt fallback for templates without tools

# Llama 3.1-3.3 templates ask for `{"name": function name, "parameters": dictionary of ...}` (the
# quotes may be escaped inside a Jinja string); 3.2 does not always write <|python_tag|>.
_LLAMA3_ASK = re.compile(r'\\?"name\\?"\s*:.{0,80}?\\?"parameters\\?"', re.DOTALL)
# A template that allows several calls in one reply says how they are separated ("... separated by ;").
_SEMICOLON_SEPARATED = re.compile(r"separat\w*.{0,40}?;", re.DOTALL)
_TOOL_ROLE = re.compile(r"""==\s*["']tool["']""")


def template_renders_tools(chat_template: str) -> bool:
    return "tools" in chat_template


@functools.lru_cache(maxsize=64)
def tool_format(chat_template: str) -> CallFormat:
    """The call format a chat template's model is trained on (cached: chosen once per template).

    The rules, in order, from what each family's template writes:
    - no `tools` in the template: it cannot show tools, so they go into the system prompt in the
      hermes format (today's ChatML fallback, SmolLM2);
    - `[TOOL_CALLS]`: a Mistral control token that only Mistral templates write. The opener is
      copied from the template ("[TOOL_CALLS] [" in v3, "[TOOL_CALLS][" in Nemo / Small) so a forced
      call is tokenised as the model saw it; `[ARGS]` marks the per-call name[ARGS]{...} form;
    - `<tool_call>`: the template writes hermes blocks itself (Qwen 2 / 2.5, Hermes 2 Pro / 3,
      including the Llama-based Hermes, hence checked before the Llama markers);
    - `<|python_tag|>` or a request for {"name": ..., "parameters": ...}: Llama 3.1-3.3. Their
      templates allow one call per reply (3.1 raises "only supports single tool-calls") unless the
      template says calls are separated by ";". Results keep role "tool" when the template handles
      it (3.1 renders "tool" and "ipython" alike, as ipython), else go under "ipython";
    - anything else that renders tools: hermes, the most common convention (today's behaviour).
    """
    t = chat_template
    if not template_renders_tools(t):
        return HERMES
    if TOOL_CALLS in t:
        if ARGS in t:
            opener = TOOL_CALLS
        else:
            opener = TOOL_CALLS + " [" if TOOL_CALLS + " [" in t else TOOL_CALLS + "["
        return CallFormat("mistral", template_tools=True, opener=opener)
    if OPEN in t:
        return CallFormat("hermes", template_tools=True)
    if PYTHON_TAG in t or _LLAMA3_ASK.search(t):
        parallel = "single tool-call" not in t and bool(_SEMICOLON_SEPARATED.search(t))
        role = "ipython" if "ipython" in t and not _TOOL_ROLE.search(t) else "tool"
        return CallFormat("llama3", template_tools=True, parallel=parallel, result_role=role)
    return CallFormat("hermes", template_tools=True)


# ---- the request's tools -----------------------------------------------------------------------

class ToolNames(frozenset):
    """The offered function names, carrying the call format of the model they were offered to, so
    code that hands `tools.names` to the parsers reads the model's own format."""

    format: CallFormat

    def __new__(cls, names=(), fmt: CallFormat = HERMES):
        self = super().__new__(cls, names)
        self.format = fmt
        return self


@dataclass
class ToolSet:
    """The functions a request offers and how the model may use them.

    mode: "auto" (the model decides), "required" (at least one call), or "function" (exactly
    `forced`); tool_choice "none" means no ToolSet at all. `format` is the model's call format:
    the request's tools are parsed before the model is known, so chat planning (gateway/chat.py)
    sets it once it is.
    """

    functions: tuple[dict, ...]        # {"name", "description", "parameters"} per function
    mode: str = "auto"
    forced: str | None = None
    parallel: bool = True
    format: CallFormat = HERMES

    @property
    def names(self) -> ToolNames:
        return ToolNames((f["name"] for f in self.functions), self.format)


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
    """Messages (and the `tools` argument) for the template. Templates that render tools get them,
    and the messages as they are, save for what the template requires (`_for_template`); for
    others the tools go into the system message and tool calls and results into the text of the
    turns, so the model sees them in the format it is asked to answer in."""
    fmt = tool_format(chat_template)
    if fmt.template_tools:
        specs = [{"type": "function", "function": f} for f in tools.functions] if tools else None
        return _for_template(messages, fmt), specs
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


def _for_template(messages: list[dict], fmt: CallFormat) -> list[dict]:
    """Follow-up messages for a template that renders calls and results itself. Arguments become
    objects in gateway/templating.py (templates `tojson` them); here only what a family's template
    checks: Mistral's raise unless call ids are 9 alphanumerics, Llama's take one call per
    assistant turn and (some) results only under role "ipython"."""
    if fmt.name == "mistral":
        return [_mistral_ids(m) for m in messages]
    if fmt.name == "llama3":
        out = messages if fmt.parallel else _one_call_per_turn(messages)
        if fmt.result_role != "tool":
            out = [{**m, "role": fmt.result_role} if m.get("role") == "tool" else m for m in out]
        return out
    return messages


def _mistral_id(call_id) -> str:
    # Mistral's tokenizer writes 9-character alphanumeric ids and its templates insist on them; ours
    # are "call_" + 24 hex. A digest of the id keeps a call and its result paired across turns.
    if isinstance(call_id, str) and re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    return hashlib.sha256(str(call_id).encode()).hexdigest()[:9]


def _mistral_ids(message: dict) -> dict:
    if message.get("role") == "assistant" and message.get("tool_calls"):
        calls = [{**c, "id": _mistral_id(c.get("id"))} if isinstance(c, dict) else c for c in message["tool_calls"]]
        return {**message, "tool_calls": calls}
    if message.get("role") == "tool" and message.get("tool_call_id") is not None:
        return {**message, "tool_call_id": _mistral_id(message["tool_call_id"])}
    return message


def _one_call_per_turn(messages: list[dict]) -> list[dict]:
    """An assistant turn with several calls, followed by their results, as one turn per call each
    followed by its own result (matched by tool_call_id): what a single-call template can render."""
    out, i = [], 0
    while i < len(messages):
        message = messages[i]
        calls = message.get("tool_calls") or [] if message.get("role") == "assistant" else []
        if len(calls) <= 1:
            out.append(message)
            i += 1
            continue
        j = i + 1
        while j < len(messages) and messages[j].get("role") == "tool":
            j += 1
        results = messages[i + 1:j]
        ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
        for k, (call, call_id) in enumerate(zip(calls, ids, strict=True)):
            out.append({**message, "content": message.get("content") if k == 0 else "", "tool_calls": [call]})
            out += [r for r in results if r.get("tool_call_id") == call_id]
        out += [r for r in results if r.get("tool_call_id") not in ids]
        i = j
    return out


# ---- the grammar -------------------------------------------------------------------------------

def call_grammar(tools: ToolSet, fmt: CallFormat | None = None) -> GrammarSpec | None:
    """For required / a named function: the output is one or more (one if not parallel) calls in
    the model's format (`fmt`, else `tools.format`), exactly as its parser reads them and nothing
    else, each call's arguments valid for that function's parameters schema."""
    if tools.mode == "auto":
        return None
    fmt = fmt or tools.format
    chosen = [f for f in tools.functions if tools.mode == "required" or f["name"] == tools.forced]
    single = tools.mode == "function" or not tools.parallel or not fmt.parallel

    def tags(begin, end: str, separator: str) -> dict:
        return {"type": "tags_with_separator", "separator": separator, "at_least_one": True,
                "stop_after_first": single,
                "tags": [{"type": "tag", "begin": begin(f), "end": end,
                          "content": {"type": "json_schema", "json_schema": f["parameters"]}} for f in chosen]}

    if fmt.name == "llama3":
        body = tags(lambda f: f'{{"name": {json.dumps(f["name"])}, "parameters": ', "}", "; ")
    elif fmt.name == "mistral" and fmt.opener == TOOL_CALLS:
        body = tags(lambda f: f"{TOOL_CALLS}{f['name']}{ARGS}", "", "")
    elif fmt.name == "mistral":
        body = {"type": "sequence", "elements": [
            {"type": "const_string", "value": fmt.opener},
            tags(lambda f: f'{{"name": {json.dumps(f["name"])}, "arguments": ', "}", ", "),
            {"type": "const_string", "value": "]"}]}
    else:
        body = tags(lambda f: f'{OPEN}\n{{"name": {json.dumps(f["name"])}, "arguments": ', f"}}\n{CLOSE}", "\n")
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": body}))


# ---- parsing the output ------------------------------------------------------------------------
