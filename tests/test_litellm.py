"""litellm, pointed at our server as an OpenAI-compatible endpoint."""
from __future__ import annotations

import asyncio
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
