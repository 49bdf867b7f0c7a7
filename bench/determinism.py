"""Same request, same answer: correctness checks of batch invariance, then decode tok/s at batch 16.

    python bench/determinism.py                  # CUDA: random Llama-3-8B bf16, deterministic off vs on
    python bench/determinism.py --device cpu     # the embedded SmolLM2 at the default dtype (int4)

Runs a TorchRunner directly (no scheduler) and drives sequences the way the engine does. For each
mode it checks that a reference stream (prompt, then --steps tokens, greedy and seeded temperature
1 with draws from sampling_params.draw_uniform) gets the same tokens
  * batched with 31 other streams (their prefills in the same forward, then decoding together),
  * with its prompt prefilled in chunks of 1..61 tokens, and its KV pages bit for bit the same,
  * after a cached prefix (whole pages of the reference's prompt reused, only the tail recomputed),
  * preempted and resumed (prompt + the first half of its output recomputed as one prefill),
  * eagerly instead of through the decode graphs (CUDA),
then times greedy decode at batch 16 (CUDA events on the GPU) and prints one table. On CUDA,
deterministic off is expected to fail some checks (cuBLAS and the split-K decode follow the batch);
on CPU the default path is batch-invariant (docs/cpu.md), so only one mode runs.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.sampling_params import SamplingParams, draw_uniform  # noqa: E402
from backends.source import resolve_source  # noqa: E402

GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=1.0, seed=1234)
_epochs = itertools.count(1)


@dataclass
class Stream:
    """One sequence as the engine drives it: tokens so far, pages, slot, draws from (seed, index)."""

    prompt: list[int]
    params: SamplingParams
    table: list[int]
    slot: int
    written: int = 0                           # positions whose KV is in the pages
    generated: list[int] = field(default_factory=list)
    draw_offset: int = 0                       # index of generated[0] among the request's draws
    epoch: int = field(default_factory=lambda: next(_epochs))

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    def spec(self) -> SampleSpec:
        index = self.draw_offset + len(self.generated)
        uniform = 0.0 if self.params.greedy else draw_uniform(self.params.seed, index)
        return SampleSpec(self.params, uniform)


class Pages:
    """Page ids handed out in order (a bench allocator: nothing is freed)."""

    def __init__(self, page_size: int, total: int):
        self.page_size, self.total, self.next = page_size, total, 0

    def take(self, tokens: int) -> list[int]:
        count = -(-tokens // self.page_size)
        assert self.next + count <= self.total, "the bench ran out of KV pages: raise --pages"
        self.next += count
        return list(range(self.next - count, self.next))


def prefill(runner: TorchRunner, streams: list[Stream], chunk: int | None = None) -> None:
    """Every stream's unwritten prompt tokens, up to `chunk` per stream per forward, all in one batch;
    the last chunk of a prompt draws its first token."""
    while any(s.written < len(s.prompt) for s in streams):
        chunks, sampling = [], []
        for s in streams:
            todo = len(s.prompt) - s.written
            if todo <= 0:
                continue
            n = todo if chunk is None else min(chunk, todo)
            last = s.written + n == len(s.prompt)
            chunks.append(SequenceChunk(s.prompt[s.written:s.written + n], s.written, s.table, s.slot, s.epoch,
                                        s.spec() if last else None))
            if last:
                sampling.append(s)
            s.written += n
        result = runner.forward(ForwardBatch(chunks))
        for s, token in zip(sampling, result.tokens, strict=True):
            s.generated.append(token.token_id)


def decode(runner: TorchRunner, streams: list[Stream], steps: int) -> None:
    for _ in range(steps):
        chunks = [SequenceChunk([s.tokens[-1]], len(s.tokens) - 1, s.table, s.slot, s.epoch, s.spec())
                  for s in streams]
        result = runner.forward(ForwardBatch(chunks))
        for s, token in zip(streams, result.tokens, strict=True):
            s.written += 1
            s.generated.append(token.token_id)


def kv_of(runner: TorchRunner, stream: Stream, positions: int) -> list[torch.Tensor]:
    """K and V of the stream's first `positions` tokens, every layer, as stored."""
    cache, ps = runner.cache, runner.page_size
    pages = stream.table[:-(-positions // ps)]
    out = []
    for layer in range(len(cache.k)):
        for store in (cache.k[layer], cache.v[layer]):
            out.append(store[pages].flatten(0, 1)[:positions].clone())
    return out


def run_checks(runner: TorchRunner, args, rng: np.random.Generator) -> dict[str, bool]:
    """Each check: the reference stream's tokens (and KV where said) equal under one change."""
    vocab, ps = runner.config.vocab_size, runner.page_size
    pages = Pages(ps, runner.num_pages)
    capacity = args.prompt + 40 + args.steps + ps       # the longest stream: a batch mate's prompt

    def stream(prompt: list[int], params: SamplingParams, slot: int) -> Stream:
        return Stream(list(prompt), params, pages.take(capacity), slot)

    def ids(n: int) -> list[int]:
        return rng.integers(3, vocab, n).tolist()

    prompt = ids(args.prompt)
    results = {}
    for params, label in ((GREEDY, "greedy"), (SEEDED, "seeded T=1")):
        ref = stream(prompt, params, 0)
        prefill(runner, [ref])
        decode(runner, [ref], args.steps)
        ref_kv = kv_of(runner, ref, len(prompt))

        others = [stream(ids(int(rng.integers(8, args.prompt + 40))), params if i % 2 else GREEDY, i + 1)
                  for i in range(args.streams - 1)]
        batched = stream(prompt, params, 0)
        prefill(runner, [*others, batched])
        decode(runner, [*others, batched], args.steps)
        results[f"{label}: alone == batched with {args.streams - 1} others"] = batched.generated == ref.generated

        chunked = stream(prompt, params, 1)
        for size in itertools.cycle((1, 7, 61, 16, 3)):
            if chunked.written >= len(prompt):
                break
            prefill_step(runner, chunked, size)
        decode(runner, [chunked], args.steps)
        same_kv = all(torch.equal(a, b) for a, b in zip(ref_kv, kv_of(runner, chunked, len(prompt)), strict=True))
        results[f"{label}: whole == chunked prefill (tokens)"] = chunked.generated == ref.generated
        results[f"{label}: whole == chunked prefill (KV bits)"] = same_kv

        cached = stream(prompt, params, 2)
        shared = (len(prompt) - 1) // ps          # whole pages of the prompt, as the radix cache matches
        cached.table[:shared] = ref.table[:shared]
        cached.written = shared * ps
        prefill(runner, [cached])
        decode(runner, [cached], args.steps)
        results[f"{label}: cold == cached prefix"] = cached.generated == ref.generated

        half = args.steps // 2
        resumed = stream(prompt + ref.generated[:half], params, 3)
        resumed.draw_offset = half
        prefill(runner, [resumed])
        decode(runner, [resumed], args.steps - half)
        results[f"{label}: uninterrupted == preempted and resumed"] = resumed.generated == ref.generated[half:]

        if runner.graphs is not None:
            graphs, runner.graphs = runner.graphs, None
            eager = stream(prompt, params, 4)
            prefill(runner, [eager])
            decode(runner, [eager], args.steps)
            runner.graphs = graphs
            results[f"{label}: graphs == eager"] = eager.generated == ref.generated
    return results


def prefill_step(runner: TorchRunner, s: Stream, size: int) -> None:
    """One chunk of up to `size` of the stream's unwritten prompt."""
    n = min(size, len(s.prompt) - s.written)
    last = s.written + n == len(s.prompt)
    result = runner.forward(ForwardBatch([SequenceChunk(s.prompt[s.written:s.written + n], s.written, s.table,
                                                        s.slot, s.epoch, s.spec() if last else None)]))
    s.written += n
    if last:
        s.generated.append(result.tokens[0].token_id)


def decode_speed(runner: TorchRunner, args, rng: np.random.Generator) -> float:
    """Greedy decode tok/s of --batch streams of --context prompt tokens (after warm-up)."""
    pages = Pages(runner.page_size, runner.num_pages)
    vocab = runner.config.vocab_size
    streams = [Stream(rng.integers(3, vocab, args.context).tolist(), GREEDY,
                      pages.take(args.context + args.timed_steps + 16), i) for i in range(args.batch)]
    prefill(runner, streams)
    decode(runner, streams, 4)                    # warm-up: compiles, graph replays
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode(runner, streams, args.timed_steps)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        decode(runner, streams, args.timed_steps)
        seconds = time.perf_counter() - started
    return args.batch * args.timed_steps / seconds


def make_runner(args, deterministic: bool) -> TorchRunner:
    if args.device == "cpu":
        source = resolve_source(args.model)
        kind, path = source.kind, source.path
    else:
        kind, path = "random", args.model
    return TorchRunner(RunnerSettings(kind, path, args.model, dtype=args.dtype, device=args.device,
                                      num_pages=args.pages, max_sequences=max(args.streams, args.batch) + 8,
                                      context_length=args.context_length, deterministic=deterministic,
                                      threads=args.threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None,
                        help="cuda: a random architecture (llama-3-8b); cpu: a source (the packaged SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", default=None, help="deterministic off,on (cuda default) or on (cpu default)")
    parser.add_argument("--streams", type=int, default=32, help="the reference stream and its batch mates")
    parser.add_argument("--prompt", type=int, default=200, help="reference prompt tokens")
    parser.add_argument("--steps", type=int, default=24, help="tokens generated per check")
    parser.add_argument("--batch", type=int, default=16, help="decode batch that is timed")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens of the timed streams")
    parser.add_argument("--timed-steps", type=int, default=64)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.model = args.model or ("llama-3-8b" if cuda else "packaged:smollm2-135m-instruct")
    modes = [m == "on" for m in (args.modes or ("off,on" if cuda else "on")).split(",")]
    print(f"# bench/determinism.py  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  "
          f"cmd: python {' '.join(sys.argv)}", flush=True)
    rows = []
    for deterministic in modes:
        began = time.perf_counter()
        runner = make_runner(args, deterministic)
        label = f"deterministic {'on' if deterministic else 'off'}"
        print(f"## {label}: {runner.info.device}, dtype {runner.info.dtype}, "
              f"graphs {'on' if runner.graphs else 'off'}, loaded in {time.perf_counter() - began:.0f} s", flush=True)
        checks = run_checks(runner, args, np.random.default_rng(0))
        for name, ok in checks.items():
            print(f"   {'ok  ' if ok else 'DIFF'} {name}", flush=True)
        speed = decode_speed(runner, args, np.random.default_rng(1))
        rows.append((label, sum(checks.values()), len(checks), speed))
        print(f"   decode batch {args.batch}: {speed:.1f} tok/s  ({time.perf_counter() - began:.0f} s)", flush=True)
        del runner
        if cuda:
            torch.cuda.empty_cache()
    base = rows[0][3]
    print()
    print(f"| mode | checks identical | decode tok/s, batch {args.batch}, {args.context}-token prompts | vs first |")
    print("|---|---|---|---|")
    for label, passed, total, speed in rows:
        print(f"| {label} | {passed}/{total} | {speed:.1f} | {speed / base:.2f} |")


if __name__ == "__main__":
    main()
