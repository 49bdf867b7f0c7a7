"""litellm, pointed at our server as an OpenAI-compatible endpoint."""
from __future__ import annotations

import asyncio
import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # no network fetch at import

import litellm  # noqa: E402

from tests.conftest import MODEL  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_litellm_completion(live_server):
    reply = litellm.completion(model=f"openai/{MODEL}", api_base=live_server.base_url, api_key="unused",
                               messages=MESSAGES, temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0


def test_litellm_stream_async(live_server):
    async def main() -> str:
        stream = await litellm.acompletion(model=f"openai/{MODEL}", api_base=live_server.base_url,
                                           api_key="unused", messages=MESSAGES, temperature=0, max_tokens=16,
                                           stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    assert "Paris" in asyncio.run(main())


def test_litellm_tool_call_and_json(live_server):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}
    reply = litellm.completion(model=f"openai/{MODEL}", api_base=live_server.base_url, api_key="unused",
                               messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
                               tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
              "required": ["answer"], "additionalProperties": False}
    reply = litellm.completion(model=f"openai/{MODEL}", api_base=live_server.base_url, api_key="unused",
                               messages=MESSAGES, temperature=0, max_tokens=40, response_format={
                                   "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert set(json.loads(reply.choices[0].message.content)) == {"answer"}
