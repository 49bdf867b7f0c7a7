"""The centroid selector for the torch and CPU attention backends (sparse_attention.selector:
centroids), kernels/reference.py's centroid_select_pages batched.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from backends.base import SparseSettings, sparse_unit_counts
from backends.cuda.attention.sparse_rows import RowSplit, attend_pages, counted_all_dense, merge_dense_rows, split_rows
from kernels import reference as ref

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


def completed_groups(chunks: list[tuple[int, int, list[int]]], page_size: int, group_pages: int) -> list[list[int]]:
    """The page ids of every group whose last token a step writes: chunks are (tokens cached before
    the step, new tokens, page table) per sequence."""
    span = page_size * group_pages
    return [table[g * group_pages:(g + 1) * group_pages]
            for start, count, table in chunks for g in range(start // span, (start + count) // span)]


@torch.inference_mode()
def write_group_summaries(cache: PagedKVCache, groups: list[list[int]]) -> None:
    """k-means of each group's keys per layer and KV head (reference.kmeans_keys), stored at the
    group's last page in every layer at once. groups: page ids [G][group_pages]."""
    if not groups:
        return
    assert cache.cents is not None and all(len(g) == cache.group_pages for g in groups)
    pages = torch.tensor(groups, dtype=torch.long)                                      # [G, gp]
    if cache.k.device.type == "cuda":   # queued behind the step, no wait for it (the runner overlaps steps)
        pages = pages.pin_memory().to(cache.k.device, non_blocking=True)
    layers, _, page_size, kv_heads, head_dim = cache.k.shape
    span = page_size * cache.group_pages
    keys = cache.k.index_select(1, pages.flatten()).float()                            # [L, G*gp, page, kvh, d]
    keys = keys.view(layers, len(groups), span, kv_heads, head_dim).transpose(2, 3)      # [L, G, kvh, span, d]
    written = torch.ones(keys.shape[:4], dtype=torch.bool, device=keys.device)
    centroids, counts, spread = ref.kmeans_keys(keys, written, cache.cents.shape[3], KMEANS_STEPS)
    last = pages[:, -1]
    # 8-bit floats stored as their bytes: indexing kernels cover uint8 on every device
    cache.cents.view(torch.uint8)[:, last] = centroids.to(cache.cents.dtype).view(torch.uint8)
    cache.cstats[:, last] = torch.stack((counts.log(), spread), dim=-1)


@dataclass
class CentroidPlan:
    """Per-forward layout of the decode rows for the centroid selector, shared by every sparse layer
    (the attributes sparse_rows.attend_pages reads are named as in QuestPlan)."""

    group_pages: int
    budget_groups: int
    rows: RowSplit
    sparse_pages: torch.Tensor      # [Bs, G * group_pages] page tables, padded to whole groups
    sparse_lengths: torch.Tensor    # [Bs, 1, 1]
    last_pages: torch.Tensor        # [Bs, G] physical id of each group's last page
    scored: torch.Tensor            # [Bs, 1, 1, G] groups with a summary (complete before the row's token)
    bias: torch.Tensor              # [Bs, 1, G] +inf forced (sink, recent), -inf past the sequence, else 0
    virtual_lengths: torch.Tensor   # [Bs] tokens of the chosen groups, the last one's only up to the end
    pages_read: int
    pages_skipped: int

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


