"""POST /v1/messages through the anthropic SDK: text, stop sequences, tools, streaming events, cache
usage and Anthropic-shaped errors."""
from __future__ import annotations

import uuid

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import MODEL

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                            "required": ["city"], "additionalProperties": False}}
# (this SDK version takes no `temperature` argument; it still travels in the body, as the API defines it)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(live_server):
    return anthropic.Anthropic(base_url=live_server.url, api_key="unused", max_retries=0)


def test_create_and_cache_read(client):
    system = "You are a terse assistant. " * 20
    first = client.messages.create(model=MODEL, max_tokens=16, system=system, messages=QUESTION,
                                   extra_body={"temperature": 0})
    assert first.type == "message" and first.role == "assistant" and first.stop_reason == "end_turn"
    assert "Paris" in first.content[0].text
    again = client.messages.create(model=MODEL, max_tokens=16, messages=QUESTION, extra_body={"temperature": 0},
                                   system=[{"type": "text", "text": system}])
    assert again.usage.cache_read_input_tokens >= 100
    total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total
    assert again.content[0].text == first.content[0].text


def test_max_tokens_and_stop_sequences(client):
    short = client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Tell a story."}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    counted = client.messages.create(
        model=MODEL, max_tokens=40, extra_body={"temperature": 0}, stop_sequences=["5"],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Count from 1 to 10 separated by commas."}]}])
    assert counted.stop_reason == "stop_sequence" and counted.stop_sequence == "5"
    assert "5" not in counted.content[0].text and "4" in counted.content[0].text


def test_stream_events(client):
    with client.messages.stream(model=MODEL, max_tokens=16, messages=QUESTION, extra_body={"temperature": 0}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds[-2] == "message_delta"
    assert kinds[1] == "content_block_start" and "content_block_delta" in kinds and "content_block_stop" in kinds
    assert "Paris" in final.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 1


def test_tool_use_and_result(client):
    reply = client.messages.create(model=MODEL, max_tokens=60, extra_body={"temperature": 0}, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert reply.stop_reason == "tool_use"
    [use] = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER["input_schema"])
    follow = client.messages.create(
        model=MODEL, max_tokens=20, extra_body={"temperature": 0}, tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]}])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with client.messages.stream(model=MODEL, max_tokens=60, extra_body={"temperature": 0}, tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"][0] == use.input


def test_errors_in_anthropic_shape(client, live_server):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=5, messages=QUESTION)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=QUESTION, extra_body={"temperature": 1.5})
    raw = httpx.post(f"{live_server.url}/v1/messages", json={"model": MODEL, "messages": QUESTION}, timeout=30)
    assert raw.status_code == 400
    body = raw.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    bad = httpx.post(f"{live_server.url}/v1/messages", content=b"{not json", timeout=30,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_count_tokens_is_what_a_request_uses(client):
    """messages.count_tokens gives the input a create with the same system, messages and tools
    computes (input plus cache-read tokens), and tools count."""
    system = f"[{uuid.uuid4().hex[:8]}] You answer in one word."
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=QUESTION)
    used = client.messages.create(model=MODEL, max_tokens=2, system=system, messages=QUESTION,
                                  extra_body={"temperature": 0}).usage
    assert counted.input_tokens == used.input_tokens + used.cache_read_input_tokens > 10
    with_tools = client.messages.count_tokens(model=MODEL, system=system, messages=QUESTION, tools=[WEATHER])
    used = client.messages.create(model=MODEL, max_tokens=2, system=system, messages=QUESTION, tools=[WEATHER],
                                  extra_body={"temperature": 0}).usage
    assert with_tools.input_tokens == used.input_tokens + used.cache_read_input_tokens > counted.input_tokens


def test_count_tokens_errors_in_anthropic_shape(client, live_server):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.count_tokens(model="no-such-model", messages=QUESTION)
    assert info.value.body["error"]["type"] == "not_found_error"
    raw = httpx.post(f"{live_server.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": []},
                     timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": ""}}]}]
    raw = httpx.post(f"{live_server.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": image},
                     timeout=30)
    assert raw.status_code == 400 and "'image' is not supported" in raw.json()["error"]["message"]
