"""The one-launch cluster decode (kernels/cuda/cluster_decode.cu) against dense decode and the Triton
centroid launcher, kernels alone, batch 1-4 on an H200, in one run.

    python3 -m bench.cluster_decode [--cases 1x32768 1x131072 ...]

Each case is checked first: the cluster kernel's output against the Triton launcher's (one stage)
and both against centroid_reference.centroid_select_pages + reference.attend_pages on the first
sequence; a batch-2 case also runs a padding row (length 0: zeros, the other row unchanged).
Then every path is timed in a CUDA graph over distinct input copies (bench/centroid_stages.py's
inputs and copies rule), and the cluster kernel's blocks stamp clock64() at each stage's end
(Params.stamps): the mean and max over blocks of each stage's microseconds (at 1.98 GHz).
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from backends.cuda.layout import table_width
from bench.centroid_stages import GROUP_PAGES, HKV, PAGE, SPAN, add_run_summaries, make_inputs, rotating
from bench.gemv import graph_us
from kernels import centroid_reference as cref
from kernels import reference as ref
from kernels.cuda import cluster_decode as cd
from kernels.triton.centroids import centroid_sparse_decode
from kernels.triton.decode import paged_decode

BUDGET = 2048
STAGES = ["q+table", "cents wait", "scores", "partials", "push+barrier", "keys", "ranks+assign+barrier", "kv wait",
          "qk", "softmax", "pv+push", "cluster barrier", "merge"]


def check(x: dict, scale: float, force: tuple, cluster: int) -> None:
    want = triton_decode(x, scale)
    pages = x["table"][0, :-(-int(x["lens"][0]) // PAGE)].long()
    cpu = {n: x[n][pages].float().cpu() for n in ("k", "v", "cents", "stats")}
    table = torch.arange(len(pages), dtype=torch.int32)
    q0 = x["q"][0].float().cpu()
    chosen = cref.centroid_select_pages(q0, cpu["cents"], cpu["stats"], table, int(x["lens"][0]), PAGE, GROUP_PAGES,
                                        scale, BUDGET, 16, 64)
    expected = ref.attend_pages(q0, cpu["k"], cpu["v"], table, int(x["lens"][0]), chosen, scale)
    got = cluster_decode(x, scale, force, cluster)
    vs_triton = (got.float() - want.float()).abs().max().item()
    vs_ref = (got[0].float().cpu() - expected).abs().max().item()
    print(f"  cluster {cluster}: vs the Triton launcher {vs_triton:.2e}, vs the reference {vs_ref:.2e} "
          f"(Triton vs the reference {(want[0].float().cpu() - expected).abs().max().item():.2e})", flush=True)
    assert vs_triton < 4e-3 and vs_ref < 4e-3, "cluster decode wrong"
    if x["q"].shape[0] == 2:
        padded = dict(x, lens=x["lens"].clone())
        padded["lens"][1] = 0
        got = cluster_decode(padded, scale, force, cluster)
        assert got[1].abs().max().item() == 0 and (got[0].float() - want[0].float()).abs().max().item() < 4e-3
        print("  padding row: zeros, the other row unchanged", flush=True)


def triton_decode(x: dict, scale: float, shortlist: cref.CentroidShortlist | None = None) -> torch.Tensor:
    return centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["lens"], BUDGET, 16,
                                  64, GROUP_PAGES, scale, shortlist=shortlist)


def cluster_decode(x: dict, scale: float, force: tuple, cluster: int, stamps: torch.Tensor | None = None):
    return cd.cluster_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["lens"], SPAN,
                                    force, scale, cluster=cluster, stamps=stamps)


def stage_times(xs: list, scale: float, force: tuple, cluster: int, rounds: int = 5) -> tuple:
    """Each stage's mean and max microseconds over the blocks of one call on a copy not used just
    before (the others run first), averaged over rounds."""
    total = None
    for _ in range(rounds):
        for x in xs[1:]:
            cluster_decode(x, scale, force, cluster)
        stamps = torch.zeros(xs[0]["q"].shape[0] * HKV * cluster, 16, dtype=torch.int64, device="cuda")
        cluster_decode(xs[0], scale, force, cluster, stamps)
        torch.cuda.synchronize()
        delta = (stamps[:, 1:len(STAGES) + 1] - stamps[:, :len(STAGES)]).double()
        total = delta if total is None else total + delta
    us = total / rounds / 1980.0
    return us.mean(0).tolist(), us.max(0).values.tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["1x32768", "1x131072", "2x32768", "4x32768", "1x8292"])
    args = parser.parse_args()
    assert cd.available(torch.device("cuda")), "needs an sm_90 GPU and nvcc"
    scale = 128 ** -0.5
    force = ref.sparse_page_counts(SPAN, BUDGET, 16, 64)
    rows, stages = [], []
    for case in args.cases:
        batch, context = map(int, case.split("x"))
        width = table_width(-(-context // PAGE), 1 << 30)
        width += -width % GROUP_PAGES
        sparse_bytes = batch * HKV * (BUDGET * 128 * 4 + context // SPAN * 8 * 128)
        copies = max(1, min(10, -(-200_000_000 // sparse_bytes)))
        xs = [make_inputs(batch, context, width, 8, torch.float8_e4m3fn, seed) for seed in range(copies)]
        print(f"b{batch} x {context} (width {width}, {copies} copies)", flush=True)
        for cluster in (8, 16):
            check(xs[0], scale, force, cluster)
        dense = graph_us(rotating([partial(lambda x: paged_decode(x["q"], x["k"], x["v"], x["table"], x["lens"],
                                                                  scale), x) for x in xs]))
        one = graph_us(rotating([partial(triton_decode, x, scale) for x in xs]))
        for x in xs:
            add_run_summaries(x, 8, 16)
        coarse = graph_us(rotating([partial(lambda x: triton_decode(
            x, scale, cref.CentroidShortlist(*x["runs"], 16, 8192)), x) for x in xs]))
        timed = [graph_us(rotating([partial(cluster_decode, x, scale, force, c) for x in xs])) for c in (8, 16)]
        rows.append((case, dense, one, coarse, *timed))
        for cluster in (8, 16):
            stages.append((case, cluster, *stage_times(xs, scale, force, cluster)))
        del xs
        torch.cuda.empty_cache()
    print("\n| b x context | dense us | Triton one stage | Triton coarse to fine | cluster of 8 | cluster of 16 |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for case, dense, *paths in rows:
        print(f"| {case} | {dense:.1f} | " + " | ".join(f"{us:.1f} ({dense / us:.2f}x)" for us in paths) + " |")
    print("\n| b x context, cluster | " + " | ".join(STAGES) + " |\n|" + " --- |" * (len(STAGES) + 1))
    for case, cluster, mean, peak in stages:
        cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(mean, peak, strict=True))
        print(f"| {case}, {cluster} | {cells} |")


if __name__ == "__main__":
    main()
