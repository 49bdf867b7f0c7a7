"""Routing across workers on loopback, side by side in one run: two radixgate workers (the embedded
model) behind a radixgate gateway whose pools differ only in policy: cache_aware, round_robin and
random (LiteLLM's default simple-shuffle); and LiteLLM's proxy itself over the same workers where it
imports (--litellm-proxy-path, bench/litellm_proxy_side.py).

Workload: C conversations x R rounds. Each conversation opens with its own long document (~1.1k
tokens), then asks short follow-ups with short answers, so a round's TTFT is mostly the prefill of
what the worker has not cached. Each conversation runs as its own task: it starts at a random
offset and thinks a random time between rounds (one seeded schedule, the same for every policy), so
arrivals interleave differently from round to round as real clients' do. The workers' caches are
cleared before each policy.

Each worker's KV pool (--num-pages, default 660 pages of 16 tokens) is the smallest at which
cache-aware routing loses no hit (bench/routing_model.py: its share at the workload's ceiling in
every one of 200 arrival samples): 8 conversations of at most 87 pages at their last round are 696
pages, but a conversation that has finished may be evicted at no cost. That is a fleet sized for the
best routing: one worker's cache cannot hold the whole working set (16 conversations), which is
why there is a fleet, and round-robin, which puts every conversation on both workers, needs twice
the memory to hit as often. The model's table shows how the comparison moves with the pool (about
1.8x at 800 pages, where round-robin is left more room, 2.4x at 620) and with the sample of arrivals
at each size.
One schedule is one sample of arrivals, and round-robin's share moves with it by several points
(how often a conversation's next turn lands where an earlier one is still cached): --seeds runs
several whole workloads in one run and reports each and their pooled figures. The gateway hop is
measured in its own phase, workers idle: sequential 1-token streamed requests on kept-alive
connections, alternating straight to a worker and through the gateway.

    python bench/routing.py --conversations 16 --rounds 5 --seeds 0,1,2,3
    python bench/routing.py --hop-only --hop-samples 300
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from bench import litellm_proxy_side as proxy_side  # noqa: E402
from bench.serve_process import ROOT, free_port, server_process  # noqa: E402

MODEL = "smollm2-135m-instruct"
POLICIES = ("cache_aware", "round_robin", "random")
LABELS = {"cache_aware": "cache_aware", "round_robin": "round_robin", "random": "random (shuffle)",
          "litellm_proxy": "LiteLLM proxy"}


WORDS = {
    "adj": "amber quiet narrow heavy brittle distant humid silver rusty woven hollow early steep pale".split(),
    "noun": "valve ledger lantern anchor mural kiln barrel compass harness spindle crate beacon".split(),
    "verb": "repaired moved counted inspected painted weighed sealed replaced cleaned measured".split(),
    "place": ["north dock", "east gate", "mill yard", "old bridge", "granary", "chapel", "ferry ramp", "quarry"],
}
SUBJECTS = ["harbour", "observatory", "orchard", "foundry", "library", "vineyard", "railway depot", "lighthouse",
            "apiary", "tannery", "glassworks", "weather station", "canal lock", "bakery", "sawmill", "salt works"]


def document(index: int, sentences: int, rng: random.Random) -> str:
    """A conversation's own log (~28 tokens a sentence), distinct from its first token on."""
    subject = f"{SUBJECTS[index % len(SUBJECTS)]} {index // len(SUBJECTS) + 1}"
    lines = [f"Log of the {subject}."]
    for k in range(sentences):
        pick = {key: rng.choice(words) for key, words in WORDS.items()}
        lines.append(f"Entry {k + 1}: the {pick['adj']} {pick['noun']} was {pick['verb']} near the {pick['place']} "
                     f"at {rng.randrange(24):02d}:{rng.randrange(60):02d}, reading {rng.randrange(1000)}.")
    return "\n".join(lines)


