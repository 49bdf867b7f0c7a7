"""Where a decode step's time goes on a GPU: the runner's graph-captured step at one batch size,
profiled kernel by kernel (torch.profiler over several replays), next to the step's wall time.

    python3 -m bench.profile_step --batch 1 --context 512
    python3 -m bench.profile_step --batch 16 --context 32768 --sparse     # Quest decode, engine defaults
    python3 -m bench.profile_step --batch 16 --context 32768 --sparse --selector centroids
    python3 -m bench.profile_step --batch 16 --context 32768 --sparse --selector centroids --shortlist-tokens 0
    python3 -m bench.profile_step --batch 1 --tp 2                        # rank 0 of tensor parallel

Prints per kernel name: launches per step, mean us per launch, us per step, share of the step; then
the sum of kernel time against the step's wall time (the rest is launch gaps and idle time).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import torch

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk, SparseSettings
from backends.cuda.runner import TorchRunner
from bench.runner_step import GREEDY, copy_bandwidth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--context-length", type=int, default=None,
                        help="the runner's context length, which sets the page-table width class "
                        "(default: context + 1024; the engine uses the model's, e.g. 131072)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (rank 0's kernels are profiled)")
    parser.add_argument("--sparse", action="store_true", help="Quest sparse decode with the engine's defaults "
                        "(budget 2048, 2 dense layers, sink 16, recent 64, 4-token summaries)")
    parser.add_argument("--selector", default="quest", choices=["quest", "centroids"],
                        help="with --sparse: sparse_attention.selector (centroids: 8 per 64 tokens)")
    parser.add_argument("--shortlist-tokens", type=int, default=8192, help="with --sparse: "
                        "sparse_attention.shortlist_tokens (the default; 0: one stage)")
    args = parser.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    page_size = 16
    pages = -(-(args.context + 4 * args.steps + 64) // page_size)
    sparse = (SparseSettings(enabled=True, selector=args.selector, shortlist_tokens=args.shortlist_tokens)
              if args.sparse else SparseSettings())
    runner = TorchRunner(RunnerSettings("random", args.model, args.model, dtype="bfloat16", device="cuda",
                                        cuda_graphs=True, num_pages=args.batch * pages + 64,
                                        max_sequences=max(64, args.batch),
                                        context_length=args.context_length or args.context + 1024,
                                        sparse=sparse, tensor_parallel_size=args.tp))
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(args.batch)]
    rng = np.random.default_rng(0)
    for i in range(args.batch):       # each sequence its own pages (no shared prefix)
        ids = rng.integers(0, runner.config.vocab_size, args.context).tolist()
        for start in range(0, args.context, 8192):
            runner.forward(ForwardBatch([SequenceChunk(ids[start:start + 8192], start, tables[i], i, i + 1, None)]))
    position = args.context

    def step() -> None:
        nonlocal position
        runner.forward(ForwardBatch([SequenceChunk([5], position, tables[i], i, i + 1, GREEDY)
                                     for i in range(args.batch)]))
        position += 1

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    wall_us = float(np.median(times))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name].append(event.device_time)
    total = sum(sum(v) for v in per_name.values()) / args.steps
    print(f"TP={args.tp} (rank 0), batch {args.batch}, context {args.context}, sparse {args.sparse} "
          f"({args.selector}, shortlist {args.shortlist_tokens}): "
          f"step {wall_us:.0f} us "
          f"(median of {args.steps}), kernels {total:.0f} us per step, gaps {wall_us - total:.0f} us; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| kernel | per step | us each | us per step | share |\n| --- | --- | --- | --- | --- |")
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durations in rows[:args.top]:
        per_step = sum(durations) / args.steps
        print(f"| {name[:90]} | {len(durations) / args.steps:.0f} | {np.mean(durations):.1f} | "
              f"{per_step:.0f} | {100 * per_step / wall_us:.1f}% |")
    runner.close()
    sys.stdout.flush()
    os._exit(0)     # an NCCL group's teardown at exit can hang; the followers are stopped


if __name__ == "__main__":
    main()
