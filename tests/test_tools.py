"""Tool calls parsed from literal outputs (whole and streamed in every split), tool_choice parsing,
and the history a template without tool support is given."""
from __future__ import annotations

import json

import pytest

from gateway.errors import APIError
from gateway.tool_calls import ToolCallStream, parse_tool_calls
from gateway.tools import CallFormat, call_grammar, parse_tools, prepare_messages, tool_format

NAMES = {"get_weather", "get_time"}
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_parse_whole_output():
    content, calls = parse_tool_calls(TWO_CALLS, NAMES)
    assert content == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                     {"name": "get_time", "arguments": '{"tz": "CET"}'}]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls)


@pytest.mark.parametrize("text", [
    "no call here",
    '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>',      # not an offered function
    "<tool_call>not json</tool_call>",
])
def test_text_that_is_not_a_call_stays_text(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_unclosed_block_at_the_end_and_parameters_key():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "parameters": {"tz": "UTC"}}', NAMES)
    assert content == "" and calls == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_stream_in_every_split(step):
    stream = ToolCallStream(NAMES)
    content, calls = "", []
    for i in range(0, len(TWO_CALLS), step):
        text, done = stream.feed(TWO_CALLS[i:i + step])
        assert "<tool" not in text
        content, calls = content + text, calls + done
    text, done = stream.finish()
    content, calls = content + text, calls + done
    assert content.strip() == "Let me check."
    assert calls == parse_tool_calls(TWO_CALLS, NAMES)[1]


def test_stream_holds_back_only_a_possible_tag():
    stream = ToolCallStream(NAMES)
    assert stream.feed("a <b> c <to") == ("a <b> c ", [])
    assert stream.feed("day") == ("<today", [])


def test_tool_choice():
    assert parse_tools(TOOLS, None).mode == "auto"
    assert parse_tools(TOOLS, "none") is None
    assert parse_tools(TOOLS, "required").mode == "required"
    named = parse_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, parallel=False)
    assert (named.mode, named.forced, named.parallel) == ("function", "get_time", False)
    assert parse_tools(None, None) is None
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(APIError) as info:
            parse_tools(TOOLS, bad)
        assert info.value.status == 400 and info.value.param == "tool_choice"
    with pytest.raises(APIError):
        parse_tools([{"type": "function", "function": {"description": "no name"}}], None)


def test_grammar_for_forced_calls():
    assert call_grammar(parse_tools(TOOLS, "auto")) is None
    spec = call_grammar(parse_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}))
    fmt = json.loads(spec.source)["format"]
    assert fmt["at_least_one"] and fmt["stop_after_first"]
    assert [t["content"]["json_schema"] for t in fmt["tags"]] == [TOOLS[0]["function"]["parameters"]]


def test_history_for_a_template_without_tools():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    out, specs = prepare_messages(messages, parse_tools(TOOLS, "auto"), "{{ messages }}")
    assert specs is None and out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert parse_tool_calls(out[2]["content"], NAMES)[1] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert out[3] == {"role": "tool", "content": "<tool_response>\n18 C\n</tool_response>"}
    same, specs = prepare_messages(messages, parse_tools(TOOLS, "auto"), "{% for t in tools %}{% endfor %}")
    assert same is messages and specs[0]["function"]["name"] == "get_weather"


# ---- per-model call formats --------------------------------------------------------------------
# Short excerpts of each family's chat template, holding the markers the detection reads.

QWEN25 = ('{%- if tools %}{{- "# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}'
          '{{- "</tools>\\n\\nFor each function call, return a json object with function name and arguments '
          'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
          '\\"arguments\\": <args-json-object>}\\n</tool_call>" }}{%- endif %}')