@dataclass
class Conversation:
    opening: str                   # the document and the first question
    questions: list[str]           # the short follow-ups
    start_s: float                 # offset of its first request
    think_s: list[float]           # pause after each answer


@dataclass
class Schedule:
    """Every conversation's text and timing, from one seed: each policy sees the same arrivals."""

    conversations: list[Conversation]
    think_mean_s: float
    start_window_s: float
    seed: int

    @classmethod
    def make(cls, count: int, rounds: int, sentences: int, think_mean_s: float, start_window_s: float,
             seed: int) -> Schedule:
        rng = random.Random(seed)
        conversations = []
        for i in range(count):
            doc = document(i, sentences, rng)
            questions = [f"What does entry {rng.randrange(1, sentences + 1)} say was {rng.choice(WORDS['verb'])}? "
                         "Answer in one short sentence." for _ in range(rounds)]
            conversations.append(Conversation(f"{doc}\n\n{questions[0]}", questions[1:],
                                              rng.uniform(0, start_window_s),
                                              [rng.uniform(0.5, 1.5) * think_mean_s for _ in range(rounds - 1)]))
        return cls(conversations, think_mean_s, start_window_s, seed)

    def describe(self) -> str:
        return (f"each conversation its own task, first request at a uniform offset in [0, {self.start_window_s:g}) s, "
                f"then a think time uniform in [{0.5 * self.think_mean_s:g}, {1.5 * self.think_mean_s:g}) s after "
                f"each answer (seed {self.seed}, the same schedule for every policy)")


@dataclass
class Turn:
    round_index: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    in_flight_at_start: int        # this benchmark's requests already open when it was sent


async def _converse(client: openai.AsyncOpenAI, model: str, conv: Conversation, max_tokens: int,
                    open_requests: list[int], out: list[Turn]) -> None:
    await asyncio.sleep(conv.start_s)
    messages = [{"role": "system", "content": "You answer questions about the log you are given."},
                {"role": "user", "content": conv.opening}]
    for round_index in range(len(conv.questions) + 1):
        if round_index:
            await asyncio.sleep(conv.think_s[round_index - 1])
            messages.append({"role": "user", "content": conv.questions[round_index - 1]})
        in_flight = open_requests[0]
        open_requests[0] += 1
        started, ttft, text, usage = time.perf_counter(), None, "", None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft or time.perf_counter() - started
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    usage = chunk.usage
        finally:
            open_requests[0] -= 1
        messages.append({"role": "assistant", "content": text})
        cached = (usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0) or 0
        out.append(Turn(round_index, usage.prompt_tokens, cached, usage.completion_tokens,
                        ttft or time.perf_counter() - started, in_flight))


async def run_conversations(base_url: str, model: str, schedule: Schedule, max_tokens: int,
                            api_key: str = "unused") -> list[Turn]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    out: list[Turn] = []
    open_requests = [0]
    await asyncio.gather(*(_converse(client, model, conv, max_tokens, open_requests, out)
                           for conv in schedule.conversations))
    await client.close()
    return out


