"""Mixed load over HTTP: short chats behind long documents, scheduler.policy fcfs vs fair, one run.

C clients loop for D seconds against a real `radixgate serve` (embedded model). Every request
carries one shared system prompt (cached after the warm-up); in each client's sequence one request
in eight is a long one, a unique document of ~T tokens to summarise, the rest are short questions.
Short requests alternate between streamed and plain; long ones are streamed (their TTFT is the
point). Every request asks for N tokens with ignore_eos, so both policies generate alike per
request. Three servers, one after the other: the fair policy without the long documents
(the baseline), then fcfs and fair with them. Prints one markdown table, with ratios.

Waits: a streamed request's time to first token; a plain one's whole time (its first token is not
observable, so its wait is counted in full). Aggregate tok/s, two ways: completion tokens of the
requests that ended within the D seconds, over D (the steady state); and of every request, over
the time from the first start to the last end (requests issued before D finish, so a policy that
leaves a backlog of long requests pays for draining it).

The default run is the issue's mix scaled down to fit ~8 minutes on 2 cores: 16 clients instead
of 32, ~1,500-token documents instead of 4.4k, 16 new tokens, 120 s of issuing per server. The
issue's own sizes: `--clients 32 --doc-tokens 4400 --duration 300` (~20 minutes).

    python bench/load.py admission
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.serve_process import radixgate_server  # noqa: E402

NAME = "bench-model"
SYSTEM = ("You are a helpful assistant at a city library. You answer questions about books, opening hours, "
          "membership, late fees and events, and you summarise documents that visitors bring. Answer "
          "briefly, be kind, and when you do not know something, say so and suggest the front desk. ") * 3
QUESTIONS = ["What time does the library open on Saturdays?", "Can I renew a book online?",
             "Do you have books about astronomy for children?", "How much is the late fee per day?",
             "Is there a quiet room for studying?", "Can I print documents here?",
             "Are there chess events this month?", "How many books can I borrow at once?"]
PARAGRAPHS = [
    "The history of the printing press is a story of many hands. Movable type appeared in East Asia "
    "centuries before Gutenberg, and the spread of paper, ink and presses changed how ideas travelled. ",
    "Harbour towns grew around their lighthouses. Keepers logged the weather, the ships and the tides, "
    "and their notebooks are now read by historians of climate and of trade along the coast. ",
    "A city's water supply is an old engineering problem: aqueducts, cisterns and pumps each moved the "
    "limit on how many people could live in one place, and each needed its own kind of maintenance. ",
    "Early railways ran on local time until timetables forced a common clock; the telegraph carried the "
    "signal, and within a generation whole countries set their watches by one observatory. ",
]


def document(doc_tokens: int, seed: str) -> str:
    """A unique document of about doc_tokens tokens (~38 per paragraph for this tokenizer)."""
    parts = [f"Document {seed}.\n"]
    for i in range(max(1, doc_tokens // 38)):
        parts.append(PARAGRAPHS[(i + int(seed[:8], 16)) % len(PARAGRAPHS)])
    return "".join(parts) + "\nSummarise the document above in two sentences."


async def one_request(client, messages: list[dict], stream: bool, max_tokens: int) -> dict:
    started = time.perf_counter()
    extra = {"ignore_eos": True}
    if not stream:
        reply = await client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                     max_tokens=max_tokens, extra_body=extra)
        ended = time.perf_counter()
        usage = reply.usage
        return {"start": started, "end": ended, "wait": ended - started, "ttft": None,
                "prompt": usage.prompt_tokens, "cached": usage.prompt_tokens_details.cached_tokens,
                "completion": usage.completion_tokens}
    first, usage = None, None
    response = await client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in response:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage
    ended = time.perf_counter()
    ttft = (first or ended) - started
    return {"start": started, "end": ended, "wait": ttft, "ttft": ttft, "prompt": usage.prompt_tokens,
            "cached": usage.prompt_tokens_details.cached_tokens, "completion": usage.completion_tokens}


async def client_loop(client, index: int, args, with_long: bool, deadline: float, out: list[dict]) -> None:
    k = 0
    while time.perf_counter() < deadline:
        long = with_long and (k + index) % args.long_every == 0
        if long:
            content, stream = document(args.doc_tokens, uuid.uuid4().hex), True
        else:
            content, stream = f"(visitor {index}, question {k}) {QUESTIONS[(index + k) % len(QUESTIONS)]}", k % 2 == 0
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
        result = await one_request(client, messages, stream, args.max_tokens)
        result.update(kind="long" if long else "short", streamed=stream)
        out.append(result)
        k += 1


async def run_load(base_url: str, args, with_long: bool) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256),
                                                              timeout=900))
    # warm-up, not measured: the shared system prompt goes into the cache
    await one_request(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."}],
                      True, 4)
    results: list[dict] = []
    started = time.perf_counter()
    deadline = started + args.duration
    await asyncio.gather(*(client_loop(client, i, args, with_long, deadline, results) for i in range(args.clients)))
    await client.close()
    async with httpx.AsyncClient(timeout=30) as http:
        health = (await http.get(base_url.removesuffix("/v1") + "/health")).json()["models"][NAME]
    summary = summarise(results, health, started, deadline)
    summary["requests"] = [{**r, "start": r["start"] - started, "end": r["end"] - started} for r in results]
    return summary


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarise(results: list[dict], health: dict, started: float, deadline: float) -> dict:
    short_ttft = [r["ttft"] for r in results if r["kind"] == "short" and r["streamed"]]
    long_ttft = [r["ttft"] for r in results if r["kind"] == "long"]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "short_ttft_p50": pct(short_ttft, 0.5), "short_ttft_p99": pct(short_ttft, 0.99),
        "short_plain_p99": pct([r["wait"] for r in results if r["kind"] == "short" and not r["streamed"]], 0.99),
        "long_ttft_p50": pct(long_ttft, 0.5), "long_ttft_max": max(long_ttft, default=float("nan")),
        "max_wait": max(r["wait"] for r in results),
        "window_tok_s": sum(r["completion"] for r in results if r["end"] <= deadline) / (deadline - started),
        "agg_tok_s": sum(r["completion"] for r in results) / wall,
        "prefill_tok_s": sum(r["prompt"] - r["cached"] for r in results) / wall,
        "cached_share": sum(r["cached"] for r in results) / sum(r["prompt"] for r in results),
        "short_requests": sum(r["kind"] == "short" for r in results),
        "long_requests": sum(r["kind"] == "long" for r in results),
        "wall_s": wall, "policy": health.get("scheduler_policy"), "preemptions": health.get("preemptions_total"),
    }


def table(base: dict, fcfs: dict, fair: dict) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [("short TTFT p50 (s, streamed)", "short_ttft_p50", "{:.2f}"),
            ("short TTFT p99 (s, streamed)", "short_ttft_p99", "{:.2f}"),
            ("short plain request p99 (s, whole request)", "short_plain_p99", "{:.2f}"),
            ("long TTFT p50 (s)", "long_ttft_p50", "{:.1f}"),
            ("long TTFT max (s)", "long_ttft_max", "{:.1f}"),
            ("longest wait, any request (s)", "max_wait", "{:.1f}"),
            ("aggregate tok/s within the window (completion)", "window_tok_s", "{:.1f}"),
            ("aggregate tok/s to the last request's end", "agg_tok_s", "{:.1f}"),
            ("time to the last request's end (s)", "wall_s", "{:.0f}"),
            ("prompt tokens computed / s", "prefill_tok_s", "{:.0f}"),
            ("cached-token share of prompt tokens", "cached_share", "{:.1%}"),
            ("requests short / long", None, None),
            ("preemptions", "preemptions", "{}")]
    lines = ["| measure | no long prompts (fair) | fcfs | fair | fair / fcfs | fair / no long |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{m['short_requests']} / {m['long_requests']}" for m in (base, fcfs, fair)]
            lines.append(f"| {label} | {' | '.join(cells)} | - | - |")
            continue
        cells = [fmt.format(m[key]) for m in (base, fcfs, fair)]
        numeric = isinstance(fair[key], float) and key not in ("cached_share",)
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio(fair[key], fcfs[key]) if numeric else '-'} | "
                     f"{ratio(fair[key], base[key]) if numeric and key.startswith('short') else '-'} |")
    return "\n".join(lines)


def targets(base: dict, fcfs: dict, fair: dict) -> str:
    p99_ratio = fair["short_ttft_p99"] / base["short_ttft_p99"]
    lines = ["| target | this run | met |", "| --- | --- | --- |",
             f"| short TTFT p99 with long prompts within 3x of without (fair) | {fair['short_ttft_p99']:.2f} s / "
             f"{base['short_ttft_p99']:.2f} s = {p99_ratio:.2f}x | {'yes' if p99_ratio <= 3 else 'no'} |",
             f"| no request waits more than 60 s (fair) | longest {fair['max_wait']:.1f} s | "
             f"{'yes' if fair['max_wait'] <= 60 else 'no'} |",
             f"| aggregate tok/s not lower than fcfs, within the window | {fair['window_tok_s']:.1f} vs "
             f"{fcfs['window_tok_s']:.1f} | {'yes' if fair['window_tok_s'] >= fcfs['window_tok_s'] else 'no'} |",
             f"| aggregate tok/s not lower than fcfs, to the last end | {fair['agg_tok_s']:.1f} vs "
             f"{fcfs['agg_tok_s']:.1f} | {'yes' if fair['agg_tok_s'] >= fcfs['agg_tok_s'] else 'no'} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120, help="seconds of issuing per server")
    parser.add_argument("--doc-tokens", type=int, default=1500, help="about this many tokens per long document")
    parser.add_argument("--long-every", type=int, default=8, help="one request in this many is long")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (ignore_eos)")
    parser.add_argument("--source", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    figures = {}
    for label, policy, with_long in (("base", "fair", False), ("fcfs", "fcfs", True), ("fair", "fair", True)):
        model = {"name": NAME, "source": args.source, "scheduler": {"policy": policy}}
        with radixgate_server(model) as url:
            figures[label] = asyncio.run(run_load(url, args, with_long))
        assert figures[label]["policy"] == policy, figures[label]
        print(f"{label}: {json.dumps({k: v for k, v in figures[label].items() if k != 'requests'})}", flush=True)
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {args.clients} clients x {args.duration:.0f} s, "
          f"1 in {args.long_every} a ~{args.doc_tokens}-token document, {args.max_tokens} new tokens per request\n")
    print(table(figures["base"], figures["fcfs"], figures["fair"]))
    print()
    print(targets(figures["base"], figures["fcfs"], figures["fair"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=1))


if __name__ == "__main__":
    main()
