"""POST /v1/responses through the openai SDK (create, streamed and not, function tools, text.format)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
          "required": ["answer"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)


def test_create_text(client):
    reply = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                    instructions="Answer in one word.", max_output_tokens=16)
    assert reply.object == "response" and reply.status == "completed"
    assert "Paris" in reply.output_text
    assert reply.output[0].type == "message" and reply.output[0].role == "assistant"
    usage = reply.usage
    assert usage.input_tokens > 5 and usage.output_tokens >= 1
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    again = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                    instructions="Answer in one word.", max_output_tokens=16)
    assert again.usage.input_tokens_details.cached_tokens >= 16       # the prompt's pages are cached
    assert again.output_text == reply.output_text


def test_stream_events_in_order(client):
    # first unstreamed (twice), so the compared runs find the prompt cached (the int4 default may break a near tie
    # differently cold and cached: tests/test_scheduler.py)
    for _ in range(2):
        whole = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Say hello."}],
                                        temperature=0, max_output_tokens=12)
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Say hello."}],
                                          temperature=0, max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") \
        < kinds.index("response.output_text.done") < kinds.index("response.output_item.done")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens >= 1
    assert whole.output_text == text
    assert (final.status == "incomplete") == (final.incomplete_details is not None)


def test_text_format_json_schema(client):
    reply = client.responses.create(
        model=MODEL, input="Is the sky blue? Reply in JSON.", temperature=0, max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), ANSWER)


def test_function_call_and_follow_up(client):
    reply = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", temperature=0, max_output_tokens=60,
                                    parallel_tool_calls=False)
    [call] = [item for item in reply.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    follow = client.responses.create(
        model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=20,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 18}'}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > reply.usage.input_tokens


def test_function_call_streamed(client):
    with client.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                 max_output_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    [call] = [item for item in final.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_stateful_and_bad_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", text={"format": {"type": "json_schema", "name": "x",
                                                                          "schema": {"type": "nope"}}})
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")
