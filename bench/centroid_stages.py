"""Sparse decode that selects 64-token groups by k-means centroids, timed against dense decode and
the engine's coarse-to-fine Quest decode, kernels alone, in one run.

    python3 -m bench.centroid_stages [--batch 16] [--context 32768] [--width PAGES] [--clusters 8]
        [--dtypes bf16 fp8] [--tune [select attend fused]] [--kv-layout token-major|head-major] [--launch-floor]
        [--quick] [--shortlist TOKENS [--run-pages 16 [64 ...]]]

What it prototypes (bench/sparse_estimators.py, rule kmeansCxNv, measures the quality): each run of
4 pages (64 tokens) per KV head is summarised by C centroids; kernels/triton/centroid_scores.py scores
every group from them, kernels/triton/selection.combine_select keeps the budget's best groups
(sink and the last group forced) and writes their pages' physical ids (expand=4), and the split-K
decode kernel attends to them. Llama-3-8B attention shapes (32 q heads, 8 KV heads, d 128, bf16), random
K/V on shuffled pages; the centroids here are simply each group's first C keys (their values do
not change the time). Checked first: the group scores against kernels/centroid_reference.centroid_group_logits, the
selection against float64 scores, the output against torch attention over the chosen pages.

--shortlist adds coarse to fine (centroid_reference.centroid_select_pages(shortlist=...)): C centroids per
run of --run-pages pages (again the run's first C keys) score every run, each KV head keeps the
best TOKENS worth of runs, and the group selection above runs over those runs' groups only
(centroid_sparse_decode(shortlist=...)); its row is checked against the reference on one sequence.

Every stage is timed in a CUDA graph (bench/gemv.graph_us) over `--copies` distinct copies of the
inputs in turn, so that a small working set (batch 1) is not served from the 50 MB L2 cache call
after call as it would never be in a model, whose every layer reads its own cache.
"""
from __future__ import annotations

import argparse
import itertools
import math
from functools import partial

import torch
import triton
import triton.language as tl

from backends.cuda.layout import table_width
from bench.gemv import graph_us
from bench.sparse_stages import HKV, HQ, PAGE, D, sparse_inputs
from kernels import centroid_reference as cref
from kernels import reference as ref
from kernels.triton.centroid_scores import centroid_group_logits, score_tuning
from kernels.triton.centroids import (
    HeadBudgets,
    attend_tuning,
    centroid_sparse_decode,
    fused_tile,
    selection_warps,
)
from kernels.triton.decode import paged_decode, split_k_decode
from kernels.triton.select_attend import select_attend
from kernels.triton.selection import combine_select
from kernels.triton.shortlist_scores import shortlisted_group_logits
from kernels.triton.sparse import sparse_decode
from kernels.triton.top_k import prefers_top_k

GROUP_PAGES = 4
SPAN = PAGE * GROUP_PAGES
BUDGET = 2048            # main() sets it from --budget
# scoring kernel tunings tried: (groups per program, warps)
TUNINGS = ((8, 1), (8, 2), (16, 2), (4, 1))
# ... and of the 2D tile (groups per program, warps)
ROW_TILES = ((8, 1), (16, 1), (32, 2), (16, 2))


DEVICE = "cuda"          # a smoke run of check() on the CPU under TRITON_INTERPRET sets "cpu"


def make_inputs(batch: int, context: int, width: int, clusters: int, cent_dtype, seed: int,
                head_major: bool = False) -> dict:
    """bench/sparse_stages.py's inputs (q, paged K/V, Quest summaries for the engine's decode) plus
    centroid summaries at each complete group's last page: the group's first C keys (their values
    do not change the time), log count log(64 / C) and a small random spread. head_major: K/V
    stored [pages, kv_heads, page_size, d] (a page's rows of one head contiguous) under the same
    [pages, page_size, kv_heads, d] view, which every kernel reads through its strides."""
    q, k, v, kmin, kmax, pmin, pmax, table, lens = sparse_inputs(batch, context, width, seed=seed, device=DEVICE)
    if head_major:
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    dev = k.device
    gen = torch.Generator(device=dev).manual_seed(seed + 1000)
    cents = torch.zeros(k.shape[0], HKV, clusters, D, device=dev, dtype=cent_dtype)
    stats = torch.zeros(k.shape[0], HKV, clusters, 2, device=dev, dtype=torch.float32)
    full = context // SPAN
    first = table[:, 0:full * GROUP_PAGES:GROUP_PAGES].long()                  # [B, G] first page
    last = table[:, GROUP_PAGES - 1:full * GROUP_PAGES:GROUP_PAGES].long()
    assert clusters <= PAGE
    cents[last.flatten()] = k[first.flatten(), :clusters].transpose(1, 2).to(cent_dtype)
    stats[last.flatten(), ..., 0] = math.log(SPAN / clusters)
    stats[last.flatten(), ..., 1] = 0.1 + 0.05 * torch.rand(last.numel(), HKV, clusters, device=dev, generator=gen)
    return dict(q=q, k=k, v=v, table=table, lens=lens, cents=cents, stats=stats, kmin=kmin, kmax=kmax,
                pmin=pmin, pmax=pmax)


