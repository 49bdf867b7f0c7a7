"""How much the cached share of bench/routing.py's workload varies with its arrival sample: a
model of the two workers' caches, no servers, many seeds in seconds.

bench/routing.py measures one sample of arrivals per seed, minutes each. Round-robin's share in it
moves by several points from seed to seed: whether a conversation's next turn lands on a worker
that still holds an earlier turn depends on the global order of everyone's turns. This model
replays the same schedules (bench.routing.Schedule) with each worker's cache as an LRU of
conversation prefixes in 16-token pages (the radix cache evicts the least recently used leaf
pages: a conversation's tail first), and prints the distribution of cache-aware's share over
round-robin's across seeds. Service times are rough (prefill of what is not cached at a fixed
rate), so the order of near-simultaneous turns differs from a real run's; the spread is the point.

    python bench/routing_model.py --seeds 200 --num-pages 620,640,660,680,700,720,800
"""
from __future__ import annotations

import argparse
import heapq
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.routing import Schedule  # noqa: E402

PAGE = 16


def pages(tokens: int) -> int:
    return -(-tokens // PAGE)


class WorkerCache:
    """Cached prefix length per conversation, LRU-bounded in pages."""

    def __init__(self, capacity_pages: int):
        self.capacity = capacity_pages
        self.held: dict[int, tuple[int, float]] = {}       # conversation -> (tokens, last used)
        self.used = 0

    def serve(self, conversation: int, prompt: int, after: int, now: float) -> int:
        """Cached tokens of a prompt of `prompt` tokens; afterwards `after` tokens are held."""
        have = self.held.get(conversation, (0, 0.0))[0]
        hit = min(have, prompt // PAGE * PAGE)             # whole pages, as the radix cache reuses them
        self.used += pages(after) - pages(have)
        self.held[conversation] = (after, now)
        while self.used > self.capacity:                   # the least recently used tails go first
            victim = min((c for c in self.held if c != conversation), key=lambda c: self.held[c][1])
            tokens, last = self.held[victim]
            drop = min(pages(tokens), self.used - self.capacity)
            self.used -= drop
            left = pages(tokens) - drop
            self.held[victim] = (left * PAGE, last)
            if not left:
                del self.held[victim]
        assert 0 <= self.used <= self.capacity, self.used
        return hit


def share(schedule: Schedule, policy: str, capacity_pages: int, doc_tokens: int, turn_tokens: int,
          answer_tokens: int, prefill_tok_s: float) -> float:
    workers = [WorkerCache(capacity_pages), WorkerCache(capacity_pages)]
    events = [(conv.start_s, c, 0) for c, conv in enumerate(schedule.conversations)]
    heapq.heapify(events)
    sent, home, prompt_total, cached_total = 0, {}, 0, 0
    while events:
        now, c, rnd = heapq.heappop(events)
        if policy == "round_robin":
            w = sent % 2
        else:                                              # cache_aware: a conversation stays where it began
            w = home.setdefault(c, len(home) % 2)
        sent += 1
        prompt = doc_tokens + rnd * turn_tokens
        hit = workers[w].serve(c, prompt, prompt + answer_tokens, now)
        prompt_total, cached_total = prompt_total + prompt, cached_total + hit
        conv = schedule.conversations[c]
        if rnd < len(conv.think_s):
            heapq.heappush(events, (now + (prompt - hit) / prefill_tok_s + 0.2 + conv.think_s[rnd], c, rnd + 1))
    return cached_total / prompt_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--num-pages", default="660", help="each worker's pages; a comma list sweeps")
    parser.add_argument("--think-s", type=float, default=20.0)
    parser.add_argument("--start-window-s", type=float, default=64.0)
    parser.add_argument("--doc-tokens", type=int, default=1150, help="the opening turn (document + question)")
    parser.add_argument("--turn-tokens", type=int, default=42, help="each later turn's question and last answer")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--prefill-tok-s", type=float, default=450.0)
    parser.add_argument("--pool", type=int, default=4, help="workloads pooled per run, as bench/routing.py --seeds")
    args = parser.parse_args()
    print(f"{args.seeds} seeds, start window {args.start_window_s:g} s, think {args.think_s:g} s; "
          f"ratio = cache-aware share / round-robin share, per workload and pooled over {args.pool} workloads")
    print("| pages | cache-aware mean (min) | round-robin mean | ratio median | p10 | p90 | below 2x "
          "| pooled median | pooled min | pooled below 2x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for num_pages in (int(p) for p in args.num_pages.split(",")):
        shares: dict[str, list[float]] = {"cache_aware": [], "round_robin": []}
        for seed in range(args.seeds):
            schedule = Schedule.make(16, 5, 40, args.think_s, args.start_window_s, seed)
            for policy, got in shares.items():
                got.append(share(schedule, policy, num_pages, args.doc_tokens, args.turn_tokens,
                                 args.answer_tokens, args.prefill_tok_s))
        ca, rr = shares["cache_aware"], shares["round_robin"]
        ratios = sorted(a / r for a, r in zip(ca, rr, strict=True))
        pooled = sorted(sum(ca[i:i + args.pool]) / sum(rr[i:i + args.pool])
                        for i in range(0, args.seeds - args.pool + 1, args.pool))
        q = statistics.quantiles(ratios, n=10)
        print(f"| {num_pages} | {statistics.mean(ca):.1%} ({min(ca):.1%}) | {statistics.mean(rr):.1%} "
              f"| {statistics.median(ratios):.2f} | {q[0]:.2f} | {q[-1]:.2f} "
              f"| {sum(r < 2 for r in ratios)}/{len(ratios)} "
              f"| {statistics.median(pooled):.2f} | {pooled[0]:.2f} | {sum(p < 2 for p in pooled)}/{len(pooled)} |")


if __name__ == "__main__":
    main()
