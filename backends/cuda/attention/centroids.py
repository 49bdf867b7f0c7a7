"""The centroid selector for the torch and CPU attention backends (sparse_attention.selector:
centroids), kernels/centroid_reference.py's centroid_select_pages batched.

Each complete run of group_pages pages (a group of group_tokens keys) per KV head is summarised by C
k-means centroids in 8 bits with a log count and a spread each, kept at the physical id of the
group's last page (backends/cuda/kv_cache.py). The summaries of the groups a step completes are
written after the step's forward, for every layer at once (write_group_summaries), so that a CUDA
graph never runs a data-dependent k-means; a decode therefore scores only the groups complete
before its own token, and the group holding that token is attended as the recent group.

Per decode row past the budget: each q head's estimated log-mass of every summarised group,
a log-softmax over them, the max over the GQA group; sink, recent and the best groups fill the
budget; attention reads the chosen groups' pages straight from the cache (sparse_rows.attend_pages, or
the CPU kernel over each head's page list).

Coarse to fine (shortlist_tokens > 0): runs of run_tokens keep their own centroids (at each
complete run's last page, written like the groups'); a row longer than the shortlist first scores
its runs the same way and keeps each KV head's best shortlist_tokens worth of them, and the groups
are then scored and chosen among those runs only (centroid_reference.centroid_select_pages(shortlist=...)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from backends.base import SparseSettings, sparse_unit_counts
from backends.cuda.attention.sparse_rows import RowSplit, attend_pages, merge_dense_rows, split_rows
from backends.head_budgets import HeadGroups, head_groups
from kernels import centroid_reference as cref

if TYPE_CHECKING:
    from backends.cuda.attention.torch_metadata import AttentionMetadata
    from backends.cuda.kv_cache import PagedKVCache

PLAN_ATTRIBUTE = "_centroid_plan"
KMEANS_STEPS = 8           # Lloyd steps after the farthest-point start (what bench/sparse_estimators.py measured)


def group_counts(sparse: SparseSettings, page_size: int) -> tuple[int, int, int, int]:
    """(group_pages, budget_groups, sink_groups, recent_groups): token counts rounded to groups as
    kernels/reference.sparse_page_counts rounds them to pages. Raises ValueError naming the setting."""
    if sparse.group_tokens < page_size or sparse.group_tokens % page_size:
        raise ValueError(f"sparse_attention.group_tokens {sparse.group_tokens} must be a multiple of "
                         f"kv_cache.page_size {page_size}")
    if sparse.centroids < 1 or sparse.centroids > 64 or sparse.centroids & (sparse.centroids - 1):
        raise ValueError(f"sparse_attention.centroids {sparse.centroids} must be a power of two from 1 to 64")
    span = sparse.group_tokens
    budget, sink, recent = sparse_unit_counts(span, sparse.token_budget, sparse.sink_tokens, sparse.recent_tokens)
    if budget <= sink + recent:
        raise ValueError(f"sparse_attention.token_budget {sparse.token_budget} is {budget} groups of {span} "
                         f"tokens; it must exceed the sink ({sink}) + recent ({recent}) groups")
    return span // page_size, budget, sink, recent


def shortlist_counts(sparse: SparseSettings, page_size: int) -> tuple[int, int, int, int] | None:
    """(run_pages, runs kept, sink runs, recent runs) of the coarse stage (centroid_reference.shortlist_run_counts),
    or None when shortlist_tokens is 0. Raises ValueError naming the setting."""
    if sparse.shortlist_tokens <= 0:
        return None
    group_pages = group_counts(sparse, page_size)[0]
    run_pages = sparse.run_tokens // page_size
    if sparse.run_tokens % sparse.group_tokens or run_pages & (run_pages - 1):
        raise ValueError(f"sparse_attention.run_tokens {sparse.run_tokens} must be a multiple of group_tokens "
                         f"{sparse.group_tokens} and a power-of-two number of kv_cache.page_size {page_size} pages")
    return (run_pages, *cref.shortlist_run_counts(page_size, group_pages, run_pages, sparse.shortlist_tokens,
                                                  sparse.token_budget, sparse.sink_tokens, sparse.recent_tokens))


def completed_groups(chunks: list[tuple[int, int, list[int]]], page_size: int, group_pages: int) -> list[list[int]]:
    """The page ids of every group whose last token a step writes: chunks are (tokens cached before
    the step, new tokens, page table) per sequence."""
    span = page_size * group_pages
    return [table[g * group_pages:(g + 1) * group_pages]
            for start, count, table in chunks for g in range(start // span, (start + count) // span)]


@torch.inference_mode()
def write_group_summaries(cache: PagedKVCache, groups: list[list[int]], runs: bool = False) -> None:
    """k-means of each group's keys per layer and KV head (centroid_reference.kmeans_keys), stored at the
    group's last page in every layer at once. groups: page ids [G][group_pages]; runs: they are the
    coarse stage's runs [R][run_pages], summarised into run_cents and run_cstats."""
    if not groups:
        return
    cents, cstats, pages_each = ((cache.run_cents, cache.run_cstats, cache.run_pages) if runs
                                 else (cache.cents, cache.cstats, cache.group_pages))
    assert cents is not None and all(len(g) == pages_each for g in groups)
    pages = torch.tensor(groups, dtype=torch.long)                                      # [G, gp]
    if cache.k.device.type == "cuda":   # queued behind the step, no wait for it (the runner overlaps steps)
        pages = pages.pin_memory().to(cache.k.device, non_blocking=True)
    layers, _, page_size, kv_heads, head_dim = cache.k.shape
    span = page_size * pages_each
    keys = cache.k.index_select(1, pages.flatten()).float()                            # [L, G*gp, page, kvh, d]
    keys = keys.view(layers, len(groups), span, kv_heads, head_dim).transpose(2, 3)      # [L, G, kvh, span, d]
    written = torch.ones(keys.shape[:4], dtype=torch.bool, device=keys.device)
    centroids, counts, spread = cref.kmeans_keys(keys, written, cents.shape[3], KMEANS_STEPS)
    last = pages[:, -1]
    # 8-bit floats stored as their bytes: indexing kernels cover uint8 on every device
    cents.view(torch.uint8)[:, last] = centroids.to(cents.dtype).view(torch.uint8)
    cstats[:, last] = torch.stack((counts.log(), spread), dim=-1)


