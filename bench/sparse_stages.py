"""The stages of coarse-to-fine Quest decode on a GPU, one by one, with candidate tunings.

    python3 -m bench.sparse_stages                 # batch 16 x 32k, page 16, 4-token summaries

Llama-3-8B attention shapes (32 q heads, 8 KV heads, d 128, bf16), each sequence on its own
shuffled pages, page tables at the engine's width class (4096 pages for 32k). Each stage is timed
in a CUDA graph (bench/gemv.graph_us) and checked against the default tuning's output first:
coarse scores (page summaries), the shortlist selection, the fine scores of the shortlist, the
budget selection, attention over the chosen pages; then the whole sparse_decode against dense
paged_decode over the same pages. The best tunings are what kernels/triton/sparse.py should default to.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.gemv import graph_us
from kernels import reference as ref
from kernels.triton.decode import paged_decode, split_k_decode
from kernels.triton.selection import combine_select, select_pages
from kernels.triton.sparse import quest_bounds, quest_scores, shortlist_bounds, shortlist_scores, sparse_decode
from kernels.triton.summaries import update_page_summaries

HQ, HKV, D = 32, 8, 128
PAGE, SUMMARY = 16, 4


def sparse_inputs(batch: int, context: int, width: int, shuffled: bool = True, seed: int = 0,
                  device: str = "cuda") -> tuple:
    """Random bf16 q and paged K/V with exact block and page summaries, each sequence on its own
    pages (scattered over the pool, or in order), page tables `width` wide:
    (q, k, v, kmin, kmax, pmin, pmax, table, lens) on `device`."""
    dev, dt = torch.device(device), torch.bfloat16
    pages = -(-context // PAGE)
    total = batch * pages + 1
    gen = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(total, PAGE, HKV, D, device=dev, dtype=dt, generator=gen)
    v = torch.randn(total, PAGE, HKV, D, device=dev, dtype=dt, generator=gen)
    perm = (torch.randperm(total - 1, device=dev, generator=gen) if shuffled
            else torch.arange(total - 1, device=dev)).int()
    table = torch.zeros(batch, width, dtype=torch.int32, device=dev)
    table[:, :pages] = perm[:batch * pages].view(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    kmin = torch.zeros(total, PAGE // SUMMARY, HKV, D, device=dev, dtype=dt)
    kmax = torch.zeros_like(kmin)
    pmin = torch.zeros(total, HKV, D, device=dev, dtype=dt)
    pmax = torch.zeros_like(pmin)
    update_page_summaries(kmin, kmax, k, table, torch.zeros_like(lens), lens, context, pmin, pmax)
    q = torch.randn(batch, HQ, D, device=dev, dtype=dt, generator=gen)
    return q, k, v, kmin, kmax, pmin, pmax, table, lens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--width", type=int, default=4096, help="page-table width (the engine's class)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--shortlist-tokens", type=int, default=8192, help="the engine's default")
    parser.add_argument("--layout", default="shuffled", choices=["shuffled", "contiguous"],
                        help="pages of a sequence scattered over the pool (a long-running server) or in order")
    parser.add_argument("--skip-tuning", action="store_true", help="only the whole sparse_decode vs dense")
    parser.add_argument("--summary-dtype", default="bf16", choices=["bf16", "fp8"],
                        help="fp8: the summaries cast to float8 e4m3 (round to nearest), to time what 8-bit "
                             "summaries would read; not a bound any more, so for timing only")
    args = parser.parse_args()
    dev, ps, st = torch.device("cuda"), PAGE, SUMMARY
    b, ctx = args.batch, args.context
    pages = -(-ctx // ps)
    q, k, v, kmin, kmax, pmin, pmax, table, lens = sparse_inputs(b, ctx, args.width, args.layout == "shuffled")
    if args.summary_dtype == "fp8":
        kmin, kmax, pmin, pmax = (t.to(torch.float8_e4m3fn) for t in (kmin, kmax, pmin, pmax))
    counts = ref.sparse_page_counts(ps, args.budget, 16, 64)
    budget = counts[0]
    shortlist = ref.shortlist_pages(ps, budget, args.shortlist_tokens)
    scale = D ** -0.5
    rows = []

    def best_of(label, fn, configs, check=None):
        base = fn()
        timings = []
        for cfg in configs:
            got = fn(**cfg)
            if check is not None:
                check(base, got, cfg)
            timings.append((graph_us(partial(fn, **cfg)), cfg))
        timings.sort(key=lambda t: t[0])
        default = next(t for t in timings if not t[1])
        rows.append((label, default[0], timings[0][0], timings[0][1]))
        print(f"{label}: default {default[0]:.1f} us; " + ", ".join(f"{cfg or 'default'} {us:.1f}"
                                                                    for us, cfg in timings), flush=True)
        return base, timings[0][1]

    def same_selection(a, b, cfg):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), f"selection differs with {cfg}"

    def exact_selection(bounds, keep, listed=None):
        """A check against float64: the selection each kernel should make from these bounds (pages
        whose float64 scores sit within 1e-5 of the k-th are near-ties either may keep)."""
        lst = (torch.arange(bounds.shape[2], device=dev).expand(b, HKV, -1) if listed is None else listed.long())
        logits = bounds.double().view(b, HKV, HQ // HKV, -1) * scale
        n_pages = (lens.long() + ps - 1) // ps
        valid = (lst >= 0) & (lst < n_pages[:, None, None])
        logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
        score = (logits - logits.logsumexp(3, keepdim=True)).amax(2)
        forced = (lst < counts[1]) | (lst >= n_pages[:, None, None] - counts[2])
        score = score.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
        kth = score.topk(keep, dim=2).values[:, :, -1:]
        finite_kth = torch.where(kth.isinf(), torch.zeros_like(kth), kth)

        def check(_, got, cfg):
            chosen = torch.gather(score, 2, got[0].long().clamp(min=0) if listed is None else
                                  (got[0].long()[..., None] == lst[:, :, None, :]).float().argmax(3))
            wrong = ((chosen - finite_kth) < -1e-5 * finite_kth.abs().clamp(min=1)).sum().item()
            print(f"  {cfg or 'default'}: {wrong} of {chosen.numel()} chosen pages below the float64 k-th "
                  f"by more than near-tie rounding", flush=True)
            assert wrong == 0, f"selection wrong with {cfg}"
        return check

    def same_scores(a, b, cfg):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3, equal_nan=True), f"scores differ with {cfg}"

    force = counts
    print(f"batch {b}, context {ctx}, width {args.width} pages, {args.layout} pages, budget {args.budget}, "
          f"shortlist {shortlist} pages", flush=True)
    coarse_fn = partial(quest_scores, q, pmin.unsqueeze(1), pmax.unsqueeze(1), table, lens, ps, force)
    coarse_cfgs = [{}] + [dict(all_heads=True, block_p=bp, pages_per_prog=pp, num_warps=w)
                          for bp, pp, w in ((2, 8, 4), (4, 8, 4), (4, 16, 4), (4, 32, 4), (8, 16, 4), (8, 32, 8),
                                            (2, 4, 2), (16, 16, 8), (8, 64, 8))] + [
        dict(all_heads=False, block_p=bp, num_warps=w, dot=dot) for bp, w in ((16, 4), (32, 4), (64, 4), (64, 8))
        for dot in (False, True)] + [dict(all_heads=False, block_p=bp, num_warps=w) for bp, w in ((16, 2), (32, 2),
                                                                                               (128, 8))]
    if args.skip_tuning:
        coarse_cfgs = [{}]
    coarse, _ = best_of("coarse scores (page summaries)", coarse_fn, coarse_cfgs, same_scores)
    sel1_fn = partial(select_pages, coarse, table, lens, ps, shortlist)
    listed, listed_phys, _ = sel1_fn()
    best_of("shortlist selection", sel1_fn, [{}, dict(early_exit=False)], same_selection)
    coarse_bounds = quest_bounds(q, pmin.unsqueeze(1), pmax.unsqueeze(1), table, lens, ps)
    best_of("coarse bounds alone", partial(quest_bounds, q, pmin.unsqueeze(1), pmax.unsqueeze(1), table, lens, ps),
            [{}])
    best_of("coarse combine + select (one launch)",
            partial(combine_select, coarse_bounds, table, lens, ps, HKV, force, scale, shortlist),
            [{}, dict(chunk=1024), dict(chunk=4096), dict(num_warps=4), dict(num_warps=16)]
            + ([dict(streamed=False)] + [dict(streamed=False, sort="topk", num_warps=w) for w in (8, 16)]
               if args.width <= 4096 else []), exact_selection(coarse_bounds, shortlist))
    fine_fn = partial(shortlist_scores, q, kmin, kmax, listed, listed_phys, lens, ps, force, scale)
    fine, _ = best_of("fine scores (shortlist blocks)", fine_fn,
                      [{}] + [dict(block_p=bp, num_warps=w, dot=False) for bp, w in ((2, 1), (4, 2), (8, 2))]
                      + [dict(block_p=bp, num_warps=w, dot=True) for bp, w in ((4, 1), (4, 2), (4, 4), (8, 1),
                                                                             (8, 2), (8, 4), (16, 4), (16, 8))],
                      same_scores)
    sel2_fn = partial(select_pages, fine, listed_phys, lens, ps, budget, listed=listed)
    logical, physical, vlens = sel2_fn()
    best_of("budget selection", sel2_fn, [{}, dict(early_exit=False)], same_selection)
    fine_bounds = shortlist_bounds(q, kmin, kmax, listed, listed_phys, lens, ps)
    best_of("fine combine + select (one launch)",
            partial(combine_select, fine_bounds, listed_phys, lens, ps, HKV, force, scale, budget, listed=listed),
            [{}, dict(streamed=True)] + [dict(sort=o, num_warps=w) for o in ("topk", "sort") for w in (4, 8)],
            exact_selection(fine_bounds, budget, listed))
    attend_cfgs = [{}] + [dict(num_splits=s) for s in (2, 4, 6, 8)]
    if not args.skip_tuning:
        attend_cfgs += [dict(num_splits=s, block_n=n, num_warps=w, num_stages=stages, per_page=pp)
                        for s in (4, 8) for n, w in ((16, 2), (16, 4), (32, 2), (64, 4), (64, 8), (128, 4), (128, 8))
                        for stages in (2, 3, 4) for pp in (False, True) if not pp or n <= ps]
    best_of("attend chosen pages", partial(split_k_decode, q, k, v, physical, vlens, scale), attend_cfgs)
    whole = graph_us(partial(sparse_decode, q, k, v, kmin, kmax, table, lens, args.budget, 16, 64, scale,
                             pmin=pmin, pmax=pmax, shortlist_tokens=args.shortlist_tokens))
    one_level = graph_us(partial(sparse_decode, q, k, v, kmin, kmax, table, lens, args.budget, 16, 64, scale))
    dense = graph_us(partial(paged_decode, q, k, v, table, lens, scale))
    kv_bytes = b * ctx * HKV * D * 2 * 2
    summ = b * pages * HKV * D * 2 * 2
    roof = (b * budget * ps * HKV * D * 4 + summ + b * shortlist * (ps // st) * HKV * D * 4) / kv_bytes
    print("| stage | default us | best us | best tuning |\n| --- | --- | --- | --- |")
    for label, default, best, cfg in rows:
        print(f"| {label} | {default:.1f} | {best:.1f} | {cfg or 'default'} |")
    print(f"whole sparse_decode (coarse to fine, defaults) {whole:.1f} us; one level {one_level:.1f} us; "
          f"dense {dense:.1f} us: {dense / whole:.2f}x dense (bytes bound {1 / roof:.1f}x)")


if __name__ == "__main__":
    main()
