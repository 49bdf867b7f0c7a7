"""The centroid selector's decode launcher: group scores (centroid_scores.py), for rows past the
shortlist first the coarse stage over runs (shortlist_scores.py), the selection of the budget's
groups (selection.combine_select, or inside the attention for few rows and for rows attending in
one split: select_attend.py) and split-K attention over the chosen pages;
centroid_reference.centroid_select_pages is the rule every path follows. Each stage's tuning is
chosen here from the shapes, once per launch."""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.centroid_reference import CentroidShortlist, shortlist_run_counts
from kernels.reference import default_scale, sparse_page_counts
from kernels.triton.centroid_scores import centroid_group_logits, score_tuning
from kernels.triton.decode import check_kv, default_num_splits, num_sms, paged_decode, split_k_decode
from kernels.triton.select_attend import select_attend, select_then_attend
from kernels.triton.selection import combine_select
from kernels.triton.shortlist_scores import shortlisted_group_logits
from kernels.triton.top_k import prefers_top_k


class HeadBudgets(NamedTuple):
    """A budget per KV head for one layer: groups int32 [kv_heads] on the device (each within the
    launcher's budget_tokens, which is then the layer's largest head's), and the fewest of them,
    known on the host (a table no row can outgrow at that count decodes densely)."""
    groups: torch.Tensor
    fewest: int


def selection_warps(rows: int, groups: int, sort: str | None, device: torch.device) -> int | None:
    """combine_select's warps a row (H200, bench/centroid_stages.py, us of the selection): with the
    top-k, 4 for rows of up to 512 groups (b2-b16: 4.2-4.5 against 4.7-5.0 with 8; b64: 7.9
    against 8.3 with 2), wider rows 2 from two waves of rows (b64 x 1024 groups: 13.9 against 17.3
    with 4: the row's group pages held in registers from the start cost occupancy) and 8 below
    (b16 x 1024: 6.1 against 7.4 with 4); the radix search's default otherwise. Selection by rank
    over many programs (each group's rank against its whole row, kept for few rows before the
    top-k came) lost to this at every batch: b2 7.0 against 4.2, b16 28.7 against 4.4 (512 groups)."""
    if sort and groups <= 128:      # the shortlist's groups, runs at 32k (b16: 3.0-3.3 us against 3.1-3.5 with
        return 1 if rows >= 2 * num_sms(device) else 2      # 4 warps; b64: 3.4-3.9 against 5.5-6.2)
    if sort and groups <= 512:
        return 4
    if rows >= 2 * num_sms(device):
        return 2
    return 8 if sort else None


