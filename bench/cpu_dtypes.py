"""Each CPU serving dtype of the embedded model in process (the runner alone, no HTTP): tok/s of
one decode stream and of 8, and of a prefill of 8 x 64-token prompts, side by side with the host's
capabilities (the quant kernels: AVX-512 BF16 or AVX2; oneDNN bf16), which decide what the modes run on.

    .venv/bin/python -m bench.cpu_dtypes [--threads 2] [--dtypes auto float32 int8 bfloat16]
"""
from __future__ import annotations

import argparse
import time

import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
from backends.cuda.linear import onednn_bf16_available
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from backends.source import resolve_source
from kernels.cpu import quant_linear

GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
PROMPT, STEPS, PAGES_EACH = 64, 48, 40


def rates(runner: TorchRunner, streams: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) for `streams` sequences of a PROMPT-token prompt each."""
    tables = [list(range(1 + PAGES_EACH * s, 1 + PAGES_EACH * (s + 1))) for s in range(streams)]
    prompt = list(range(100, 100 + PROMPT))
    began = time.perf_counter()
    result = runner.forward(ForwardBatch([SequenceChunk(prompt, 0, tables[s], s, s + 1, GREEDY)
                                          for s in range(streams)]))
    prefill = streams * PROMPT / (time.perf_counter() - began)
    tokens = [t.token_id for t in result.tokens]
    began = time.perf_counter()
    for step in range(STEPS):
        result = runner.forward(ForwardBatch([SequenceChunk([tokens[s]], PROMPT + step, tables[s], s, s + 1, GREEDY)
                                              for s in range(streams)]))
        tokens = [t.token_id for t in result.tokens]
    return streams * STEPS / (time.perf_counter() - began), prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32", "int8", "bfloat16"])
    args = parser.parse_args()
    source = resolve_source("packaged:smollm2-135m-instruct")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"quant kernels {quant_linear.available()}, oneDNN bf16 {onednn_bf16_available()}, "
          f"{args.threads} threads", flush=True)
    print("| dtype | mode | decode 1 stream tok/s | decode 8 streams tok/s | prefill 8 x 64 tok/s |\n"
          "| --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        runner = TorchRunner(RunnerSettings(source.kind, source.path, "smollm2", dtype=dtype, page_size=16,
                                            num_pages=8 * PAGES_EACH + 1, threads=args.threads))
        (one, _), (eight, prefill) = rates(runner, 1), rates(runner, 8)
        print(f"| {dtype} | {runner.mode} | {one:.1f} | {eight:.1f} | {prefill:.0f} |", flush=True)
        runner.close()


if __name__ == "__main__":
    main()