def make_plan(meta: AttentionMetadata, page_size: int, kv_heads: int) -> CentroidPlan:
    group_pages, budget, sink, recent = group_counts(meta.sparse, page_size)
    device = meta.decode_pages.device
    lengths = meta.decode_lengths
    rows = split_rows(meta, page_size, kv_heads, budget * group_pages)
    read, skipped = count_group_pages(lengths.tolist(), page_size, group_pages, budget)
    span = page_size * group_pages
    sparse_lengths = lengths[rows.sparse_rows]
    width = rows.sparse_pages.shape[1]
    groups = -(-width // group_pages)
    pages = torch.nn.functional.pad(rows.sparse_pages, (0, groups * group_pages - width))
    logical = torch.arange(groups, device=device).unsqueeze(0)                   # [1, G]
    n_groups = ((sparse_lengths + span - 1) // span).unsqueeze(1)                # [Bs, 1]
    forced = (logical < sink) | ((logical >= n_groups - recent) & (logical < n_groups))
    bias = torch.zeros(pages.shape[0], groups, dtype=torch.float32, device=device)
    bias = bias.masked_fill(logical >= n_groups, float("-inf")).masked_fill(forced, float("inf"))
    scored = logical < ((sparse_lengths - 1) // span).unsqueeze(1)               # summaries written
    dropped = (n_groups.squeeze(1) - budget).clamp(min=0) * span
    return CentroidPlan(
        group_pages=group_pages, budget_groups=budget, rows=rows, sparse_pages=pages,
        sparse_lengths=sparse_lengths.view(-1, 1, 1), last_pages=pages[:, group_pages - 1::group_pages],
        scored=scored.view(-1, 1, 1, groups), bias=bias.unsqueeze(1),
        virtual_lengths=(sparse_lengths - dropped).int(), pages_read=read * kv_heads,
        pages_skipped=skipped * kv_heads)


def group_scores(q: torch.Tensor, cents_layer: torch.Tensor, cstats_layer: torch.Tensor, plan: CentroidPlan,
                 scale: float) -> torch.Tensor:
    """reference.centroid_group_scores batched: q [Bs, H, d] -> [Bs, kv_heads, G] float32 (-inf for
    groups without a summary)."""
    batch, heads, head_dim = q.shape
    groups = plan.last_pages.shape[1]
    kv_heads, clusters = cents_layer.shape[1:3]
    flat = plan.last_pages.flatten()
    c = cents_layer.view(torch.uint8).index_select(0, flat).view(cents_layer.dtype).float()
    c = c.view(batch, groups, kv_heads, clusters, head_dim)
    st = cstats_layer.index_select(0, flat).view(batch, groups, kv_heads, clusters, 2).permute(0, 2, 1, 3, 4)
    qg = (q.float() * scale).view(batch, kv_heads, heads // kv_heads, head_dim)       # [Bs, kvh, g, d]
    logits = torch.einsum("bhgd,bnhcd->bhgnc", qg, c) + st[..., 0].unsqueeze(2) \
        + 0.5 * (qg * qg).sum(-1)[..., None, None] * st[..., 1].unsqueeze(2)         # [Bs, kvh, g, G, C]
    mass = logits.logsumexp(dim=-1).masked_fill(~plan.scored, float("-inf"))        # [Bs, kvh, g, G]
    return (mass - mass.logsumexp(dim=-1, keepdim=True)).amax(dim=2)


def choose_pages(q: torch.Tensor, cents_layer: torch.Tensor, cstats_layer: torch.Tensor, plan: CentroidPlan,
                 scale: float) -> torch.Tensor:
    """Logical pages of the chosen groups per row and KV head, ascending -> [Bs, kv_heads,
    budget_groups * group_pages] (the last group's pages past the sequence included: attention
    masks or stops before them)."""
    scores = group_scores(q, cents_layer, cstats_layer, plan, scale) + plan.bias
    groups = scores.topk(plan.budget_groups, dim=-1, sorted=False).indices.sort(dim=-1).values
    offsets = torch.arange(plan.group_pages, device=q.device)
    return (groups.unsqueeze(-1) * plan.group_pages + offsets).flatten(2)


def attend_fused(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, chosen: torch.Tensor,
                 plan: CentroidPlan, scale: float) -> torch.Tensor:
    """The CPU kernel over each KV head's chosen pages: the chosen groups are ascending and the last
    is the sequence's own last group, so each head attends the first virtual_lengths tokens."""
    batch, kv_heads, _ = chosen.shape
    page_size = k_layer.shape[1]
    physical = plan.sparse_pages.gather(1, chosen.flatten(1)).view_as(chosen)    # [Bs, kvh, k]
    lengths = plan.virtual_lengths.long().view(batch, 1).expand(batch, kv_heads).contiguous()
    return torch.ops.radixgate_cpu.paged_decode_attention(
        q, k_layer.view(-1, *k_layer.shape[2:]), v_layer.view(-1, *v_layer.shape[2:]),
        physical.contiguous(), lengths, page_size, scale)


def get_plan(cache: PagedKVCache, meta: AttentionMetadata) -> CentroidPlan:
    plan = getattr(meta, PLAN_ATTRIBUTE, None)
    if plan is None:
        assert cache.cents is not None, "the centroid selector needs centroid summaries in the cache"
        plan = make_plan(meta, cache.page_size, cache.k.shape[3])
        assert plan.group_pages == cache.group_pages, "the cache was built for another group size"
        setattr(meta, PLAN_ATTRIBUTE, plan)
    return plan


def centroid_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                              scale: float, dense_decode, fused: bool = False) -> torch.Tensor:
    """Decode attention of B single-token queries [B, H, d] for one sparse-eligible layer, as
    sparse.sparse_decode_attention but choosing whole groups by their centroids."""
    plan = get_plan(cache, meta)
    if counted_all_dense(plan, meta):
        return dense_decode(q, cache, layer, meta, scale)
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    q_sparse = q[plan.sparse_rows]
    chosen = choose_pages(q_sparse, cache.cents[layer], cache.cstats[layer], plan, scale)
    attend = attend_fused if fused else attend_pages
    sparse_out = attend(q_sparse, k_layer, v_layer, chosen, plan, scale)
    return merge_dense_rows(q, sparse_out, cache, layer, meta, plan.rows, scale, fused)