def _serve(stack: ExitStack, folder: Path, name: str, config: dict) -> tuple[str, int]:
    """(base URL, pid) of a `radixgate serve` process of `config`, stopped with the stack."""
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port}, **config}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = stack.enter_context(server_process(argv, f"http://127.0.0.1:{port}/health", folder / f"{name}.log",
                                                 300, env))
    return f"http://127.0.0.1:{port}", process.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_stats(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()["models"][MODEL]


def clear_caches(workers: list[str]) -> None:
    for url in workers:
        httpx.post(f"{url}/clear_radix_cache", timeout=30).raise_for_status()


def _p(values: list[float], q: float) -> float:
    """The median for q = 0.5, else the nearest-rank value below q."""
    ordered = sorted(values)
    return statistics.median(ordered) if q == 0.5 else ordered[int(q * (len(ordered) - 1))]


def _timed_stream(client: httpx.Client, url: str, body: dict, headers: dict) -> tuple[float, float]:
    """(seconds to the first chunk carrying a token, seconds to the end) of one streamed chat request."""
    started, first = time.perf_counter(), None
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                choices = json.loads(line[5:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content") or choices[0].get("finish_reason"):
                    first = time.perf_counter() - started
    return first if first is not None else float("nan"), time.perf_counter() - started


def hop_cost(worker: str, gateway: str, gateway_pid: int, samples: int, seed: int, proxy: str | None) -> dict:
    """p50 ms of a 1-token streamed chat request, straight to a worker and through the gateway (a pool
    of that one worker), and through LiteLLM's proxy (a deployment of that worker) when it runs.
    Each sample sends one request by every route in a seeded random order; the first 10 warm
    connections and cache. Also the gateway process's CPU time per relayed request over the measured
    samples (the other routes do not touch it; its health probes of the workers are counted in)."""
    body = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, "temperature": 0,
            "stream": True}
    routes = {"direct": (f"{worker}/v1/chat/completions", MODEL, {}),
              "gateway": (f"{gateway}/v1/chat/completions", "direct-0", {})}
    if proxy:
        routes["proxy"] = (f"{proxy}/v1/chat/completions", proxy_side.ONE_WORKER,
                           {"Authorization": f"Bearer {proxy_side.MASTER_KEY}"})
    times: dict[str, list[tuple[float, float]]] = {which: [] for which in routes}
    order = random.Random(seed)
    with httpx.Client(timeout=60) as client:
        for i in range(samples + 10):
            if i == 10:
                cpu_before = cpu_seconds(gateway_pid)
            sample = list(routes)
            order.shuffle(sample)
            for which in sample:
                url, model, headers = routes[which]
                ttft, total = _timed_stream(client, url, {**body, "model": model}, headers)
                if i >= 10:
                    times[which].append((ttft * 1000, total * 1000))
    out = {"gateway_cpu_ms": (cpu_seconds(gateway_pid) - cpu_before) / samples * 1000}
    for which, rows in times.items():
        out[which] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
    return out


def evictions_between(workers_before: list[dict], workers_after: list[dict]) -> int:
    return sum(a["radix_cache_stats"].get("evictions", 0) - b["radix_cache_stats"].get("evictions", 0)
               for a, b in zip(workers_after, workers_before, strict=True))


@dataclass
class PolicyRun:
    rows: list[Turn]
    evictions: int
    wall_s: float


def summarise(runs: list[PolicyRun]) -> dict:
    """One policy's figures over one or more whole workloads (their turns pooled)."""
    rows = [row for run in runs for row in run.rows]
    prompt, cached = sum(r.prompt_tokens for r in rows), sum(r.cached_tokens for r in rows)
    later = [r.ttft_s for r in rows if r.round_index > 0]             # rounds that can hit a cache
    every = [r.ttft_s for r in rows]
    # sent while none of this benchmark's requests was open: no queue, the prefill of what is not cached
    alone = [r.ttft_s for r in rows if r.round_index > 0 and r.in_flight_at_start == 0]
    return {"requests": len(rows), "prompt": prompt, "cached": cached, "share": cached / max(prompt, 1),
            "ttft_p50": _p(every, 0.5), "ttft_p95": _p(every, 0.95), "later_p50": _p(later, 0.5),
            "later_p95": _p(later, 0.95), "alone_p50": _p(alone, 0.5) if alone else float("nan"),
            "alone": len(alone),
            "in_flight": statistics.mean(r.in_flight_at_start for r in rows),
            "evictions": sum(run.evictions for run in runs), "wall": sum(run.wall_s for run in runs),
            "footprint": max(r.prompt_tokens + r.completion_tokens for r in rows)}


def print_report(args, results: dict, kv_pages: int, schedule: Schedule | None, title: str) -> None:
    rr = results["round_robin"]
    footprint = max(r["footprint"] for r in results.values())
    capacity, half = kv_pages * 16, args.conversations // 2

    def fits(tokens: int) -> str:
        return f"{tokens} tokens: {'fits' if tokens <= capacity else 'does not fit'}"

    print(f"\n{title}: {args.conversations} conversations x {args.rounds} rounds, 2 workers (1 CPU thread each), "
          f"max_tokens {args.max_tokens}, greedy, streamed")
    if schedule is not None:
        print(f"arrivals: {schedule.describe()}")
    print(f"KV pool per worker: {kv_pages} pages of 16 = {capacity} tokens (host tier off); a conversation holds "
          f"<= {footprint} tokens at its last round; {half} conversations (one worker's share when each stays "
          f"on one) {fits(footprint * half)}; all {args.conversations} {fits(footprint * args.conversations)}")
    print(f"{'policy':<17} {'prompt':>7} {'cached':>7} {'share':>6} {'x rr':>5} {'TTFT p50':>9} {'p95':>7} "
          f"{'rr/this':>7} {'rounds 2+ p50':>13} {'p95':>7} {'alone p50 (n)':>14} {'in flight':>9} {'evicted':>8} "
          f"{'wall s':>6}")
    for policy, r in results.items():
        print(f"{LABELS[policy]:<17} {r['prompt']:>7} {r['cached']:>7} {r['share']:>6.1%} "
              f"{r['share'] / max(rr['share'], 1e-9):>5.2f} {r['ttft_p50'] * 1000:>7.0f}ms "
              f"{r['ttft_p95'] * 1000:>5.0f}ms {rr['ttft_p50'] / r['ttft_p50']:>7.2f} "
              f"{r['later_p50'] * 1000:>11.0f}ms {r['later_p95'] * 1000:>5.0f}ms "
              f"{r['alone_p50'] * 1000:>7.0f}ms ({r['alone']:>2}) {r['in_flight']:>9.1f} "
              f"{r['evictions']:>8} {r['wall']:>6.1f}")


def print_hop(args, hop: dict) -> float:
    """Print the hop phase's line; return the TTFT difference in ms."""
    (d_ttft, d_total), (g_ttft, g_total) = hop["direct"], hop["gateway"]
    print(f"gateway hop ({args.hop_samples} pairs, workers idle, 1-token streamed chat): p50 TTFT direct "
          f"{d_ttft:.2f} ms, through the gateway {g_ttft:.2f} ms ({g_ttft - d_ttft:+.2f} ms); p50 whole request "
          f"{d_total:.2f} vs {g_total:.2f} ms ({g_total - d_total:+.2f} ms); the gateway's CPU per relayed "
          f"request {hop['gateway_cpu_ms']:.2f} ms")
    if "proxy" in hop:
        p_ttft, p_total = hop["proxy"]
        print(f"LiteLLM proxy hop (the same samples): p50 TTFT {p_ttft:.2f} ms ({p_ttft - d_ttft:+.2f} ms), "
              f"whole request {p_total:.2f} ms ({p_total - d_total:+.2f} ms)")
    return g_ttft - d_ttft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--doc-sentences", type=int, default=40,
                        help="sentences of each conversation's document (~28 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--think-s", type=float, default=20.0,
                        help="mean pause between a conversation's answer and its next question")
    parser.add_argument("--start-window-s", type=float, default=64.0, help="conversations start uniformly within it")
    parser.add_argument("--num-pages", type=int, default=660, help="each worker's KV pages of 16 tokens")
    parser.add_argument("--hop-samples", type=int, default=150)
    parser.add_argument("--seeds", default="0", help="comma-separated schedule seeds; each is a whole workload "
                        "run under every policy, and the report adds their sums (one run, more traffic)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--hop-only", action="store_true", help="measure the gateway hop and stop")
    parser.add_argument("--litellm-proxy-path", default="",
                        help="a folder of the packages LiteLLM's proxy lacks here, put on its PYTHONPATH "
                             "(bench/litellm_proxy_side.py); the proxy runs as one more side if it imports")
    args = parser.parse_args()
    policies = args.policies.split(",")
    assert "round_robin" in policies, "ratios are against round_robin"
    assert args.hop_samples >= 1, "the hop phase needs at least one pair"
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        worker_model = {"name": MODEL, "backend": "cpu", "threads": 1,
                        "kv_cache": {"page_size": 16, "num_pages": args.num_pages, "host_cache_gb": 0}}
        workers = [_serve(stack, folder, f"worker{i}", {"models": [worker_model]})[0] for i in range(2)]
        pools = [{"name": f"fleet-{p}", "workers": [f"{w}/v1" for w in workers], "upstream_model": MODEL,
                  "routing": {"policy": p}} for p in policies]
        direct = {"name": "direct-0", "workers": [f"{workers[0]}/v1"], "upstream_model": MODEL}
        gateway, gateway_pid = _serve(stack, folder, "gateway", {"models": [*pools, direct]})
        sides = {p: (f"{gateway}/v1", f"fleet-{p}", "unused") for p in policies}
        proxy_missing = proxy_side.import_error(args.litellm_proxy_path)
        proxy = None
        if proxy_missing is None:
            proxy = proxy_side.serve(stack, folder, workers, MODEL, args.litellm_proxy_path)
            sides["litellm_proxy"] = (f"{proxy}/v1", proxy_side.FLEET, proxy_side.MASTER_KEY)
        kv_pages = worker_stats(workers[0])["kv_pages_total"]
        hop = hop_cost(workers[0], gateway, gateway_pid, args.hop_samples, seeds[0], proxy)
        print("hop phase: done", flush=True)
        if args.hop_only:
            print_hop(args, hop)
            return
        runs = []                  # (seed, schedule, {policy: (rows, evictions, wall)})
        for seed in seeds:
            schedule = Schedule.make(args.conversations, args.rounds, args.doc_sentences, args.think_s,
                                     args.start_window_s, seed)
            by_policy = {}
            for policy, (base_url, model, key) in sides.items():
                clear_caches(workers)
                before = [worker_stats(w) for w in workers]
                started = time.perf_counter()
                rows = asyncio.run(run_conversations(base_url, model, schedule, args.max_tokens, key))
                wall = time.perf_counter() - started
                by_policy[policy] = PolicyRun(rows, evictions_between(before, [worker_stats(w) for w in workers]),
                                              wall)
                print(f"seed {seed} {policy}: done in {wall:.1f} s, cached share "
                      f"{summarise([by_policy[policy]])['share']:.1%}", flush=True)
            runs.append((seed, schedule, by_policy))
    per_seed = [{p: summarise([run]) for p, run in by_policy.items()} for _, _, by_policy in runs]
    for (seed, schedule, _), results in zip(runs, per_seed, strict=True):
        print_report(args, results, kv_pages, schedule, f"seed {seed}")
    final = per_seed[0]
    if len(runs) > 1:
        final = {p: summarise([by_policy[p] for _, _, by_policy in runs]) for p in sides}
        print_report(args, final, kv_pages, None, f"seeds {args.seeds}, every turn pooled")
    if proxy is None:
        print(f"LiteLLM proxy: not run: it does not import here ({proxy_missing}); see bench/litellm_proxy_side.py")
    hop_ms = print_hop(args, hop)
    if "cache_aware" in policies:
        ca, rr = final["cache_aware"], final["round_robin"]
        ratios = ", ".join(f"{r['cache_aware']['share'] / max(r['round_robin']['share'], 1e-9):.2f}x" for r in per_seed)
        print(f"targets ({'summed over seeds ' + args.seeds if len(runs) > 1 else 'seed ' + args.seeds}): "
              f"cached share >= 2x round-robin: {ca['share'] / max(rr['share'], 1e-9):.2f}x (per seed: {ratios}); "
              f"TTFT p50 >= 1.5x better: {rr['ttft_p50'] / ca['ttft_p50']:.2f}x; hop <= 2 ms p50: {hop_ms:+.2f} ms")


if __name__ == "__main__":
    main()
