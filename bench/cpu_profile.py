"""Where one CPU decode step's time goes: per-step latency of the runner alone, then a torch.profiler
table of the ops of a few steps.

    python bench/cpu_profile.py                   # int4 (auto), one stream, 128 tokens, 5 runs
    python bench/cpu_profile.py --dtype float32 --streams 8 --profile-steps 0

The step latency is the runner's forward (metadata, model, logits to NumPy) with no scheduler or
HTTP around it: what the engine process can reach at best. Medians and minima over all steps of
all runs are printed, since a 2-core shared machine swings by tens of percent from run to run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk
from backends.cuda.runner import TorchRunner
from backends.source import resolve_source
from bench.cpu import CHAT, MODEL, SOURCE
from gateway.templating import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-steps", type=int, default=20, help="steps under torch.profiler (0: none)")
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    args = parser.parse_args()

    src = resolve_source(SOURCE)
    runner = TorchRunner(RunnerSettings(src.kind, src.path, MODEL, dtype=args.dtype, page_size=16,
                                        num_pages=2048, threads=args.threads))
    tokenizer = load_tokenizer(src)
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": CHAT}]))
    pages_needed = -(-(len(prompt) + args.tokens) // 16)

    def tables() -> list[list[int]]:     # contiguous runs, as a fresh pool hands them out
        return [list(range(i * pages_needed, (i + 1) * pages_needed)) for i in range(args.streams)]

    def run(steps: int, on_step=None) -> list[float]:
        ts = tables()
        toks = [int(runner.forward(ForwardBatch([SequenceChunk(prompt, 0, t)])).logits[0].argmax()) for t in ts]
        times = []
        for step in range(steps):
            started = time.perf_counter()
            logits = runner.forward(ForwardBatch([SequenceChunk([toks[i]], len(prompt) + step, t)
                                                  for i, t in enumerate(ts)])).logits
            times.append(time.perf_counter() - started)
            toks = [int(row.argmax()) for row in logits]
            if on_step:
                on_step()
        return times

    run(8)                                                              # warm-up
    steps = []
    for _ in range(args.runs):
        steps.extend(run(args.tokens - 1))
    ms = sorted(t * 1e3 for t in steps)
    print(f"# {runner.info.dtype}, {runner.info.device}, {args.streams} stream(s), prompt {len(prompt)} tokens")
    print(f"step ms: median {statistics.median(ms):.2f}  p10 {ms[len(ms) // 10]:.2f}  min {ms[0]:.2f}  "
          f"-> {args.streams * 1e3 / statistics.median(ms):.1f} tok/s at the median")
    if args.profile_steps:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(args.profile_steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
