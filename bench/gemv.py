"""Batch-1 GEMV on a GPU: kernels/triton/gemv.py against cuBLAS (F.linear), Llama-3-8B's shapes.

    python3 -m bench.gemv
    python3 -m bench.gemv --tp 2 --skinny-rows 0     # one rank's shard under tensor parallelism

Per shape: correctness against F.linear (and silu_mul + F.linear for the fused down projection)
first, then each candidate config timed with CUDA graphs of 20 back-to-back calls (launch gaps as in
the engine's graphs), the best against cuBLAS, both as a share of the copy bandwidth. The last table
is what backends/cuda/linear.py's GEMV_CONFIGS should hold for this card.
"""
from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F

from bench.runner_step import copy_bandwidth
from kernels.triton.gemv import GemvConfig, default_config, gemv, skinny_gemm
from kernels.triton.layer_ops import silu_mul

SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
          "down (silu)": (4096, 14336, True)}
ROW_PARALLEL = ("o", "down (silu)")     # under tensor parallelism: K split, float32 partial outputs


def rank_shapes(tp: int) -> dict:
    """One rank's shard of SHAPES at tensor_parallel_size tp (backends/cuda/shard.py's split)."""
    return {name: ((n, k // tp, silu) if name in ROW_PARALLEL else (n // tp, k, silu))
            for name, (n, k, silu) in SHAPES.items()}


def graph_us(fn, calls: int = 20, reps: int = 10) -> float:
    """Mean us per call of fn replayed in a CUDA graph of `calls` calls (what the engine runs)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * reps)


def cublas_call(x: torch.Tensor, w: torch.Tensor, silu: bool) -> torch.Tensor:
    """What the layer runs without the Triton GEMV: silu_mul first for the down projection, then cuBLAS."""
    return F.linear(silu_mul(x) if silu else x, w)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-n", default="2,4,8,16")
    parser.add_argument("--block-k", default="256,512,1024")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,4")
    parser.add_argument("--skinny-rows", type=int, default=16, help="rows of the skinny_gemm table (0: skip)")
    parser.add_argument("--tp", type=int, default=1, help="one rank's shapes at this tensor_parallel_size")
    args = parser.parse_args()
    ints = [[int(v) for v in s.split(",")] for s in (args.block_n, args.block_k, args.warps, args.stages)]
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, (n, k, silu) in rank_shapes(args.tp).items():
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn(1, 2 * k if silu else k, device=dev, generator=gen).to(torch.bfloat16)
        xin = silu_mul(x) if silu else x
        want = F.linear(xin, w)
        partial_sums = args.tp > 1 and name in ROW_PARALLEL
        out = torch.empty_like(want, dtype=torch.float32 if partial_sums else want.dtype)
        cublas = graph_us(partial(cublas_call, x, w, silu))
        best = None
        for bn, bk, warps, stages in itertools.product(*ints):
            cfg = GemvConfig(bn, bk, warps, stages)
            got = gemv(x, w, silu=silu, config=cfg, out=out)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 2e-2, f"{name} {cfg}: relative error {err}"
            us = graph_us(partial(gemv, x, w, silu=silu, config=cfg, out=out))
            if best is None or us < best[0]:
                best = (us, cfg)
        read = w.numel() * 2
        chosen = default_config(n, k, silu)
        chosen_us = graph_us(partial(gemv, x, w, silu=silu, config=chosen, out=out))
        rows.append((name, n, k, cublas, best[0], best[1], read))
        print(f"{name} {n} x {k}: cuBLAS {cublas:.1f} us, best triton {best[0]:.1f} us {best[1]}; "
              f"default_config {chosen_us:.1f} us {chosen}", flush=True)
    print("| shape | N x K | cuBLAS us (% copy rate) | triton us (% copy rate) | speed-up | config |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, k, cub, tri, cfg, read in rows:
        roof = read / bw * 1e6
        print(f"| {name} | {n} x {k} | {cub:.1f} ({100 * roof / cub:.0f}%) | {tri:.1f} ({100 * roof / tri:.0f}%) | "
              f"{cub / tri:.2f}x | {cfg.block_n}, {cfg.block_k}, {cfg.num_warps} warps, {cfg.num_stages} stages |")
    if args.skinny_rows:
        skinny_table(args.skinny_rows, bw, gen)


def skinny_table(m: int, bw: float, gen: torch.Generator) -> None:
    """skinny_gemm at m rows against cuBLAS, every shape, a small grid of tunings."""
    dev = torch.device("cuda")
    print(f"| shape, {m} rows | N x K | cuBLAS us (% copy rate) | skinny us (% copy rate) | speed-up | config |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (n, k, _) in SHAPES.items():
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        want = F.linear(x, w)
        out = torch.empty_like(want)
        cub = graph_us(partial(F.linear, x, w))
        best = None
        for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4)):
            cfg = GemvConfig(bn, bk, warps, stages)
            try:
                got = skinny_gemm(x, w, config=cfg, out=out)
            except Exception as exc:        # e.g. out of shared memory for the deepest pipelines
                print(f"skinny {name} {cfg}: {type(exc).__name__}", flush=True)
                continue
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 2e-2, f"skinny {name} {cfg}: relative error {err}"
            us = graph_us(partial(skinny_gemm, x, w, config=cfg, out=out))
            if best is None or us < best[0]:
                best = (us, cfg)
        roof = w.numel() * 2 / bw * 1e6
        tri, cfg = best
        print(f"| {name} | {n} x {k} | {cub:.1f} ({100 * roof / cub:.0f}%) | {tri:.1f} ({100 * roof / tri:.0f}%) | "
              f"{cub / tri:.2f}x | {cfg.block_n}, {cfg.block_k}, {cfg.num_warps} warps, {cfg.num_stages} stages |",
              flush=True)


if __name__ == "__main__":
    main()
