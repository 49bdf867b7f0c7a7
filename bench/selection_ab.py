"""Whole sparse_decode with this tree's page selection against an earlier kernels/triton/selection.py,
in one process on a GPU: the same inputs, each side in a CUDA graph, alternated three times (the
best of each kept), and whether both chose the same pages.

    git show b09d3cb:kernels/triton/selection.py > .gpu/old_selection.py      # on the development machine
    python3 -m bench.selection_ab --base-file .gpu/old_selection.py           # on the GPU machine

Inputs from bench/sparse_stages.py (sparse_inputs: Llama-3-8B attention, bf16, shuffled pages, the engine's table
width, budget 2048, coarse to fine past 8192 tokens).
"""
from __future__ import annotations

import argparse
import importlib.util
from functools import partial

import kernels.triton.sparse as sparse
from bench.gemv import graph_us
from bench.sparse_stages import D, sparse_inputs
from kernels.triton.decode import paged_decode

SHAPES = ((1, 131072, 16384), (1, 32768, 4096), (16, 32768, 4096), (64, 32768, 4096))


def load_base(path: str):
    spec = importlib.util.spec_from_file_location("base_selection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-file", required=True, help="the earlier kernels/triton/selection.py")
    args = parser.parse_args()
    sides = {"this tree": sparse.combine_select, "base": load_base(args.base_file).combine_select}
    print("| batch x context | this tree us | base us | dense us | this tree / dense | base / dense "
          "| pages that differ |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for batch, context, width in SHAPES:
            q, k, v, kmin, kmax, pmin, pmax, table, lens = sparse_inputs(batch, context, width)
            run = partial(sparse.sparse_decode, q, k, v, kmin, kmax, table, lens, 2048, 16, 64, D ** -0.5,
                          pmin=pmin, pmax=pmax, shortlist_tokens=8192)
            best, chosen = {}, {}
            for _ in range(3):
                for side, combine_select in sides.items():
                    sparse.combine_select = combine_select      # what sparse_decode calls
                    chosen[side] = run(return_selection=True)[1].sort(dim=2).values
                    best[side] = min(best.get(side, float("inf")), graph_us(run))
            dense = graph_us(partial(paged_decode, q, k, v, table, lens, D ** -0.5))
            differ = (chosen["this tree"] != chosen["base"]).sum().item()
            print(f"| {batch} x {context // 1024}k | {best['this tree']:.1f} | {best['base']:.1f} | {dense:.1f} | "
                  f"{dense / best['this tree']:.2f}x | {dense / best['base']:.2f}x | {differ} of "
                  f"{chosen['base'].numel()} |", flush=True)
    finally:
        sparse.combine_select = sides["this tree"]


if __name__ == "__main__":
    main()
