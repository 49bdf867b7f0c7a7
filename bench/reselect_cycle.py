"""Sparse decode per step when one page selection serves R steps (sparse_attention.reselect_every).

    python3 -m bench.reselect_cycle                      # b1/b16/b64 x 32k and b1 x 128k, R = 1, 4, 8, 16

Llama-3-8B attention shapes, random bf16 K/V on shuffled pages with exact summaries, page tables at
the engine's width class (bench/sparse_stages.sparse_inputs), the engine's default sparse settings
(budget 2048, sink 16, recent 64, 4-token summaries, coarse to fine past 8192 tokens). Per shape,
in CUDA graphs (bench/gemv.graph_us): a step that selects (scores, selections, stores them per seq
slot, attends), a step that reuses the stored selections (kernels/reference.reused_pages, then
attends), and dense paged_decode over the same pages. A cycle of R steps is one selecting step and
R - 1 reusing ones, so its mean step is (select + (R - 1) * reuse) / R. Correctness first: the
stored selection is the step's own, and a reusing step three tokens later attends exactly the
reference's pages and matches attention over them.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.gemv import graph_us
from bench.sparse_stages import HKV, PAGE, sparse_inputs
from kernels import reference as ref
from kernels.triton.decode import paged_decode, split_k_decode
from kernels.triton.sparse import sparse_decode

SHAPES = {"1x32k": (1, 32768, 4096), "16x32k": (16, 32768, 4096), "64x32k": (64, 32768, 4096),
          "1x128k": (1, 131072, 16384)}
TARGETS = {"1x32k": 4.0, "16x32k": 8.0, "64x32k": 8.0, "1x128k": 8.0}


def check(q, k, v, kmin, kmax, pmin, pmax, table, lens, settings, store, slots) -> None:
    """The selecting step stores its own pages; a reusing step 3 tokens later (some rows open a
    page) attends reference.reused_pages of them, and its output is attention over those pages."""
    budget, _, recent = ref.sparse_page_counts(PAGE, settings["budget_tokens"], settings["sink_tokens"],
                                               settings["recent_tokens"])
    short = lens - 3
    _, chosen, _ = sparse_decode(q, k, v, kmin, kmax, table, short, return_selection=True, selections=store,
                                 seq_slots=slots, **settings)
    assert torch.equal(store[slots], chosen), "the stored selection is not the step's own"
    out, reused, vlens = sparse_decode(q, k, v, kmin, kmax, table, lens, return_selection=True, selections=store,
                                       seq_slots=slots, reuse_selection=True, **settings)
    for i, n in enumerate(lens.tolist()):
        expected = ref.reused_pages(store[slots[i]].long().cpu(), -(-n // PAGE), budget, recent)
        assert torch.equal(reused[i].long().cpu(), expected), f"row {i}: reused pages differ from the reference"
    physical = table.gather(1, reused.flatten(1).long()).view_as(reused)
    direct = split_k_decode(q, k, v, physical, vlens, settings["scale"])
    err = ((out.float() - direct.float()).norm() / direct.float().norm()).item()
    assert err < 1e-2, f"reusing step's output differs from attention over its pages ({err:.2e})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--cycles", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        batch, context, width = SHAPES[name]
        q, k, v, kmin, kmax, pmin, pmax, table, lens = sparse_inputs(batch, context, width)
        settings = dict(budget_tokens=2048, sink_tokens=16, recent_tokens=64, scale=128 ** -0.5, pmin=pmin,
                        pmax=pmax, shortlist_tokens=8192, kmin=kmin, kmax=kmax)
        budget = 2048 // PAGE
        store = torch.zeros(batch + 3, HKV, budget, dtype=torch.int32, device=q.device)
        slots = torch.randperm(batch + 3, device=q.device)[:batch]
        run = partial(sparse_decode, q, k, v, page_tables=table, seq_lens=lens, selections=store, seq_slots=slots,
                      **settings)
        check(q, k, v, kmin, kmax, pmin, pmax, table, lens,
              {key: val for key, val in settings.items() if key not in ("kmin", "kmax")}, store, slots)
        select_us = graph_us(run)
        reuse_us = graph_us(partial(run, reuse_selection=True))
        dense_us = graph_us(partial(paged_decode, q, k, v, table, lens, settings["scale"]))
        rows.append((name, select_us, reuse_us, dense_us))
        print(f"{name}: select {select_us:.1f} us, reuse {reuse_us:.1f} us, dense {dense_us:.1f} us", flush=True)
    print("| batch x context | selecting step us | reusing step us | dense us | "
          + " | ".join(f"R={r}: mean us, x dense" for r in args.cycles) + " | target |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in args.cycles) + " | --- |")
    for name, select_us, reuse_us, dense_us in rows:
        cells = []
        for r in args.cycles:
            mean = (select_us + (r - 1) * reuse_us) / r
            cells.append(f"{mean:.1f}, {dense_us / mean:.2f}x")
        print(f"| {name} | {select_us:.1f} | {reuse_us:.1f} | {dense_us:.1f} | " + " | ".join(cells)
              + f" | >= {TARGETS[name]:g}x |")


if __name__ == "__main__":
    main()