LLAMA31 = ('{%- if tools is not none %}{%- set tools_in_user_message = true %}{%- endif %}'
           '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name '
           'and its value}.Do not use variables.\\n\\n\' }}'
           '{%- if not message.tool_calls|length == 1 %}'
           '{{- raise_exception("This model only supports single tool-calls at once!") }}{%- endif %}'
           '{{- "<|python_tag|>" + tool_call.name + ".call(" }}'
           '{%- elif message.role == "tool" or message.role == "ipython" %}'
           '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
LLAMA32_NO_TAG = ('{%- for t in tools %}{{- t | tojson }}{%- endfor %}'
                  '{{- \'Given the following functions, respond with a JSON for a function call. Respond in the '
                  'format {\\"name\\": function name, \\"parameters\\": dictionary of argument name and its value}.'
                  ' Several calls are separated by ";".\' }}'
                  '{%- elif message.role == "ipython" %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}')
MISTRAL_V3 = ('{%- if tools is not none and (message == user_messages[-1]) %}{{- "[AVAILABLE_TOOLS] [" }}'
              '{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- "[TOOL_CALLS] [" }}'
              '{%- if not tool_call.id is defined or tool_call.id|length != 9 %}'
              '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}')
MISTRAL_NEMO = '{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}{{- "[TOOL_CALLS][" }}'
MISTRAL_ARGS = ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
                "{{- '[TOOL_CALLS]' + tool_call.function.name + '[ARGS]' + arguments }}")
SMOLLM2 = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% endfor %}"
UNKNOWN_WITH_TOOLS = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"


@pytest.mark.parametrize("template, name, template_tools, parallel, opener, result_role", [
    (QWEN25, "hermes", True, True, "", "tool"),
    (SMOLLM2, "hermes", False, True, "", "tool"),                 # system-prompt fallback
    (UNKNOWN_WITH_TOOLS, "hermes", True, True, "", "tool"),
    (LLAMA31, "llama3", True, False, "", "tool"),
    (LLAMA32_NO_TAG, "llama3", True, True, "", "ipython"),
    (MISTRAL_V3, "mistral", True, True, "[TOOL_CALLS] [", "tool"),
    (MISTRAL_NEMO, "mistral", True, True, "[TOOL_CALLS][", "tool"),
    (MISTRAL_ARGS, "mistral", True, True, "[TOOL_CALLS]", "tool"),
])
def test_format_detection(template, name, template_tools, parallel, opener, result_role):
    fmt = tool_format(template)
    assert (fmt.name, fmt.template_tools, fmt.parallel, fmt.opener, fmt.result_role) == \
        (name, template_tools, parallel, opener, result_role)
    assert tool_format(template) is fmt                             # chosen once per template


HERMES_T = CallFormat("hermes", template_tools=True)
LLAMA3 = CallFormat("llama3", template_tools=True)
MISTRAL = CallFormat("mistral", template_tools=True, opener="[TOOL_CALLS] [")
WEATHER_CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
TIME_CALL = {"name": "get_time", "arguments": '{"tz": "CET"}'}

# (format, text, content, calls): whole-output results, which every streamed split must equal
CASES = [
    (HERMES_T, TWO_CALLS, "Let me check.", [WEATHER_CALL, TIME_CALL]),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER_CALL]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER_CALL]),
    (LLAMA3, '\n{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
             '"parameters": {"tz": "CET"}}\n', "", [WEATHER_CALL, TIME_CALL]),
    (LLAMA3, 'Sure.<|python_tag|>{"name": "get_time", "parameters": {"tz": "CET"}}', "Sure.", [TIME_CALL]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_time", "arguments": {"tz": "CET"}}]', "", [WEATHER_CALL, TIME_CALL]),
    (MISTRAL, 'Checking. [TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "CET"}}]', "Checking.", [TIME_CALL]),
    (MISTRAL, ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER_CALL]),   # marker dropped
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}', "",
     [WEATHER_CALL, TIME_CALL]),
]

