"""Multi-turn chat over real HTTP, side by side in one run. Three modes:

  shared   C concurrent conversations x R rounds share one system prompt; radix cache on vs off.
  tiers    C conversations, each with its own long context, take turns one at a time, so between two
           turns of one conversation the others pass through L1: a working set --working-set-x times
           larger than L1 (kv_cache.num_pages). KV tiers (L2 host + L3 disk) on vs off.
  restart  each conversation's first round, then the server is stopped and started again over the
           same disk_cache_dir, then the second round: L3 on vs off (off: the continued conversation
           is computed cold).

Prints per mode: prompt tokens, cached tokens, hit rate, TTFT p50/p95 and the ratios.

    python bench/multiturn.py --mode shared --conversations 4 --rounds 5
    python bench/multiturn.py --mode tiers --conversations 8 --rounds 3
    python bench/multiturn.py --mode restart --conversations 4
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
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
PAGE = 16


def own_context(index: int, words: int) -> str:
    """A visitor's own record: long, and shared with no other conversation."""
    items = [f"{TOPICS[(index + j) % len(TOPICS)]} title {index * 1000 + j} returned on day {j % 28 + 1}"
             for j in range(words // 8)]
    return f"Visitor {index} borrowing history: " + "; ".join(items) + "."


class Conversation:
    def __init__(self, index: int, context_words: int):
        self.index = index
        system = SYSTEM if context_words == 0 else SYSTEM[:300] + " " + own_context(index, context_words)
        self.messages = [{"role": "system", "content": system}]

    async def turn(self, client, model: str, round_no: int, max_tokens: int) -> tuple[int, int, float]:
        """One user turn and the reply (appended); returns (prompt tokens, cached tokens, TTFT s)."""
        topic = TOPICS[self.index % len(TOPICS)]
        self.messages.append({"role": "user", "content": f"(visitor {self.index}) "
                                                         f"{TURNS[round_no % len(TURNS)].format(t=topic)}"})
        started = time.perf_counter()
        first, text, usage = None, [], None
        stream = await client.chat.completions.create(
            model=model, messages=self.messages, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        self.messages.append({"role": "assistant", "content": "".join(text)})
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, (first or time.perf_counter()) - started


def client_for(url: str):
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900)


async def run_rounds(url: str, model: str, conversations: list[Conversation], rounds: range, max_tokens: int,
                     concurrent: bool) -> dict[int, list[tuple[int, int, float]]]:
    """rows[round] = (prompt, cached, ttft) per turn; concurrent: all conversations at once per round,
    else one turn at a time, conversation after conversation."""
    rows: dict[int, list] = {r: [] for r in rounds}
    client = client_for(url)
    for r in rounds:
        if concurrent:
            rows[r] = list(await asyncio.gather(*(c.turn(client, model, r, max_tokens) for c in conversations)))
        else:
            for c in conversations:
                rows[r].append(await c.turn(client, model, r, max_tokens))
    await client.close()
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def hit(rows: list) -> float:
    return sum(c for _, c, _ in rows) / max(1, sum(p for p, _, _ in rows))


def p50(rows: list) -> float:
    return statistics.median([t for *_, t in rows])


def warm_up(url: str, model: str) -> None:
    """One short request that shares no page with the measured prompts."""
    conversation = Conversation(999, 0)
    conversation.messages[0]["content"] = "Warm-up: answer with one word."
    asyncio.run(run_rounds(url, model, [conversation], range(1), 4, False))


def model_config(args, **kv_cache) -> dict:
    return {"name": "bench-model", "source": args.source, "kv_cache": {"page_size": PAGE, **kv_cache}}


def mode_shared(args) -> None:
    results = {}
    for mode, enabled in (("on", True), ("off", False)):
        model = {**model_config(args), "scheduler": {"radix_cache": enabled}}
        with radixgate_server(model) as url:
            warm_up(url, "bench-model")
            conversations = [Conversation(i, 0) for i in range(args.conversations)]
            started = time.perf_counter()
            rows = asyncio.run(run_rounds(url, "bench-model", conversations, range(args.rounds), args.max_tokens, True))
            results[mode] = rows, time.perf_counter() - started
    print(f"\nshared: {args.conversations} conversations x {args.rounds} rounds, shared system prompt, "
          f"max_tokens {args.max_tokens}, greedy")
    print("round | prompt tok | cached on | hit on | hit off | TTFT p50 on/off (ms) | TTFT p95 on/off (ms) | p50 ratio")
    for r in range(args.rounds):
        on, off = results["on"][0][r], results["off"][0][r]
        print(f"{r + 1:5d} | {sum(p for p, _, _ in on):10d} | {sum(c for _, c, _ in on):9d} | {hit(on):6.1%} | "
              f"{hit(off):7.1%} | {p50(on) * 1e3:8.0f} / {p50(off) * 1e3:8.0f} | "
              f"{percentile([t for *_, t in on], .95) * 1e3:8.0f} / {percentile([t for *_, t in off], .95) * 1e3:8.0f}"
              f" | {p50(off) / p50(on):6.2f}x")
    later_on = [row for r in range(2, args.rounds) for row in results["on"][0][r]]
    later_off = [row for r in range(2, args.rounds) for row in results["off"][0][r]]
    hits = [hit(results["on"][0][r]) for r in range(1, args.rounds)]
    print(f"hit rate rounds 2+: min {min(hits):.1%}; TTFT rounds 3+ p50 on {p50(later_on) * 1e3:.0f} ms"
          f" vs off {p50(later_off) * 1e3:.0f} ms = {p50(later_off) / p50(later_on):.2f}x;"
          f" total time on {results['on'][1]:.1f} s vs off {results['off'][1]:.1f} s")


def mode_tiers(args) -> None:
    """Working set = every conversation's final prompt; L1 is sized to 1/working_set_x of it."""
    per_conversation = args.context_words * 1.5 + 100 + args.rounds * (args.max_tokens + 25)   # tokens, roughly
    l1_pages = max(8, int(args.conversations * per_conversation / PAGE / args.working_set_x))
    results = {}
    with tempfile.TemporaryDirectory() as disk:
        for mode, kv in (("on", {"host_cache_gb": args.host_cache_gb, "disk_cache_dir": disk}),
                         ("off", {"host_cache_gb": 0})):
            with radixgate_server(model_config(args, num_pages=l1_pages, **kv)) as url:
                warm_up(url, "bench-model")
                conversations = [Conversation(i, args.context_words) for i in range(args.conversations)]
                results[mode] = asyncio.run(run_rounds(url, "bench-model", conversations, range(args.rounds),
                                                       args.max_tokens, False))
    final = sum(p for p, _, _ in results["on"][args.rounds - 1])
    print(f"\ntiers: {args.conversations} conversations x {args.rounds} rounds, one turn at a time, "
          f"L1 {l1_pages} pages = {l1_pages * PAGE} tokens, working set {final} tokens = "
          f"{final / (l1_pages * PAGE):.1f}x L1, max_tokens {args.max_tokens}, greedy")
    print("round | prompt tok | hit on | hit off | hit ratio | TTFT p50 on/off (ms) | p50 ratio")
    for r in range(args.rounds):
        on, off = results["on"][r], results["off"][r]
        ratio = f"{hit(on) / hit(off):8.2f}x" if hit(off) else "     inf"
        print(f"{r + 1:5d} | {sum(p for p, _, _ in on):10d} | {hit(on):6.1%} | {hit(off):7.1%} | {ratio} | "
              f"{p50(on) * 1e3:8.0f} / {p50(off) * 1e3:8.0f} | {p50(off) / p50(on):6.2f}x")
    on = [row for r in range(1, args.rounds) for row in results["on"][r]]
    off = [row for r in range(1, args.rounds) for row in results["off"][r]]
    ratio = f"{hit(on) / hit(off):.2f}x" if hit(off) else "inf"
    print(f"rounds 2+: hit rate on {hit(on):.1%} vs off {hit(off):.1%} = {ratio}; TTFT p50 on "
          f"{p50(on) * 1e3:.0f} ms vs off {p50(off) * 1e3:.0f} ms = {p50(off) / p50(on):.2f}x")


def mode_restart(args) -> None:
    results = {}
    for mode in ("on", "off"):
        with tempfile.TemporaryDirectory() as disk:
            kv = {"host_cache_gb": args.host_cache_gb, "disk_cache_dir": disk} if mode == "on" else {"host_cache_gb": 0}
            model = model_config(args, **kv)
            conversations = [Conversation(i, args.context_words) for i in range(args.conversations)]
            with radixgate_server(model) as url:
                warm_up(url, "bench-model")
                first = asyncio.run(run_rounds(url, "bench-model", conversations, range(1), args.max_tokens, False))
            with radixgate_server(model) as url:        # a new process: L1 and L2 start empty
                warm_up(url, "bench-model")             # (its own prompt: it shares no page with the others)
                second = asyncio.run(run_rounds(url, "bench-model", conversations, range(1, 2), args.max_tokens,
                                                False))
            results[mode] = first[0], second[1]
    print(f"\nrestart: {args.conversations} conversations, round 1, server stopped and started again, round 2; "
          f"max_tokens {args.max_tokens}, greedy")
    print("mode | round 1 prompt tok | round 1 TTFT p50 (ms) | round 2 prompt tok | cached | hit "
          "| round 2 TTFT p50 (ms)")
    for mode in ("on", "off"):
        first, second = results[mode]
        print(f"{mode:4s} | {sum(p for p, _, _ in first):18d} | {p50(first) * 1e3:21.0f} | "
              f"{sum(p for p, _, _ in second):18d} | {sum(c for _, c, _ in second):6d} | {hit(second):5.1%} | "
              f"{p50(second) * 1e3:21.0f}")
    on, off = results["on"][1], results["off"][1]
    print(f"after the restart: TTFT p50 with L3 {p50(on) * 1e3:.0f} ms vs cold {p50(off) * 1e3:.0f} ms = "
          f"{p50(off) / p50(on):.2f}x faster; hit rate {hit(on):.1%} vs {hit(off):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["shared", "tiers", "restart"], default="shared")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--context-words", type=int, default=240, help="tiers/restart: each conversation's own "
                        "context, in words (about 2 tokens each)")
    parser.add_argument("--working-set-x", type=float, default=4.0, help="tiers: working set / L1")
    parser.add_argument("--host-cache-gb", type=float, default=1.0)
    parser.add_argument("--source", default="packaged:smollm2-135m-instruct")
    args = parser.parse_args()
    {"shared": mode_shared, "tiers": mode_tiers, "restart": mode_restart}[args.mode](args)


if __name__ == "__main__":
    main()
