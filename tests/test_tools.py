"""Tool calls parsed from literal outputs (whole and streamed in every split), tool_choice parsing,
and the history a template without tool support is given."""
from __future__ import annotations

import json

import pytest

from gateway.errors import APIError
from gateway.tools import ToolCallStream, call_grammar, parse_tool_calls, parse_tools, prepare_messages

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