# text that is not a call stays content, whole and streamed
NOT_CALLS = [
    (LLAMA3, "The weather is fine."),
    (LLAMA3, 'Here you go: {"name": "get_weather", "parameters": {"city": "Paris"}}'),    # not the whole reply
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}} is the call I would make'),
    (LLAMA3, '{"answer": 42}'),
    (LLAMA3, '{"name": "unknown_fn", "parameters": {}}'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": '),                           # cut short
    (LLAMA3, "<|python_tag|>brave_search.call(query=\"x\")"),
    (MISTRAL, "[1, 2, 3] are the numbers"),
    (MISTRAL, "[TOOL_CALLS] [not json]"),
    (MISTRAL, '[TOOL_CALLS] [{"name": "unknown_fn", "arguments": {}}]'),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "nope"}]'),
    (MISTRAL, "[TOOL_CALLS]get_weather[ARGS]{oops}"),
    (MISTRAL, "Use [brackets] freely"),
    (HERMES_T, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}]'),     # another format's call
    (LLAMA3, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"),
]


def _streamed(text, fmt, pieces):
    stream = ToolCallStream(NAMES, fmt)
    content, calls = "", []
    for piece in pieces:
        sent, done = stream.feed(piece)
        content, calls = content + sent, calls + done
    sent, done = stream.finish()
    return content + sent, calls + done


def _splits(text):
    yield [text]
    yield list(text)                                                # one character at a time
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_each_format_whole_and_streamed_at_every_split(fmt, text, content, calls):
    assert parse_tool_calls(text, NAMES, fmt) == (content, calls)
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls)
    for pieces in _splits(text):
        streamed_content, streamed_calls = _streamed(text, fmt, pieces)
        assert streamed_calls == calls, pieces
        assert streamed_content.strip() == content, pieces


@pytest.mark.parametrize("fmt, text", NOT_CALLS)
def test_each_format_leaves_non_calls_as_text(fmt, text):
    assert parse_tool_calls(text, NAMES, fmt) == (text, [])
    for pieces in _splits(text):
        assert _streamed(text, fmt, pieces) == (text, []), pieces


def test_streaming_holds_back_only_what_may_begin_a_call():
    llama = ToolCallStream(NAMES, LLAMA3)
    assert llama.feed('{"name": "get_weather", ') == ("", [])       # the reply may be a call
    assert llama.feed('"parameters": {"city": "Paris"}}') == ("", [])
    assert llama.finish() == ("", [WEATHER_CALL])
    llama = ToolCallStream(NAMES, LLAMA3)
    assert llama.feed("Hi <|pyt") == ("Hi ", [])                    # a partial <|python_tag|>
    assert llama.feed("hon") == ("", [])
    assert llama.feed("ic") == ("<|pythonic", [])
    mistral = ToolCallStream(NAMES, MISTRAL)
    assert mistral.feed("Sure [TOOL_CA") == ("Sure ", [])
    assert mistral.feed('LLS] [{"name": "get_time", "arguments": {"tz": "CET"}}]') == ("", [TIME_CALL])
    assert mistral.feed(" done") == (" done", [])
    assert mistral.finish() == ("", [])


def test_names_carry_the_format():
    tools = parse_tools(TOOLS, "auto")
    tools.format = LLAMA3
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_tool_calls(text, tools.names) == ("", [WEATHER_CALL])
    assert ToolCallStream(tools.names).format is LLAMA3
    assert parse_tool_calls(text, NAMES) == (text, [])              # a plain set: hermes


# ---- forced-call grammars ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiler():
    from backends.source import resolve_source
    from gateway.grammar import compiler_for
    from gateway.templating import load_tokenizer
    tokenizer = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct"))
    return compiler_for(tokenizer, tokenizer.vocab_size), sorted(tokenizer.eos_token_ids)[0]


def _accepts(compiler, spec, text) -> bool:
    """The grammar takes the whole text and may end there (the end-of-turn token is allowed)."""
    import xgrammar as xgr
    compiled, eos = compiler
    matcher = xgr.GrammarMatcher(compiled.compile(spec))
    return bool(matcher.accept_string(text)) and bool(matcher.accept_token(eos)) and matcher.is_terminated()