def add_run_summaries(x: dict, clusters: int, run_pages: int) -> None:
    """Run summaries at each complete run's last page, as make_inputs makes the groups' (the run's
    first C keys, log count log(run tokens / C), a small random spread): x["runs"]. C may differ
    from the groups' (--run-clusters)."""
    table, k, dtype = x["table"], x["k"], x["cents"].dtype
    cents = torch.zeros(x["cents"].shape[0], HKV, clusters, D, dtype=dtype, device=k.device)
    stats = torch.zeros(x["stats"].shape[0], HKV, clusters, 2, device=k.device)
    full = int(x["lens"][0]) // (PAGE * run_pages)
    runs = table[:, :full * run_pages].view(table.shape[0], full, run_pages).long()
    last = runs[..., -1]
    pages = -(-clusters // PAGE)                # the run's first pages that hold its first C keys
    first_keys = k[runs[..., :pages].flatten()].view(-1, pages * PAGE, HKV, D)
    cents[last.flatten()] = first_keys[:, :clusters].transpose(1, 2).to(dtype)
    stats[last.flatten(), ..., 0] = math.log(PAGE * run_pages / clusters)
    stats[last.flatten(), ..., 1] = 0.1 + 0.05 * torch.rand(last.numel(), HKV, clusters, device=k.device)
    x["runs"] = (cents, stats)


def check_shortlist(x: dict, scale: float, shortlist: cref.CentroidShortlist) -> None:
    """The launcher with a shortlist against centroid_reference.centroid_select_pages(shortlist=...) and
    attend_pages on the first sequence (its pages copied out, on the CPU)."""
    pages = x["table"][0, :-(-int(x["lens"][0]) // PAGE)].long()
    cpu = {n: x[n][pages].float().cpu() for n in ("k", "v", "cents", "stats")}
    runs = tuple(t[pages].float().cpu() for t in x["runs"])
    table = torch.arange(len(pages), dtype=torch.int32)
    short = cref.CentroidShortlist(*runs, shortlist.run_pages, shortlist.shortlist_tokens)
    q = x["q"][0].float().cpu()
    args = (PAGE, GROUP_PAGES, scale, BUDGET, 16, 64)
    want = cref.centroid_select_pages(q, cpu["cents"], cpu["stats"], table, int(x["lens"][0]), *args, shortlist=short)
    expected = ref.attend_pages(q, cpu["k"], cpu["v"], table, int(x["lens"][0]), want, scale)
    got = engine_decode(x, scale, shortlist)[0].float().cpu()
    err = (got - expected).abs().max().item()
    print(f"centroid_sparse_decode with a shortlist vs the reference's two stages: max abs difference {err:.2e}",
          flush=True)
    assert err < 2e-2, "coarse-to-fine centroid decode wrong"


def centroid_decode(x: dict, scale: float, force: tuple, stages: dict | None = None, **attend) -> torch.Tensor:
    """Three launches: group scores, the selection (its output already the chosen groups' pages),
    split-K attention over those pages."""
    logits = centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE, GROUP_PAGES, scale,
                                   interpreted=DEVICE == "cpu")
    logical, physical, vlens = combine_select(logits, x["table"], x["lens"], SPAN, HKV, force, scale, force[0],
                                              expand=GROUP_PAGES)
    if stages is not None:
        stages.update(logits=logits, logical=logical, vlens=vlens, physical=physical)
    return split_k_decode(x["q"], x["k"], x["v"], physical, vlens, scale, **attend)


def check(x: dict, scale: float, force: tuple) -> None:
    got = centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE, GROUP_PAGES, scale,
                                interpreted=DEVICE == "cpu")
    n_groups = -(-int(x["lens"][0]) // SPAN)
    want = torch.stack([cref.centroid_group_logits(x["q"][i], x["cents"], x["stats"], x["table"][i], int(x["lens"][i]),
                                                   PAGE, GROUP_PAGES, scale).flatten(0, 1).to(got.device)
                        for i in range(got.shape[0])])
    full = (int(x["lens"].min()) - 1) // SPAN    # every row's scored groups (the rows share a length)
    err = (got[..., :full] - want[..., :full]).abs().max().item()
    print(f"group scores vs float64 reference: max abs difference {err:.2e} (logit units / scale)", flush=True)
    assert err < 5e-2 and torch.equal(got[..., full:n_groups], want[..., full:]), "centroid group scores wrong"
    stages: dict = {}
    out = centroid_decode(x, scale, force, stages)
    # the selection against float64 scores of the kernel's logits
    batch = got.shape[0]
    logits = got[..., :n_groups].double().view(batch, HKV, HQ // HKV, n_groups) * scale
    score = (logits - logits.logsumexp(3, keepdim=True)).amax(2)
    lst = torch.arange(n_groups, device=got.device)
    forced = (lst < force[1]) | (lst >= n_groups - force[2])
    score = score.masked_fill(forced, float("inf"))
    kth = score.topk(force[0], dim=2).values[:, :, -1:]
    chosen = score.gather(2, stages["logical"].long())
    wrong = int(((chosen - kth) < -1e-5 * kth.abs().clamp(min=1)).sum())
    print(f"selection: {wrong} of {chosen.numel()} chosen groups below the float64 k-th", flush=True)
    assert wrong == 0
    # the output against torch attention over the chosen pages
    k_sel = x["k"][stages["physical"].long()]                                   # [B, kvh, P, page, kvh', d]
    v_sel = x["v"][stages["physical"].long()]
    head = torch.arange(HKV, device=got.device).view(1, HKV, 1, 1, 1, 1).expand(batch, HKV, k_sel.shape[2], PAGE, 1, D)
    k_sel = k_sel.gather(4, head).squeeze(4).flatten(2, 3).float()              # [B, kvh, T, d]
    v_sel = v_sel.gather(4, head).squeeze(4).flatten(2, 3).float()
    valid = torch.arange(k_sel.shape[2], device=got.device) < stages["vlens"].long().view(batch, 1, 1)
    qg = x["q"].float().view(batch, HKV, HQ // HKV, D)
    att = (torch.einsum("bhgd,bhtd->bhgt", qg, k_sel) * scale).masked_fill(~valid[:, :, None], float("-inf"))
    want_out = torch.einsum("bhgt,bhtd->bhgd", att.softmax(-1), v_sel).reshape(batch, HQ, D)
    err = (out.float() - want_out).abs().max().item()
    print(f"output vs torch attention over the chosen pages: max abs difference {err:.2e}", flush=True)
    assert err < 2e-2, "centroid decode output wrong"
    err = (engine_decode(x, scale) .float() - out.float()).abs().max().item()
    print(f"centroid_sparse_decode (the engine's launcher) vs the stages: max abs difference {err:.2e}", flush=True)
    assert err < 2e-2


def engine_decode(x: dict, scale: float, shortlist: cref.CentroidShortlist | None = None, **choices) -> torch.Tensor:
    """The launcher the engine calls: its own choice of selection (select_attend for few rows, else
    combine_select with selection_warps) and attention tuning (attend_tuning); shortlist: its
    run_pages and tokens, the summaries x["runs"]; choices: centroid_sparse_decode's fuse_runs and
    select_first, forced."""
    if shortlist is not None:
        shortlist = cref.CentroidShortlist(*x["runs"], shortlist.run_pages, shortlist.shortlist_tokens)
    return centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["lens"], BUDGET,
                                  16, 64, GROUP_PAGES, scale, interpreted=DEVICE == "cpu", shortlist=shortlist,
                                  **choices)


@triton.jit
def _touch(X):
    """A kernel that does next to nothing: what one launch costs in a graph, work aside."""
    tl.store(X + tl.program_id(0), tl.load(X + tl.program_id(0)) + 1)


def launch_floor() -> None:
    """Graph-replayed time of 1-4 dependent launches of a trivial kernel (grid 128), the floor
    under any pipeline of that many kernels."""
    x = torch.zeros(128, device=DEVICE, dtype=torch.int32)
    times = [graph_us(lambda n=n: [_touch[(128,)](x) for _ in range(n)]) for n in (1, 2, 3, 4)]
    print("launch floor (us per call, 1-4 dependent trivial launches in a CUDA graph): "
          + ", ".join(f"{us:.1f}" for us in times), flush=True)


def rotating(fns):
    """One callable that runs the next of fns at each call (each captured graph call another copy)."""
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


# candidate tunings of the later stages (--tune)
SELECT_TUNINGS = [dict(num_warps=w) for w in (2, 4, 8)] + [dict(streamed=s, num_warps=8) for s in (True, False)] + [
    dict(streamed=False, num_warps=16)] + [
    # the k-th score read from a bitonic sort (of the budget's power of two, or of the whole row)
    dict(sort=o, num_warps=w) for o in ("topk", "sort") for w in (2, 4, 8)]
# the one-launch selection + attention for few rows (select_attend)
FUSED_TUNINGS = [dict(split_groups=s, num_warps=w) for s in (2, 4) for w in (4, 8)] + [
    dict(sort=o, num_warps=w) for o in ("topk", "sort") for w in (4, 8)] + [
    # one group a split (twice the programs, each repeating the row's selection), fewer warps
    dict(split_groups=s, sort="topk", num_warps=w) for s, w in ((1, 2), (1, 4), (1, 8), (2, 2))]
ATTEND_TUNINGS = [dict(num_splits=s) for s in (2, 4, 8, 16, 32)] + [
    dict(num_splits=s, block_n=n, num_warps=w) for s in (2, 4, 8, 16, 32) for n, w in ((32, 2), (128, 8))] + [
    dict(num_splits=s, block_n=16, num_warps=1, per_page=True) for s in (4, 8, 16)] + [
    # one program per (sequence, KV head), deeper load pipelines, no merge launch
    dict(num_splits=1, block_n=n, num_warps=w, num_stages=st) for n, w in ((64, 4), (128, 8), (32, 2))
    for st in (2, 3, 4, 5)] + [
    # attend_tuning's choices with the splits over the table's capacity
    dict(base, fixed_splits=True) for base in (
        dict(num_splits=16, block_n=128, num_warps=8), dict(num_splits=8, block_n=128, num_warps=8),
        dict(num_splits=1, block_n=128, num_warps=8, num_stages=5), dict(num_splits=1), dict(num_splits=2),
        dict(num_splits=4), dict(num_splits=1, block_n=128, num_warps=8, num_stages=6),
        dict(num_splits=1, block_n=128, num_warps=8, num_stages=7), dict(num_splits=1, block_n=128, num_warps=16,
                                                                          num_stages=5),
        dict(num_splits=1, block_n=64, num_warps=8, num_stages=6), dict(num_splits=1, block_n=64, num_warps=4,
                                                                         num_stages=4),
        dict(num_splits=1, block_n=128, num_warps=8, num_stages=5, evict_first=False))]


def tune_stages(xs: list, scale: float, force: tuple, stages: list[str]) -> None:
    """Time the selection and attention stages' candidate tunings (outputs checked against the
    default's first: the same selection, attention within rounding of the merge order)."""
    for label, fn, cfgs in (
            ("select", lambda x, **c: combine_select(x["logits"], x["table"], x["lens"], SPAN, HKV, force, scale,
                                                     force[0], expand=GROUP_PAGES, **c), SELECT_TUNINGS),
            ("attend", lambda x, **c: split_k_decode(x["q"], x["k"], x["v"], x["physical"], x["vlens"], scale, **c),
             ATTEND_TUNINGS),
            ("fused", lambda x, **c: select_attend(x["q"], x["k"], x["v"], x["logits"], x["table"], x["lens"], SPAN,
                                                   force, scale, **({"split_groups": max(1, 128 // SPAN)} | c)),
             FUSED_TUNINGS)):
        if label not in stages:
            continue
        timed = []
        base = fn(xs[0])
        for cfg in cfgs:
            try:
                got = fn(xs[0], **cfg)
            except Exception as exc:        # a tuning this shape cannot take (too many registers...)
                print(f"  {label} {cfg}: {type(exc).__name__}", flush=True)
                continue
            if label == "select":
                assert all(torch.equal(a, b) for a, b in zip(base, got, strict=True)), f"selection differs with {cfg}"
            else:
                assert (got.float() - base.float()).abs().max().item() < 1e-2, f"attention differs with {cfg}"
            timed.append((graph_us(rotating([partial(fn, x, **cfg) for x in xs])), cfg))
        timed.sort(key=lambda t: t[0])
        print(f"{label} tunings, best first: " + ", ".join(f"{cfg} {us:.1f}" for us, cfg in timed), flush=True)


def time_shortlist(xs: list, scale: float, shortlist: cref.CentroidShortlist) -> dict:
    """Graph-replayed us of coarse to fine: the launcher, and its stages (run scores; the run
    selection and the group scores over the shortlist, fused as the launcher runs them and as the
    two launches they replace: combine_select writing the compact tables, the scorer reading
    them), as labelled strings."""
    rows = xs[0]["q"].shape[0] * HKV
    device = xs[0]["q"].device
    run_pages = shortlist.run_pages
    counts = cref.shortlist_run_counts(PAGE, GROUP_PAGES, run_pages, shortlist.shortlist_tokens, BUDGET, 16, 64)
    runs = xs[0]["table"].shape[1] // run_pages
    groups = counts[0] * run_pages // GROUP_PAGES
    # each scorer with the launcher's tile for its rows' width, the run top-k as the launcher sorts it
    run_tile, group_tile = score_tuning(rows, device, runs), score_tuning(rows, device, groups)
    sort = "topk" if prefers_top_k(runs, counts[0]) else None

    def run_scores(x):
        return centroid_group_logits(x["q"], *x["runs"], x["table"], x["lens"], PAGE, run_pages, scale, **run_tile)

    def fused(x):
        return shortlisted_group_logits(x["q"], x["run_logits"], x["cents"], x["stats"], x["table"], x["lens"], PAGE,
                                        GROUP_PAGES, run_pages, counts, scale, sort=sort, **fused_tile(rows, device))

    def two_launches(x):
        _, compact, short_lens = combine_select(x["run_logits"], x["table"], x["lens"], PAGE * run_pages, HKV, counts,
                                                scale, counts[0], expand=run_pages, sort=sort,
                                                num_warps=selection_warps(rows, runs, sort, device))
        return centroid_group_logits(x["q"], x["cents"], x["stats"], compact, short_lens, PAGE, GROUP_PAGES, scale,
                                     **group_tile), compact, short_lens
    for x in xs:
        x["run_logits"] = run_scores(x)
    got, want = fused(xs[0]), two_launches(xs[0])
    lens = want[2]
    short_pages, short_groups = -(-int(lens.min()) // PAGE), int(lens.min()) // SPAN    # within every row's shortlist
    assert torch.equal(got[2], lens) and torch.equal(got[1][..., :short_pages], want[1][..., :short_pages])
    torch.testing.assert_close(got[0][..., :short_groups], want[0][..., :short_groups], rtol=1e-5, atol=1e-5)
    t_runs = graph_us(rotating([partial(run_scores, x) for x in xs]))
    t_fused = graph_us(rotating([partial(fused, x) for x in xs]))
    t_two = graph_us(rotating([partial(two_launches, x) for x in xs]))
    whole = graph_us(rotating([partial(engine_decode, x, scale, shortlist) for x in xs]))
    print(f"coarse to fine: run scores {t_runs:.1f} us, run selection + group scores fused {t_fused:.1f} "
          f"(as two launches {t_two:.1f}), the launcher {whole:.1f}", flush=True)
    # the launcher's two launch-saving choices forced each way (the same output, checked first)
    forced = [dict(fuse_runs=f, select_first=s) for f in (False, True) for s in (False, True)]
    base = engine_decode(xs[0], scale, shortlist, **forced[0])
    assert all(torch.equal(engine_decode(xs[0], scale, shortlist, **c), base) for c in forced[1:])
    print("the launcher, coarse to fine, choices forced: " + ", ".join(
        f"fuse_runs={c['fuse_runs']} select_first={c['select_first']} "
        f"{graph_us(rotating([partial(engine_decode, x, scale, shortlist, **c) for x in xs])):.1f} us"
        for c in forced), flush=True)
    return dict(runs=t_runs, scores=f"{t_runs:.1f} + {t_fused:.1f} (runs; runs selected + groups scored, "
                f"two launches: {t_two:.1f})", select="groups", whole=whole)


def time_head_budgets(xs: list, scale: float, shortlist: cref.CentroidShortlist | None, path: str,
                      mean_tokens: int) -> tuple[float, float, float]:
    """The launcher with a budget per KV head (HeadBudgets): each layer of a per-head table
    (bench/sparse_layer_budgets.py calibrate --per-head) a pattern of 8 heads' budgets at
    mean_tokens on average (bench/head_budget_attention.patterns), the layer's largest head as
    budget_tokens. Checked first on the first sequence against centroid_select_pages(head_budgets=...)
    and each head's attention over its own pages. -> (uniform us, mean us over the patterns, worst)."""
    from bench.head_budget_attention import patterns
    layers = patterns(path, mean_tokens)
    if shortlist is not None:
        shortlist = cref.CentroidShortlist(*xs[0]["runs"], shortlist.run_pages, shortlist.shortlist_tokens)

    budgets = {tuple(lengths): HeadBudgets(torch.tensor([n // SPAN for n in lengths], dtype=torch.int32,
                                                        device=xs[0]["q"].device), min(lengths) // SPAN)
               for lengths in layers}        # made once, as the engine would at start-up

    def launcher(x, lengths):
        short = None if shortlist is None else cref.CentroidShortlist(*x["runs"], shortlist.run_pages,
                                                                      shortlist.shortlist_tokens)
        return centroid_sparse_decode(x["q"], x["k"], x["v"], x["cents"], x["stats"], x["table"], x["lens"],
                                      max(lengths), 16, 64, GROUP_PAGES, scale, shortlist=short,
                                      interpreted=DEVICE == "cpu", head_budgets=budgets[tuple(lengths)])
    x = xs[0]
    lengths = layers[0]
    pages = x["table"][0, :-(-int(x["lens"][0]) // PAGE)].long()
    cpu = {n: x[n][pages].float().cpu() for n in ("k", "v", "cents", "stats")}
    short = None if shortlist is None else cref.CentroidShortlist(
        *(t[pages].float().cpu() for t in x["runs"]), shortlist.run_pages, shortlist.shortlist_tokens)
    table = torch.arange(len(pages), dtype=torch.int32)
    q = x["q"][0].float().cpu()
    n = int(x["lens"][0])
    want = cref.centroid_select_pages(q, cpu["cents"], cpu["stats"], table, n, PAGE, GROUP_PAGES, scale,
                                      max(lengths), 16, 64, shortlist=short, head_budgets=lengths)
    got = launcher(x, lengths)[0].float().cpu()
    group = HQ // HKV
    err = max((got[h * group:(h + 1) * group] - ref.attend_pages(
        q[h * group:(h + 1) * group], cpu["k"][:, :, h:h + 1], cpu["v"][:, :, h:h + 1], table, n,
        want[h].unsqueeze(0), scale)).abs().max().item() for h in range(HKV))
    print(f"head budgets {lengths}: launcher vs the reference's per-head choice and attention, max abs difference "
          f"{err:.2e}", flush=True)
    assert err < 2e-2, "per-head centroid decode wrong"
    uniform = graph_us(rotating([partial(engine_decode, x, scale, shortlist) for x in xs]))
    times = [graph_us(rotating([partial(launcher, x, lengths) for x in xs])) for lengths in layers]
    return uniform, sum(times) / len(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--width", type=int, default=None, help="page-table width in pages (default: the "
                        "engine's class for the context, backends/cuda/layout.table_width)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--copies", type=int, default=None, help="input copies in turn (default: enough to "
                        "make each call's sparse working set miss the L2 cache)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                        help="centroid dtypes timed (dense and the engine's decode are timed with the first)")
    parser.add_argument("--kv-layout", default="token-major", choices=["token-major", "head-major"],
                        help="the engine's [pages, page_size, kv_heads, d] or a page's rows of each head "
                             "contiguous ([pages, kv_heads, page_size, d]), for dense and sparse alike")
    parser.add_argument("--tune", nargs="*", choices=["select", "attend", "fused"], default=None,
                        help="also time candidate tunings of these stages (all four without a name), each "
                             "checked against the stage's default output first")
    parser.add_argument("--launch-floor", action="store_true", help="also time 1-4 trivial launches")
    parser.add_argument("--quick", action="store_true", help="time only the scorer's default and score_tuning "
                        "tiles (not the other candidate tilings)")
    parser.add_argument("--shortlist", type=int, default=0, help="also time coarse to fine with this many tokens' "
                        "worth of runs shortlisted per KV head (with the last dtype)")
    parser.add_argument("--run-clusters", type=int, default=0,
                        help="centroids per run of the coarse stage (default: --clusters, as the engine keeps)")
    parser.add_argument("--run-pages", type=int, nargs="+", default=[16],
                        help="pages per run of the coarse stage (several: coarse to fine timed with each)")
    parser.add_argument("--head-budgets", default=None, help="also time the launcher with a budget per KV head: "
                        "a per-head table of bench/sparse_layer_budgets.py, each layer a pattern (with the last "
                        "dtype, coarse to fine with the first --run-pages where --shortlist is given)")
    parser.add_argument("--head-mean", type=int, default=None,
                        help="keys a head on average in the --head-budgets patterns (default: --budget)")
    args = parser.parse_args()
    if args.launch_floor:
        launch_floor()
    args.width = args.width or table_width(args.context // PAGE, 1 << 30)
    assert args.width % GROUP_PAGES == 0 and args.context % PAGE == 0
    scale = D ** -0.5
    global BUDGET
    BUDGET = args.budget
    force = ref.sparse_page_counts(SPAN, args.budget, 16, 64)
    sparse_bytes = args.batch * HKV * (args.budget * D * 4 + args.context // SPAN * args.clusters * D)
    copies = args.copies or max(1, min(10, -(-200_000_000 // sparse_bytes)))
    print(f"batch {args.batch}, context {args.context}, width {args.width}, {args.kv_layout} K/V, "
          f"budget {args.budget} "
          f"({force[0]} groups of {SPAN}), {args.clusters} centroids per group, {copies} input copies", flush=True)
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    for i, name in enumerate(args.dtypes):
        dtype = dtypes[name]
        xs = [make_inputs(args.batch, args.context, args.width, args.clusters, dtype, seed,
                          args.kv_layout == "head-major") for seed in range(copies)]
        check(xs[0], scale, force)
        tunings = [{}] + ([] if args.quick else [dict(block_n=n, num_warps=w) for n, w in TUNINGS] + [
            dict(row_tile=True, block_n=n, num_warps=w) for n, w in ROW_TILES])
        timed = []
        for cfg in tunings:
            got = [centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE, GROUP_PAGES,
                                         scale, **cfg) for x in xs[:1]]
            n_groups = -(-int(xs[0]["lens"][0]) // SPAN)        # entries past the sequence are never written
            base = xs[0].setdefault("logits", got[0])[..., :n_groups]
            assert torch.allclose(got[0][..., :n_groups], base, rtol=1e-5, atol=1e-4), f"scores differ with {cfg}"
            timed.append((graph_us(rotating([partial(lambda x, c: centroid_group_logits(
                x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE, GROUP_PAGES, scale, **c), x, cfg)
                for x in xs])), cfg))
        print(f"{name} scores: " + ", ".join(f"{cfg or 'default'} {us:.1f}" for us, cfg in timed), flush=True)
        for x in xs:          # each stage's inputs, from the stage before
            x["logits"] = centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE,
                                                GROUP_PAGES, scale)
            x["logical"], x["physical"], x["vlens"] = combine_select(
                x["logits"], x["table"], x["lens"], SPAN, HKV, force, scale, force[0], expand=GROUP_PAGES)
        tuned = attend_tuning(args.batch * HKV, force[0] * SPAN, xs[0]["q"].device)
        sort = "topk" if prefers_top_k(xs[0]["logits"].shape[2], force[0]) else None
        tile = score_tuning(args.batch * HKV, xs[0]["q"].device)
        stage_fns = {
            "scores": lambda x, tile=tile: centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"],
                                                                 PAGE, GROUP_PAGES, scale, **tile),
            "select": lambda x: combine_select(x["logits"], x["table"], x["lens"], SPAN, HKV, force, scale, force[0],
                                               expand=GROUP_PAGES),
            "select tuned": lambda x, sort=sort: combine_select(
                x["logits"], x["table"], x["lens"], SPAN, HKV, force, scale, force[0], expand=GROUP_PAGES, sort=sort,
                num_warps=selection_warps(args.batch * HKV, x["logits"].shape[2], sort, x["q"].device)),
            "attend": lambda x: split_k_decode(x["q"], x["k"], x["v"], x["physical"], x["vlens"], scale),
            "attend tuned": lambda x, tuned=tuned: split_k_decode(x["q"], x["k"], x["v"], x["physical"],
                                                                  x["vlens"], scale, **tuned),
            "whole": lambda x: centroid_decode(x, scale, force),
            "launches tuned": lambda x, tile=tile, tuned=tuned, sort=sort: split_k_decode(
                x["q"], x["k"], x["v"], *combine_select(
                    centroid_group_logits(x["q"], x["cents"], x["stats"], x["table"], x["lens"], PAGE, GROUP_PAGES,
                                          scale, **tile), x["table"], x["lens"], SPAN, HKV, force, scale, force[0],
                    expand=GROUP_PAGES, sort=sort,
                    num_warps=selection_warps(args.batch * HKV, x["logits"].shape[2], sort, x["q"].device))[1:],
                scale, **tuned),
            "engine": lambda x: engine_decode(x, scale),
        }
        scores, select, select_tuned, attend, attend_tuned, whole, launches, engine = (
            graph_us(rotating([partial(fn, x) for x in xs])) for fn in stage_fns.values())
        print(f"three launches, each tuned as the launcher tunes it: {launches:.1f} us", flush=True)
        if args.shortlist and i == len(args.dtypes) - 1:
            run_clusters = args.run_clusters or args.clusters
            for run_pages in args.run_pages:
                shortlist = cref.CentroidShortlist(None, None, run_pages, args.shortlist)
                for x in xs:
                    add_run_summaries(x, run_clusters, run_pages)
                check_shortlist(xs[0], scale, shortlist)
                coarse = time_shortlist(xs, scale, shortlist)
                rows.append((f"centroids {name}, coarse to fine ({args.shortlist} tokens of {run_pages}-page runs, "
                             f"{run_clusters} centroids a run)",
                             coarse["scores"], (coarse["runs"], "runs"), coarse["select"], "-", coarse["whole"],
                             coarse["whole"]))
        if args.head_budgets and i == len(args.dtypes) - 1:
            shortlist = cref.CentroidShortlist(None, None, args.run_pages[0], args.shortlist) if args.shortlist \
                else None
            if shortlist is not None:
                for x in xs:
                    add_run_summaries(x, args.run_clusters or args.clusters, shortlist.run_pages)
            uniform, mean, worst = time_head_budgets(xs, scale, shortlist, args.head_budgets,
                                                     args.head_mean or args.budget)
            print(f"a budget per KV head (mean {args.head_mean or args.budget} tokens, {args.head_budgets}), "
                  f"{'coarse to fine' if shortlist else 'one stage'}: the launcher {mean:.1f} us on average over "
                  f"the layers (worst {worst:.1f}) against {uniform:.1f} with the uniform {args.budget}", flush=True)
        best = min(timed, key=lambda t: t[0])
        rows.append((f"centroids {name}", f"{timed[0][0]:.1f} / {scores:.1f}", best,
                     f"{select:.1f} / {select_tuned:.1f}", f"{attend:.1f} / {attend_tuned:.1f}", whole, engine))
        if args.tune is not None:
            tune_stages(xs, scale, force, args.tune or ["select", "attend", "fused"])
        if i == 0:
            dense = graph_us(rotating([partial(lambda x: paged_decode(x["q"], x["k"], x["v"], x["table"], x["lens"],
                                                                      scale), x) for x in xs]))
            quest = graph_us(rotating([partial(lambda x: sparse_decode(
                x["q"], x["k"], x["v"], x["kmin"], x["kmax"], x["table"], x["lens"], args.budget, 16, 64, scale,
                pmin=x["pmin"], pmax=x["pmax"], shortlist_tokens=8192), x) for x in xs]))
        del xs
        torch.cuda.empty_cache()
    print(f"\n| decode attention, b{args.batch} x {args.context} | scores us, default / score_tuning (best) "
          f"| select us, radix / tuned "
          f"| attend us, default / tuned | staged us (radix, default) | centroid_sparse_decode us | vs dense |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| dense paged_decode | - | - | - | - | {dense:.1f} | 1.00x |")
    print(f"| engine Quest, coarse to fine (4-token blocks) | - | - | - | - | {quest:.1f} | {dense / quest:.2f}x |")
    for label, scores, best, select, attend, whole, engine in rows:
        print(f"| {label} | {scores} ({best[0]:.1f}: {best[1] or 'default'}) | {select} | {attend} "
              f"| {whole:.1f} ({dense / whole:.2f}x) | {engine:.1f} | {dense / engine:.2f}x |")


if __name__ == "__main__":
    main()
