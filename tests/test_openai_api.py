"""The official openai SDK (sync and async, stream and not) against the live server."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_stream_is_coherent(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_stream_chunks(client):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens >= 1
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens >= 0
    # the same text streamed and not streamed at temperature 0
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert whole.choices[0].message.content == text


def test_chat_length_finish_and_max_completion_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           max_completion_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_seed_reproducible_and_n(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Write a word."}], temperature=1.0,
                  max_tokens=12, seed=1234)
    # The first request computes the whole prompt, later ones find it in the radix cache and
    # compute only its tail. From then on a seeded request repeats exactly. (That the cold run
    # equals the warm ones too holds where the arithmetic is batch invariant, dtype float32:
    # tests/test_scheduler.py::test_seed_reproducible_float32.)
    client.chat.completions.create(**kwargs)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = client.chat.completions.create(n=3, **kwargs)
    again = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]


def test_stop_string_not_returned(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 10 separated by commas."}],
        temperature=0, max_tokens=40, stop=["5"])
    assert reply.choices[0].finish_reason == "stop"
    assert "5" not in reply.choices[0].message.content
    assert "4" in reply.choices[0].message.content


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-4   # greedy picks the best


def test_list_of_parts_and_developer_role(client):
    parts = [{"role": "developer", "content": "You answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of Italy?"}]}]
    plain = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "What is the capital of Italy?"}]
    a = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=12)
    b = client.chat.completions.create(model=MODEL, messages=plain, temperature=0, max_tokens=12)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_text_completions(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text.strip()
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")
    batch = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]


def test_async_client_concurrent(live_server):
    async def main():
        client = openai.AsyncOpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
        single = await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)

        async def streamed():
            stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                          max_tokens=16, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        alone = await streamed()                # the same request streamed, nothing else running
        texts = await asyncio.gather(*(streamed() for _ in range(4)))
        await client.close()
        return single.choices[0].message.content, alone, texts

    single, alone, texts = asyncio.run(main())
    assert alone == single            # streaming assembles exactly the non-streamed text
    # Four at once all complete; that their greedy text equals the solo one holds exactly for
    # float32 and up to near ties on the quantised default: tests/test_scheduler.py checks both.
    assert len(texts) == 4 and all("Paris" in text for text in texts), texts


def test_cached_tokens_on_repeat(client, live_server):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 20}] + QUESTION
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert first.choices[0].message.content == second.choices[0].message.content


def test_priority_extension(client, live_server):
    """`priority` (lower first) is accepted on both endpoints; the default policy is fcfs."""
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    urgent = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                            extra_body={"priority": -10})
    assert urgent.choices[0].message.content == plain.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, extra_body={"priority": 3})
    assert text.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="priority"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"priority": "high"})
    assert live_server.engine.call_sync("snapshot")["scheduler_policy"] == "fcfs"