TOOLS_TZ = [TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
MISTRAL_ARGS_FMT = CallFormat("mistral", template_tools=True, opener="[TOOL_CALLS]")
CANONICAL = {   # one forced call of get_weather, as each format's grammar writes it
    "hermes": (HERMES_T, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    "llama3": (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    "mistral": (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    "mistral_args": (MISTRAL_ARGS_FMT, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
}


@pytest.mark.parametrize("kind", sorted(CANONICAL))
def test_forced_call_grammar_writes_what_the_parser_reads(compiler, kind):
    fmt, text = CANONICAL[kind]
    spec = call_grammar(parse_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}), fmt)
    assert _accepts(compiler, spec, text)
    assert parse_tool_calls(text, NAMES, fmt) == ("", [WEATHER_CALL])
    for other, (_, other_text) in CANONICAL.items():
        if other != kind:
            assert not _accepts(compiler, spec, other_text), other
    assert not _accepts(compiler, spec, text.replace('"Paris"', "18"))      # arguments follow the schema
    assert not _accepts(compiler, spec, "Sure. " + text)                    # nothing but the call


@pytest.mark.parametrize("fmt, two", [
    (HERMES_T, TWO_CALLS.split("\n", 1)[1]),
    (CallFormat("llama3", template_tools=True, parallel=True),
     '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "CET"}}'),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_time", "arguments": {"tz": "CET"}}]'),
    (MISTRAL_ARGS_FMT, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'),
])
def test_required_grammar_allows_parallel_calls_the_parser_reads(compiler, fmt, two):
    spec = call_grammar(parse_tools(TOOLS_TZ, "required"), fmt)
    assert _accepts(compiler, spec, two)
    assert parse_tool_calls(two, NAMES, fmt)[1] == [WEATHER_CALL, TIME_CALL]
    single = call_grammar(parse_tools(TOOLS_TZ, "required", parallel=False), fmt)
    assert not _accepts(compiler, single, two)


def test_single_call_template_gets_a_single_call_grammar(compiler):
    two = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "CET"}}'
    spec = call_grammar(parse_tools(TOOLS_TZ, "required"), tool_format(LLAMA31))
    assert not _accepts(compiler, spec, two)
    assert _accepts(compiler, spec, two.split("; ")[0])


# ---- follow-ups rendered as each template expects ----------------------------------------------

FOLLOW_UP = [{"role": "user", "content": "Weather in Paris, time in CET?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_0123456789abcdef01234567", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                 {"id": "call_fedcba987654321001234567", "type": "function",
                  "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
             {"role": "tool", "tool_call_id": "call_fedcba987654321001234567", "content": "12:00"},
             {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "18 C"}]


def test_follow_up_for_mistral_has_nine_character_ids():
    out, specs = prepare_messages(FOLLOW_UP, parse_tools(TOOLS, "auto"), MISTRAL_V3)
    assert [s["function"]["name"] for s in specs] == ["get_weather", "get_time"]
    ids = [c["id"] for c in out[1]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == 2
    assert [m["tool_call_id"] for m in out[2:]] == [ids[1], ids[0]]           # still paired with their calls
    assert FOLLOW_UP[1]["tool_calls"][0]["id"].startswith("call_")           # the request is not changed


def test_follow_up_for_a_single_call_llama_template():
    out, _ = prepare_messages(FOLLOW_UP, None, LLAMA31)
    assert [(m["role"], [c["function"]["name"] for c in m.get("tool_calls", [])], m.get("content")) for m in out] == [
        ("user", [], FOLLOW_UP[0]["content"]), ("assistant", ["get_weather"], None), ("tool", [], "18 C"),
        ("assistant", ["get_time"], ""), ("tool", [], "12:00")]
    out, _ = prepare_messages(FOLLOW_UP, None, LLAMA32_NO_TAG)              # renders results only as ipython
    assert [m["role"] for m in out] == ["user", "assistant", "ipython", "ipython"]


def test_follow_up_passes_through_for_a_template_that_renders_calls():
    out, specs = prepare_messages(FOLLOW_UP, parse_tools(TOOLS, "auto"), QWEN25)
    assert out is FOLLOW_UP and specs[0]["function"]["name"] == "get_weather"