@dataclass
class ShortlistPlan:
    """The coarse stage's per-forward layout of the sparse rows (every layer's)."""

    run_pages: int
    keep: int                       # runs kept per row and KV head
    run_last: torch.Tensor          # [Bs, R] physical id of each run's last page
    run_scored: torch.Tensor        # [Bs, 1, 1, R] runs with a summary (complete before the row's token)
    run_bias: torch.Tensor          # [Bs, 1, R] +inf forced (sink, recent runs), -inf past the sequence
    scored: torch.Tensor            # [Bs, 1, 1, keep * groups a run] shortlisted groups with a summary
    bias: torch.Tensor              # [Bs, 1, keep * groups a run] the fine stage's, over the shortlist


@dataclass
class LayerBudgets:
    """One sparse layer's counts under a budget per KV head (backends/head_budgets.py)."""

    keep: int                       # groups chosen per row: the layer's largest head's, at most the row's units
    groups: torch.Tensor            # [1, kv_heads, 1] each head's own count
    virtual_lengths: torch.Tensor   # [Bs, kv_heads] tokens each head reads of its chosen groups
    pages_read: int
    pages_skipped: int


@dataclass
class CentroidPlan:
    """Per-forward layout of the decode rows for the centroid selector, shared by every sparse layer
    (the attributes sparse_rows.attend_pages reads are named as in QuestPlan). With a budget per
    KV head (heads), each layer's counts are LayerBudgets, made on first use (layer_budgets)."""

    group_pages: int
    budget_groups: int
    rows: RowSplit
    sparse_pages: torch.Tensor      # [Bs, G * group_pages] page tables, padded to whole groups (runs)
    sparse_lengths: torch.Tensor    # [Bs, 1, 1]
    last_pages: torch.Tensor        # [Bs, G] physical id of each group's last page
    scored: torch.Tensor            # [Bs, 1, 1, G] groups with a summary (complete before the row's token)
    bias: torch.Tensor              # [Bs, 1, G] +inf forced (sink, recent), -inf past the sequence, else 0
    virtual_lengths: torch.Tensor   # [Bs] tokens of the chosen groups, the last one's only up to the end
    pages_read: int
    pages_skipped: int
    shortlist: ShortlistPlan | None = None      # coarse to fine (some row is longer than the shortlist)
    heads: HeadGroups | None = None             # a budget per (layer, KV head)
    shortlisted: torch.Tensor | None = None     # [Bs] tokens each sparse row's selection is over
    lengths: list[int] | None = None            # every decode row's tokens (the page accounting's)
    by_layer: dict[int, LayerBudgets] | None = None

    def layer_budgets(self, layer: int, page_size: int) -> LayerBudgets:
        """The layer's counts under the table: each head keeps its own groups of the selection's
        units (its whole row when its budget covers it), reads their tokens, and the page
        accounting sums each head's reads over every decode row."""
        assert self.heads is not None and self.by_layer is not None
        if layer not in self.by_layer:
            counts = self.heads.per_layer[layer]
            span = page_size * self.group_pages
            units = (self.shortlist.keep * self.shortlist.run_pages if self.shortlist is not None
                     else self.sparse_pages.shape[1]) // self.group_pages
            groups = torch.tensor(counts, device=self.shortlisted.device).view(1, -1, 1)
            n_units = (self.shortlisted + span - 1) // span
            dropped = (n_units.view(-1, 1) - groups.view(1, -1)).clamp(min=0) * span
            read = skipped = 0
            for count in counts:
                r, k = count_group_pages(self.lengths, page_size, self.group_pages, count)
                read, skipped = read + r, skipped + k
            self.by_layer[layer] = LayerBudgets(
                keep=min(max(counts), units), groups=groups, pages_read=read, pages_skipped=skipped,
                virtual_lengths=(self.shortlisted.view(-1, 1) - dropped).int())
        return self.by_layer[layer]

    @property
    def all_dense(self) -> bool:
        return len(self.rows.sparse_rows) == 0

    @property
    def sparse_rows(self) -> torch.Tensor:
        return self.rows.sparse_rows

    @property
    def slot(self) -> torch.Tensor:
        return self.rows.slot

    @property
    def slot_head(self) -> torch.Tensor:
        return self.rows.slot_head


