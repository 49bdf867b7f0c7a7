"""The runner's decode step alone on a GPU (no scheduler): ms per step at a few batch sizes, with
and without CUDA graphs, against the weight + KV read roofline at the measured copy bandwidth.
A diagnostic next to bench/engine.py (which measures through the scheduler)."""
from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams

GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--blas", default="default", help="torch.backends.cuda.preferred_blas_library")
    parser.add_argument("--graphs", default="1,0", help="with CUDA graphs (1), without (0)")
    args = parser.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, BLAS {torch.backends.cuda.preferred_blas_library()}", flush=True)
    rows = []
    for graphs in [flag == "1" for flag in args.graphs.split(",")]:
        runner = TorchRunner(RunnerSettings("random", args.model, args.model, dtype="bfloat16", device="cuda",
                                            cuda_graphs=graphs, num_pages=8192, max_sequences=64,
                                            context_length=4096))
        cfg = runner.config
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        if not cfg.tie_word_embeddings:      # the embedding is looked up (a row), not read whole
            weight_bytes -= cfg.vocab_size * cfg.hidden_size * 2
        kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
        for batch in [int(b) for b in args.batches.split(",")]:
            ps = runner.page_size
            pages = -(-(args.context + args.steps + 1) // ps)
            tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
            rng = np.random.default_rng(0)
            # KV of the context: one prefill (the K/V values do not matter for the timing)
            for i in range(batch):
                ids = rng.integers(0, cfg.vocab_size, args.context).tolist()
                runner.forward(ForwardBatch([SequenceChunk(ids, 0, tables[i], i, i + 1, None)]))
            times = []
            for step in range(args.steps):
                chunks = [SequenceChunk([5], args.context + step, tables[i], i, i + 1, GREEDY)
                          for i in range(batch)]
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                runner.forward(ForwardBatch(chunks))
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            ms = float(np.median(times[8:]))
            roofline_ms = (weight_bytes + batch * (args.context + args.steps // 2) * kv_per_token) / bw * 1e3
            rows.append((graphs, batch, ms, batch / ms * 1e3, roofline_ms / ms))
            print(f"graphs={graphs} batch={batch}: {ms:.2f} ms/step", flush=True)
        del runner
        torch.cuda.empty_cache()
    print("| graphs | batch | ms/step | tok/s | % of roofline |\n| --- | --- | --- | --- | --- |")
    for graphs, batch, ms, tps, frac in rows:
        print(f"| {graphs} | {batch} | {ms:.2f} | {tps:.0f} | {100 * frac:.0f}% |")


if __name__ == "__main__":
    main()
