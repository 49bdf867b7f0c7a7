"""Multi-turn chat over real HTTP with the radix cache on vs off, in one run.

C concurrent conversations x R rounds share one system prompt; each round appends the model's
reply and a new user turn. Prints, per round and mode: prompt tokens, cached tokens, hit rate,
TTFT p50/p95, and the on/off ratios.

    python bench/multiturn.py --conversations 4 --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from bench.serve_process import radixgate_server  # noqa: E402

SYSTEM = ("You are a careful assistant for a library. You answer questions about books, opening hours, "
          "membership rules, late fees and events. Keep answers short and friendly, and when you do not "
          "know something, say so and suggest asking a librarian at the front desk. ") * 4
TOPICS = ["science fiction", "gardening", "Roman history", "cooking", "astronomy", "jazz", "chess", "poetry"]
TURNS = ["Can you recommend a book about {t}?", "Is there a shorter one?", "Who wrote it?",
         "Can I borrow it for three weeks?", "What is the late fee if I keep it longer?",
         "Are there events about {t} this month?", "Thanks. Anything for children?"]


async def conversation(client, model: str, index: int, rounds: int, max_tokens: int, record) -> None:
    topic = TOPICS[index % len(TOPICS)]
    messages = [{"role": "system", "content": SYSTEM}]
    for round_no in range(rounds):
        turn = TURNS[round_no % len(TURNS)].format(t=topic)
        messages.append({"role": "user", "content": f"(visitor {index}) {turn}"})
        started = time.perf_counter()
        first = None
        text, usage = [], None
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        ttft = (first or time.perf_counter()) - started
        record(round_no, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, ttft)
        messages.append({"role": "assistant", "content": "".join(text)})


async def run_mode(base_url: str, model: str, conversations: int, rounds: int, max_tokens: int) -> tuple[dict, float]:
    rows: dict[int, list[tuple[int, int, float]]] = {r: [] for r in range(rounds)}
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()
    await asyncio.gather(*(conversation(client, model, i, rounds, max_tokens,
                                        lambda r, p, c, t: rows[r].append((p, c, t)))
                           for i in range(conversations)))
    total = time.perf_counter() - started
    await client.close()
    return rows, total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--source", default="packaged:smollm2-135m-instruct")
    args = parser.parse_args()
    name = "bench-model"
    results = {}
    for mode, enabled in (("on", True), ("off", False)):
        model = {"name": name, "source": args.source, "scheduler": {"radix_cache": enabled}}
        with radixgate_server(model) as url:
            asyncio.run(run_mode(url, name, 1, 1, 4))        # warm-up, not measured
            results[mode] = asyncio.run(run_mode(url, name, args.conversations, args.rounds, args.max_tokens))
    print(f"\n{args.conversations} conversations x {args.rounds} rounds, shared system prompt, "
          f"max_tokens {args.max_tokens}, greedy")
    print("round | prompt tok | cached on | hit on | hit off | TTFT p50 on/off (ms) | TTFT p95 on/off (ms) | p50 ratio")
    for r in range(args.rounds):
        on, off = results["on"][0][r], results["off"][0][r]
        prompt = sum(p for p, _, _ in on)
        cached_on = sum(c for _, c, _ in on)
        hit_off = sum(c for _, c, _ in off) / sum(p for p, _, _ in off)
        p50_on, p50_off = statistics.median([t for *_, t in on]), statistics.median([t for *_, t in off])
        p95_on, p95_off = percentile([t for *_, t in on], .95), percentile([t for *_, t in off], .95)
        print(f"{r + 1:5d} | {prompt:10d} | {cached_on:9d} | {cached_on / prompt:6.1%} | {hit_off:7.1%} | "
              f"{p50_on * 1e3:8.0f} / {p50_off * 1e3:8.0f} | {p95_on * 1e3:8.0f} / {p95_off * 1e3:8.0f} | "
              f"{p50_off / p50_on:6.2f}x")
    later = [r for r in range(2, args.rounds)]
    ttft_on = [t for r in later for *_, t in results["on"][0][r]]
    ttft_off = [t for r in later for *_, t in results["off"][0][r]]
    hits = [sum(c for _, c, _ in results["on"][0][r]) / sum(p for p, _, _ in results["on"][0][r])
            for r in range(1, args.rounds)]
    p50_on, p50_off = statistics.median(ttft_on), statistics.median(ttft_off)
    print(f"hit rate rounds 2+: min {min(hits):.1%}; TTFT rounds 3+ p50 on {p50_on * 1e3:.0f} ms"
          f" vs off {p50_off * 1e3:.0f} ms = {p50_off / p50_on:.2f}x;"
          f" total time on {results['on'][1]:.1f} s vs off {results['off'][1]:.1f} s")


if __name__ == "__main__":
    main()