def count_group_pages(seq_lens: list[int], page_size: int, group_pages: int, budget_groups: int) -> tuple[int, int]:
    """(pages read, pages skipped) of one sparse layer and KV head: a row past the budget skips its
    unchosen groups' pages (the chosen last group may be partial), one within it reads them all."""
    read = skipped = 0
    for length in seq_lens:
        pages = -(-length // page_size)
        dropped = max(0, -(-pages // group_pages) - budget_groups) * group_pages
        read += pages - dropped
        skipped += dropped
    return read, skipped


def unit_layout(lengths: torch.Tensor, units: int, span: int, sink: int, recent: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored [Bs, 1, 1, units], bias [Bs, 1, units]) of rows of `lengths` tokens cut into units
    (groups or runs) of span tokens: a unit has a summary when it is complete before the row's
    last token; the bias is +inf for the forced sink and recent units, -inf past the row."""
    logical = torch.arange(units, device=lengths.device).unsqueeze(0)           # [1, U]
    n_units = ((lengths + span - 1) // span).unsqueeze(1)                       # [Bs, 1]
    forced = (logical < sink) | ((logical >= n_units - recent) & (logical < n_units))
    bias = torch.zeros(len(lengths), units, dtype=torch.float32, device=lengths.device)
    bias = bias.masked_fill(logical >= n_units, float("-inf")).masked_fill(forced, float("inf"))
    scored = logical < ((lengths - 1) // span).unsqueeze(1)                     # summaries written
    return scored.view(-1, 1, 1, units), bias.unsqueeze(1)


def make_plan(meta: AttentionMetadata, page_size: int, kv_heads: int, heads: HeadGroups | None = None
              ) -> CentroidPlan:
    """heads: a budget per (layer, KV head): rows past the fewest anywhere are sparse (a head whose
    budget covers such a row keeps all of it), and each layer's counts follow on first use."""
    group_pages, budget, sink, recent = group_counts(meta.sparse, page_size)
    lengths = meta.decode_lengths
    rows = split_rows(meta, page_size, kv_heads, (budget if heads is None else heads.fewest) * group_pages)
    read, skipped = count_group_pages(lengths.tolist(), page_size, group_pages, budget)
    span = page_size * group_pages
    sparse_lengths = lengths[rows.sparse_rows]
    width = rows.sparse_pages.shape[1]
    coarse = shortlist_counts(meta.sparse, page_size)
    if coarse is not None and -(-width // coarse[0]) <= coarse[1]:
        coarse = None           # every row within the shortlist: its own shortlist, the same choice
    whole = coarse[0] if coarse is not None else group_pages
    pages = torch.nn.functional.pad(rows.sparse_pages, (0, -(-width // whole) * whole - width))
    groups = pages.shape[1] // group_pages
    scored, bias = unit_layout(sparse_lengths, groups, span, sink, recent)
    shortlist = None
    if coarse is not None:
        run_pages, keep, sink_runs, recent_runs = coarse
        run_span = page_size * run_pages
        run_scored, run_bias = unit_layout(sparse_lengths, pages.shape[1] // run_pages, run_span, sink_runs,
                                           recent_runs)
        short_lengths = sparse_lengths - (-(-sparse_lengths // run_span) - keep).clamp(min=0) * run_span
        short_scored, short_bias = unit_layout(short_lengths, keep * run_pages // group_pages, span, sink, recent)
        shortlist = ShortlistPlan(run_pages=run_pages, keep=keep, run_last=pages[:, run_pages - 1::run_pages],
                                  run_scored=run_scored, run_bias=run_bias, scored=short_scored, bias=short_bias)
        sparse_shortlisted = short_lengths
    else:
        sparse_shortlisted = sparse_lengths
    dropped = (-(-sparse_shortlisted // span) - budget).clamp(min=0) * span
    return CentroidPlan(
        group_pages=group_pages, budget_groups=budget, rows=rows, sparse_pages=pages,
        sparse_lengths=sparse_lengths.view(-1, 1, 1), last_pages=pages[:, group_pages - 1::group_pages],
        scored=scored, bias=bias, virtual_lengths=(sparse_shortlisted - dropped).int(), pages_read=read * kv_heads,
        pages_skipped=skipped * kv_heads, shortlist=shortlist, heads=heads, shortlisted=sparse_shortlisted,
        lengths=lengths.tolist() if heads is not None else None, by_layer={} if heads is not None else None)


def group_scores(q: torch.Tensor, cents_layer: torch.Tensor, cstats_layer: torch.Tensor, last_pages: torch.Tensor,
                 scored: torch.Tensor, scale: float) -> torch.Tensor:
    """centroid_reference.centroid_group_scores batched: q [Bs, H, d], the units' last pages [Bs, G] (every
    KV head's) or [Bs, kv_heads, G] (each head's own, a shortlist), scored [Bs, 1, 1, G] -> [Bs,
    kv_heads, G] float32 (-inf for units without a summary): head_shares' max over the GQA group."""
    return head_shares(q, cents_layer, cstats_layer, last_pages, scored, scale).amax(dim=2)


def head_shares(q: torch.Tensor, cents_layer: torch.Tensor, cstats_layer: torch.Tensor, last_pages: torch.Tensor,
                scored: torch.Tensor, scale: float) -> torch.Tensor:
    """Each q head's estimated log share of its mass per unit (log-softmax over the row's units of
    the centroids' log-mass estimate) -> [Bs, kv_heads, group, G] float32; arguments as group_scores'."""
    batch, heads, head_dim = q.shape
    kv_heads, clusters = cents_layer.shape[1:3]
    if last_pages.dim() == 2:
        last_pages = last_pages.unsqueeze(1).expand(batch, kv_heads, last_pages.shape[1])
    units = last_pages.shape[2]
    # row page * kv_heads + head of the summaries viewed as [pages * kv_heads, C, ...]
    flat = (last_pages * kv_heads + torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1)).flatten()
    c = cents_layer.view(torch.uint8).reshape(-1, clusters, head_dim).index_select(0, flat)
    c = c.view(cents_layer.dtype).float().view(batch, kv_heads, units, clusters, head_dim)
    st = cstats_layer.reshape(-1, clusters, 2).index_select(0, flat).view(batch, kv_heads, units, clusters, 2)
    qg = (q.float() * scale).view(batch, kv_heads, heads // kv_heads, head_dim)       # [Bs, kvh, g, d]
    logits = torch.einsum("bhgd,bhncd->bhgnc", qg, c) + st[..., 0].unsqueeze(2) \
        + 0.5 * (qg * qg).sum(-1)[..., None, None] * st[..., 1].unsqueeze(2)         # [Bs, kvh, g, G, C]
    mass = logits.logsumexp(dim=-1).masked_fill(~scored, float("-inf"))             # [Bs, kvh, g, G]
    return mass - mass.logsumexp(dim=-1, keepdim=True)


def best_units(scores: torch.Tensor, keep: int, unit_pages: int, head_keep: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The best `keep` units per row and KV head, ascending, as their pages [Bs, kv_heads, keep *
    unit_pages] (indices into whatever the scores were over). head_keep [1, kv_heads, 1]: each head
    keeps only its own best head_keep (at most keep) first, ascending, the rest of its row padding
    (units past every real one, which the attention's virtual lengths never reach)."""
    if head_keep is None:
        units = scores.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    else:
        best = scores.topk(keep, dim=-1, sorted=True).indices                  # best first
        rank = torch.arange(keep, device=scores.device)
        units = best.masked_fill(rank >= head_keep, scores.shape[-1]).sort(dim=-1).values
        units = units.clamp(max=scores.shape[-1] - 1)           # padding: a real unit's pages, never attended
    return (units.unsqueeze(-1) * unit_pages + torch.arange(unit_pages, device=scores.device)).flatten(2)


def choose_pages(q: torch.Tensor, cache: PagedKVCache, layer: int, plan: CentroidPlan, scale: float) -> torch.Tensor:
    """Logical pages of the chosen groups per row and KV head, ascending -> [Bs, kv_heads,
    budget_groups * group_pages] (the last group's pages past the sequence included: attention
    masks or stops before them). With a shortlist, the groups are chosen among the best runs'
    (their pages in order, as one sequence: the fine stage's last pages per KV head)."""
    cents, cstats = cache.cents[layer], cache.cstats[layer]
    short = plan.shortlist
    keep, head_keep = plan.budget_groups, None
    if plan.heads is not None:
        counts = plan.layer_budgets(layer, cache.page_size)
        keep, head_keep = counts.keep, counts.groups
    if short is None:
        scores = group_scores(q, cents, cstats, plan.last_pages, plan.scored, scale) + plan.bias
        return best_units(scores, keep, plan.group_pages, head_keep)
    runs = group_scores(q, cache.run_cents[layer], cache.run_cstats[layer], short.run_last, short.run_scored, scale)
    logical = best_units(runs + short.run_bias, short.keep, short.run_pages)     # [Bs, kvh, keep * run_pages]
    physical = plan.sparse_pages.gather(1, logical.flatten(1)).view_as(logical)
    scores = group_scores(q, cents, cstats, physical[..., plan.group_pages - 1::plan.group_pages], short.scored,
                          scale) + short.bias
    return logical.gather(2, best_units(scores, keep, plan.group_pages, head_keep))


def head_lengths(plan: CentroidPlan, layer: int, batch: int, kv_heads: int, page_size: int) -> torch.Tensor:
    """Tokens each (sparse row, KV head) reads of its chosen groups [Bs, kv_heads]: the chosen groups
    are ascending and the last is the row's own last group, so each head reads the first ones."""
    if plan.heads is not None:
        return plan.layer_budgets(layer, page_size).virtual_lengths
    return plan.virtual_lengths.view(batch, 1).expand(batch, kv_heads)


def attend_chosen(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, chosen: torch.Tensor,
                  plan: CentroidPlan, scale: float, layer: int) -> torch.Tensor:
    """sparse_rows.attend_pages; with a budget per KV head each head reads its own first
    virtual lengths' tokens of its chosen groups (the rest of its row is padding)."""
    if plan.heads is None:
        return attend_pages(q, k_layer, v_layer, chosen, plan, scale)
    page_size = k_layer.shape[1]
    lengths = head_lengths(plan, layer, *chosen.shape[:2], page_size)
    return attend_pages(q, k_layer, v_layer, chosen, plan, scale, virtual_lengths=lengths)


def attend_fused(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, chosen: torch.Tensor,
                 plan: CentroidPlan, scale: float, layer: int) -> torch.Tensor:
    """The CPU kernel over each KV head's chosen pages, the first head_lengths tokens of each."""
    batch, kv_heads, _ = chosen.shape
    page_size = k_layer.shape[1]
    physical = plan.sparse_pages.gather(1, chosen.flatten(1)).view_as(chosen)    # [Bs, kvh, k]
    lengths = head_lengths(plan, layer, batch, kv_heads, page_size).long().contiguous()
    return torch.ops.radixgate_cpu.paged_decode_attention(
        q, k_layer.view(-1, *k_layer.shape[2:]), v_layer.view(-1, *v_layer.shape[2:]),
        physical.contiguous(), lengths, page_size, scale)


def get_plan(cache: PagedKVCache, meta: AttentionMetadata) -> CentroidPlan:
    plan = getattr(meta, PLAN_ATTRIBUTE, None)
    if plan is None:
        assert cache.cents is not None, "the centroid selector needs centroid summaries in the cache"
        layers, _, _, kv_heads, _ = cache.k.shape
        plan = make_plan(meta, cache.page_size, kv_heads, head_groups(meta.sparse, layers, kv_heads))
        assert plan.group_pages == cache.group_pages, "the cache was built for another group size"
        setattr(meta, PLAN_ATTRIBUTE, plan)
    return plan


def centroid_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                              scale: float, dense_decode, fused: bool = False) -> torch.Tensor:
    """Decode attention of B single-token queries [B, H, d] for one sparse-eligible layer, as
    sparse.sparse_decode_attention but choosing whole groups by their centroids."""
    plan = get_plan(cache, meta)
    counts = plan if plan.heads is None or plan.all_dense else plan.layer_budgets(layer, cache.page_size)
    meta.stats.pages_read += counts.pages_read
    meta.stats.pages_skipped += counts.pages_skipped
    if plan.all_dense:
        return dense_decode(q, cache, layer, meta, scale)
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    q_sparse = q[plan.sparse_rows]
    chosen = choose_pages(q_sparse, cache, layer, plan, scale)
    attend = attend_fused if fused else attend_chosen
    sparse_out = attend(q_sparse, k_layer, v_layer, chosen, plan, scale, layer)
    return merge_dense_rows(q, sparse_out, cache, layer, meta, plan.rows, scale, fused)
