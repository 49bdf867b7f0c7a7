"""Structured outputs and tool calls through the openai SDK against the live server: the guarantees
(JSON that parses and validates, schema-valid arguments, finish reasons, streamed assembly), not
the quality of the small model's words."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    # bounds keep a 135M model from writing digits or letters until max_tokens (the grammar enforces them)
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, City)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_sampled_output_validates(client, seed):
    schema = {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                               "maxItems": 3},
        "score": {"type": "number"}, "ok": {"type": "boolean"}},
        "required": ["title", "tags", "score", "ok"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Rate a film."}], temperature=1.0, seed=seed,
        max_tokens=120, response_format={"type": "json_schema",
                                         "json_schema": {"name": "rating", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user",
                                "content": 'Reply with a JSON object with one key, "answer", set to "yes".'}],
        temperature=0, max_tokens=80, response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_invalid_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}})
    error = info.value.body
    assert error["param"] == "response_format" and "wizard" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format={"type": "yaml"})


def test_named_tool_call(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("seed", [4, 5])
def test_required_tool_calls_sampled(client, seed):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome and the time in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed,
        max_tokens=150)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_parallel_tool_calls(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=100)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and len(calls) >= 2     # the greedy output has two
    assert len({c.id for c in calls}) == len(calls)


def test_tool_calls_streamed_match_non_streamed(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
                  tool_choice="required", parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole]
    assert len(whole) == 1                  # parallel_tool_calls false: one call


def test_follow_up_with_tool_results(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=30)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens
    none = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=10)
    assert none.choices[0].message.tool_calls is None