def attend_tuning(rows: int, budget_tokens: int, device: torch.device) -> dict:
    """split_k_decode's tuning over the chosen pages, by how the rows (sequence, KV head) fill the
    SMs (H200, budget 2048, bench/centroid_stages.py --tune, against the dense decode's rule of ~2
    programs an SM in 64-key blocks, at least 2 a split):
    - up to a quarter wave of rows (b1: 8, b4: 32): 128-key blocks, 8 warps, about two programs an
      SM (b1: 16 splits, one block each, 9.2 us against 12.4; b4: 8 splits, 15.7 against 17.6);
    - about a wave of rows (b16: 128): one split, 128-key blocks, 8 warps, 5 stages: 38.9 against
      42.6;
    - otherwise the dense rule (b64: 130.4 against 134.8 for one split of 128-key blocks);
    each with splits over the table's capacity (fixed_splits: 8.8, 37.6 and 129.3 us at b1, b16 and
    b64)."""
    sms = num_sms(device)
    if rows <= sms // 4:
        tuning = dict(num_splits=max(1, min(2 * sms // rows, budget_tokens // 128, 64)), block_n=128, num_warps=8)
    elif sms // 2 <= rows <= sms:
        tuning = dict(num_splits=1, block_n=128, num_warps=8, num_stages=5)
    else:
        tuning = dict(num_splits=default_num_splits(rows, 1, budget_tokens, device, min_blocks=2))
    # every row's chosen pages nearly fill the table: splits over its capacity (split_k_decode)
    return dict(tuning, fixed_splits=True)


def selects_before_attending(groups: int) -> bool:
    """Whether a row that attends in one split selects its groups in the attention program
    (select_then_attend) rather than in a launch of its own: for rows of up to 512 groups, where
    it was measured (H200, the launcher, select_then_attend on / off: b64 x 32k 181.0 / 183.4 us
    coarse to fine and 215.3 / 219.5 in one stage; b16 x 32k 61.6 / 62.0 and 66.3 / 66.4).
    Wider rows (past 32k tokens in one stage) keep the selection launch."""
    return groups <= 512


def fuses_run_selection(rows: int, runs: int, device: torch.device) -> bool:
    """Whether the fine scorer recomputes the run selection (shortlist_scores) rather than a
    combine_select launch writing the compact tables first: for up to a wave of rows of at most
    128 runs (H200, the two stages: b16 x 32k 11.4 us against 13.4, b1 x 32k 4.8 against 6.3).
    Many rows make the recomputation the cost (b64 38.7 against 29.3), and so do wide rows (b1 x
    128k, 512 runs a row: 8.4 against 7.6)."""
    return rows <= num_sms(device) and runs <= 128


def fused_tile(rows: int, device: torch.device) -> dict:
    """shortlisted_group_logits's tile (H200, 128 shortlisted groups a row): 8 groups a program,
    one warp, from half a wave of rows (b16: 11.4 us, the 2D tile 11.7), 4 below (b1: 4.8 against
    5.8)."""
    return {} if rows >= num_sms(device) // 2 else dict(block_n=4)


def centroid_shortlist_scores(q: torch.Tensor, shortlist: CentroidShortlist, cents: torch.Tensor,
                              stats: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                              group_pages: int, scale: float, counts: tuple[int, int, int], rows: int,
                              interpreted: bool = False, fuse: bool | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse to fine up to the group scores (centroid_reference.centroid_shortlist, then
    centroid_group_logits over each KV head's shortlist): every run scored from its centroids
    (centroid_group_logits over runs of shortlist.run_pages), each KV head's best runs kept
    (shortlist_run_counts) and their groups scored: in one launch (shortlist_scores) or as
    combine_select writing the compact tables and the scorer reading them (fuses_run_selection) ->
    (group logits [batch, q_heads, shortlisted groups], compact tables int32 [batch, kv_heads,
    runs * run_pages], the shortlists' lengths int32 [batch]). The fine selection reads the tables
    as each KV head's own sequence. counts: shortlist_run_counts's (kept, sink, recent) runs; fuse:
    the choice made (default: fuses_run_selection's)."""
    run_pages = shortlist.run_pages
    if page_tables.shape[1] % run_pages:    # whole runs: the last one's missing pages are never attended
        page_tables = torch.nn.functional.pad(page_tables, (0, run_pages - page_tables.shape[1] % run_pages))
    runs = page_tables.shape[1] // run_pages
    run_logits = centroid_group_logits(q, shortlist.cents, shortlist.stats, page_tables, seq_lens, page_size,
                                       run_pages, scale, interpreted=interpreted, **score_tuning(rows, q.device, runs))
    sort = "topk" if prefers_top_k(runs, counts[0]) else None
    if fuses_run_selection(rows, runs, q.device) if fuse is None else fuse:
        return shortlisted_group_logits(q, run_logits, cents, stats, page_tables, seq_lens, page_size, group_pages,
                                        run_pages, counts, scale, sort=sort, interpreted=interpreted,
                                        **fused_tile(rows, q.device))
    _, compact, short_lens = combine_select(run_logits, page_tables, seq_lens, page_size * run_pages, cents.shape[1],
                                            counts, scale, counts[0], expand=run_pages, sort=sort,
                                            num_warps=selection_warps(rows, runs, sort, q.device))
    logits = centroid_group_logits(q, cents, stats, compact, short_lens, page_size, group_pages, scale,
                                   interpreted=interpreted,
                                   **score_tuning(rows, q.device, counts[0] * run_pages // group_pages))
    return logits, compact, short_lens


def centroid_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cents: torch.Tensor,
                           stats: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor,
                           budget_tokens: int, sink_tokens: int, recent_tokens: int, group_pages: int,
                           scale: float | None = None, interpreted: bool = False,
                           planned_batch: int | None = None, out: torch.Tensor | None = None,
                           shortlist: CentroidShortlist | None = None, fuse_runs: bool | None = None,
                           select_first: bool | None = None, head_budgets: HeadBudgets | None = None,
                           **tuning) -> torch.Tensor:
    """Batched centroid_reference.centroid_select_pages + attend_pages: the group scores
    (centroid_group_logits), combine_select keeping the budget's groups (sink and recent forced,
    counted in groups as reference.sparse_page_counts counts pages) and writing their pages'
    physical ids, then split-K attention over them. q [batch, q_heads, d]; caches [num_pages,
    page_size, kv_heads, d]; cents, stats as centroid_group_logits takes them; page_tables int32
    [batch, width] -> out [batch, q_heads, d] (written and returned). Static-shaped and sync-free
    (CUDA-graph safe); when no row can exceed the budget this is paged_decode. tuning:
    split_k_decode's, over attend_tuning's defaults. Chosen from the shapes: the scorer's tile
    (score_tuning), and for up to an eighth of a wave of rows the selection inside the attention
    (select_attend; tuning then unused), for rows that attend in one split the selection at the
    start of each row's attention program (select_then_attend), else a selection launch
    (selection_warps); planned_batch
    (default: q's) is the batch they are chosen for (the engine's graph bucket, so that a row is
    served alike replayed or eager). shortlist: coarse to fine (centroid_reference.centroid_select_pages):
    rows longer than the shortlist choose among their shortlisted runs' groups only
    (centroid_shortlist_scores), each KV head's compact table standing in for the sequence's.
    fuse_runs, select_first: force the run selection inside the fine scorer (fuses_run_selection)
    and, for rows attending in one split, the selection inside the attention
    (selects_before_attending) on or off, for benches that compare them (the same output).
    head_budgets: each KV head keeps its own count of groups (centroid_select_pages(head_budgets=...));
    budget_tokens is then the largest, which sizes the shortlist, the tables and the splits."""
    check_kv(q, k_cache, v_cache)
    page_size, kv_heads = k_cache.shape[1:3]
    span = page_size * group_pages
    force = sparse_page_counts(span, budget_tokens, sink_tokens, recent_tokens)
    groups_each = None if head_budgets is None else head_budgets.groups
    assert groups_each is None or (groups_each.shape == (kv_heads,) and groups_each.dtype == torch.int32
                                   and force[1] + force[2] < head_budgets.fewest <= force[0])
    width = page_tables.shape[1]
    if -(-width // group_pages) <= (force[0] if head_budgets is None else head_budgets.fewest):
        return paged_decode(q, k_cache, v_cache, page_tables, seq_lens, scale, out=out, **tuning)
    if width % group_pages:         # whole groups: the last one's missing pages are never attended
        page_tables = torch.nn.functional.pad(page_tables, (0, group_pages - width % group_pages))
    scale = default_scale(q.shape[2]) if scale is None else scale
    rows = (planned_batch or q.shape[0]) * kv_heads
    counts = None if shortlist is None else shortlist_run_counts(
        page_size, group_pages, shortlist.run_pages, shortlist.shortlist_tokens, budget_tokens, sink_tokens,
        recent_tokens)
    if counts is not None and -(-width // shortlist.run_pages) > counts[0]:
        # (a table within the shortlist is every row's own shortlist: the same selection without it)
        logits, page_tables, seq_lens = centroid_shortlist_scores(q, shortlist, cents, stats, page_tables, seq_lens,
                                                                  page_size, group_pages, scale, counts, rows,
                                                                  interpreted, fuse_runs)
    else:
        logits = centroid_group_logits(q, cents, stats, page_tables, seq_lens, page_size, group_pages, scale,
                                       interpreted=interpreted,
                                       **score_tuning(rows, q.device, page_tables.shape[-1] // group_pages))
    groups = logits.shape[2]
    # the k-th score from a bitonic top-k of the budget instead of the 32-step radix search where
    # that is faster (top_k.prefers_top_k; H200, 1024 groups: combine_select b64 13.9 us
    # against 14.4, select_attend b1 13.4 against 14.6; 2048 groups, select_attend 16.3 against
    # 17.2; 4096 groups 24.3 against 21.8)
    sort = "topk" if prefers_top_k(groups, force[0]) else None
    split_groups = max(1, 128 // span)
    # with head_budgets each head's own count comes from them, and select_attend's launch only
    # needs whole splits covering the largest (its last split, like a smaller head's, part empty)
    whole = force if head_budgets is None else (-(-force[0] // split_groups) * split_groups, *force[1:])
    if rows <= num_sms(q.device) // 8 and whole[0] % split_groups == 0:
        # few rows: the selection inside each attention program, one launch fewer and no pages
        # written out and read back (select_attend; 128-key splits as attend_tuning's for few
        # rows; 4 warps for rows of up to 512 groups: H200 b1 x 32k 11.9 us against 12.6 with 8)
        return select_attend(q, k_cache, v_cache, logits, page_tables, seq_lens, span, whole, scale,
                             split_groups=split_groups, out=out, sort=sort, num_warps=4 if groups <= 512 else 8,
                             head_budgets=groups_each)
    tuning = {**attend_tuning(rows, force[0] * span, q.device), **tuning}
    if tuning["num_splits"] == 1 and (selects_before_attending(groups) if select_first is None else select_first):
        # about a wave of rows attending in one split each: the selection at the start of each
        # row's attention program (select_then_attend), one launch fewer
        return select_then_attend(q, k_cache, v_cache, logits, page_tables, seq_lens, span, force, scale, out=out,
                                  sort=sort, head_budgets=groups_each,
                                  **{name: value for name, value in tuning.items()
                                     if name in ("block_n", "num_warps", "num_stages")})
    _, physical, vlens = combine_select(logits, page_tables, seq_lens, span, kv_heads, force, scale, force[0],
                                        expand=group_pages, num_warps=selection_warps(rows, groups, sort, q.device),
                                        sort=sort, head_budgets=groups_each)
    return split_k_decode(q, k_cache, v_cache, physical, vlens, scale, out=out, **tuning)
