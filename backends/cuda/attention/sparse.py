"""Quest sparse decode for the torch backend: attend only to the pages whose keys can matter.

For a decode row whose sequence spans more pages than the budget, every page gets Quest's upper
bound of q.k for each q head: the largest, over the page's written blocks of summary_tokens slots,
of sum over d of max(q_d * kmin_d, q_d * kmax_d) from the block's key min/max summary. Several
summaries per page bound the keys far more tightly than one (docs/sparse.md), while selection,
budget and reads stay whole pages. The bounds are combined over the q heads of a GQA group as
kernels/reference.py says: a log-softmax over the row's pages per head (at the attention scale),
then the max over the group, so a page that one head needs is kept even when another head's
bounds are larger. The sink
pages (first), the recent pages (last, counted back from the partial last page) and the best-scored
remaining pages fill `budget_pages`, per KV head and per sequence; attention then reads only those
pages, straight from the paged cache (indexed by page id and KV head; the sequence is never copied
into a contiguous buffer).

Coarse to fine (kernels/reference.py): when a row has more than reference.shortlist_pages(...)
pages, the page summaries (one min/max per page) score every page first and keep that many per KV
head (forced pages included); only the shortlist is scored by its block summaries, each head's
log-softmax taken over the shortlist, and the budget is chosen from it. That reads 1/blocks of
the block summaries for the whole sequence plus the shortlist's blocks, instead of every block.

Token counts round to pages as kernels/reference.py says: budget_pages = token_budget // page_size
(it includes the sink and recent pages), sink_pages = ceil(sink_tokens / page_size), recent_pages =
max(1, ceil(recent_tokens / page_size)). A row of at most budget_pages pages attends densely.

Stats (meta.stats, per eligible layer): a sparse row reads budget_pages * kv_heads pages and skips
(num_pages - budget_pages) * kv_heads; a row within the budget reads num_pages * kv_heads.

Everything that is the same for every layer (which rows are sparse, the forced pages, the stats) is
computed once per forward and kept on the metadata object as `meta._quest_plan`. What does not
depend on the selector (the row split, attention over the chosen pages, the dense rows) is in
attention/sparse_rows.py, shared with the centroid selector (attention/centroids.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from backends.base import SparseSettings, sparse_unit_counts
from backends.cuda.attention.sparse_rows import attend_pages, counted_all_dense, merge_dense_rows, split_rows
from kernels.reference import shortlist_pages

if TYPE_CHECKING:
    from backends.cuda.attention.torch_metadata import AttentionMetadata
    from backends.cuda.kv_cache import PagedKVCache

PLAN_ATTRIBUTE = "_quest_plan"


def page_counts(sparse: SparseSettings, page_size: int) -> tuple[int, int, int]:
    """(budget_pages, sink_pages, recent_pages), rounded as kernels/reference.py says.

    Raises ValueError (naming the setting) when the budget leaves no page to select.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    for name in ("token_budget", "recent_tokens"):
        if getattr(sparse, name) < 1:
            raise ValueError(f"sparse_attention.{name} must be at least 1, got {getattr(sparse, name)}")
    for name in ("sink_tokens", "dense_layers"):
        if getattr(sparse, name) < 0:
            raise ValueError(f"sparse_attention.{name} must be at least 0, got {getattr(sparse, name)}")
    budget_pages, sink_pages, recent_pages = sparse_unit_counts(page_size, sparse.token_budget, sparse.sink_tokens,
                                                                sparse.recent_tokens)
    if budget_pages <= sink_pages + recent_pages:
        raise ValueError(
            f"sparse_attention.token_budget {sparse.token_budget} is {budget_pages} pages of "
            f"{page_size} tokens; it must exceed the sink ({sink_pages}) + recent ({recent_pages}) "
            f"pages so that some pages are selected")
    return budget_pages, sink_pages, recent_pages


def summary_blocks(sparse: SparseSettings, page_size: int) -> int:
    """Summaries per page, page_size // summary_tokens. Raises ValueError (naming the setting)
    unless summary_tokens divides the page size."""
    tokens = sparse.summary_tokens
    if tokens < 1 or page_size % tokens:
        raise ValueError(f"sparse_attention.summary_tokens {tokens} must divide kv_cache.page_size "
                         f"{page_size} (tokens per key summary; e.g. 4, 8 or {page_size})")
    return page_size // tokens


def check_sparse_settings(sparse: SparseSettings, page_size: int, num_layers: int) -> None:
    """Start-up check of enabled settings against the page size and the model's layer count."""
    if not sparse.enabled:
        return
    if sparse.selector not in ("quest", "centroids"):
        raise ValueError(f"sparse_attention.selector {sparse.selector!r} must be quest or centroids")
    page_counts(sparse, page_size)
    if sparse.selector == "quest":
        summary_blocks(sparse, page_size)
    if sparse.dense_layers >= num_layers:
        raise ValueError(f"sparse_attention.dense_layers {sparse.dense_layers} leaves none of the "
                         f"model's {num_layers} layers sparse (it must be below {num_layers})")


@dataclass
class QuestPlan:
    """Per-forward layout of the decode rows, shared by every sparse layer."""

    budget_pages: int
    shortlist_pages: int            # 0: every page scored by its blocks (no row is that long)
    all_dense: bool                 # no row exceeds the budget: plain dense decode
    dense_rows: torch.Tensor        # [Bd] decode rows within the budget
    sparse_rows: torch.Tensor       # [Bs] decode rows past it
    dense_pages: torch.Tensor       # [Bd, Wd] their page tables, trimmed to the longest
    dense_mask: torch.Tensor        # [Bd, 1, 1, Wd * page_size]
    sparse_pages: torch.Tensor      # [Bs, P] page tables of the sparse rows
    sparse_lengths: torch.Tensor    # [Bs, 1, 1] tokens, including the new one
    bias: torch.Tensor              # [Bs, 1, P] +inf forced (sink, recent), -inf padding, else 0
    unwritten: torch.Tensor         # [Bs, 1, 1, P * blocks] True for summary blocks past the sequence
    page_unwritten: torch.Tensor    # [Bs, 1, 1, P] True for padding pages (past the sequence)
    slot: torch.Tensor              # [page_size] 0..page_size-1
    slot_head: torch.Tensor         # [1, kv_heads, 1, page_size] slot * kv_heads + head
    pages_read: int
    pages_skipped: int


def make_plan(meta: AttentionMetadata, page_size: int, kv_heads: int, summary_tokens: int) -> QuestPlan:
    budget_pages, sink_pages, recent_pages = page_counts(meta.sparse, page_size)
    device = meta.decode_pages.device
    lengths = meta.decode_lengths
    rows = split_rows(meta, page_size, kv_heads, budget_pages)
    read, skipped = count_pages(lengths.tolist(), page_size, budget_pages)
    sparse_pages, used = rows.sparse_pages, rows.used
    width = sparse_pages.shape[1]
    logical = torch.arange(width, device=device).unsqueeze(0)                    # [1, P]
    forced = (logical < sink_pages) | ((logical >= used - recent_pages) & (logical < used))
    padding = torch.zeros(sparse_pages.shape, dtype=torch.float32, device=device)
    padding = padding.masked_fill(logical >= used, float("-inf"))
    bias = padding.masked_fill(forced, float("inf"))
    # A block counts when its first position is written: the unwritten blocks of the last page
    # (and every block of a padding page) never score, whatever their summary holds.
    first = torch.arange(0, width * page_size, summary_tokens, device=device).unsqueeze(0)  # [1, P*blocks]
    n_sparse = len(rows.sparse_rows)
    unwritten = first >= lengths[rows.sparse_rows].unsqueeze(1)
    shortlist = shortlist_pages(page_size, budget_pages, meta.sparse.shortlist_tokens)
    return QuestPlan(
        budget_pages=budget_pages, shortlist_pages=shortlist if 0 < shortlist < width else 0,
        all_dense=n_sparse == 0, dense_rows=rows.dense_rows,
        sparse_rows=rows.sparse_rows, dense_pages=rows.dense_pages, dense_mask=rows.dense_mask,
        sparse_pages=sparse_pages, sparse_lengths=lengths[rows.sparse_rows].view(-1, 1, 1),
        bias=bias.unsqueeze(1), unwritten=unwritten.view(n_sparse, 1, 1, first.shape[1]),
        page_unwritten=(logical >= used).view(n_sparse, 1, 1, width), slot=rows.slot,
        slot_head=rows.slot_head, pages_read=read * kv_heads, pages_skipped=skipped * kv_heads)


def count_pages(seq_lens: list[int], page_size: int, budget_pages: int) -> tuple[int, int]:
    """(pages read, pages skipped) of one sparse layer and KV head for decode rows of these lengths:
    a row past the budget reads budget_pages, one within it reads all of its pages."""
    read = skipped = 0
    for length in seq_lens:
        pages = -(-length // page_size)
        read += min(pages, budget_pages)
        skipped += max(0, pages - budget_pages)
    return read, skipped


def head_page_logits(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, unwritten: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """scale * the Quest bound of every page for every q head, kernels/reference.quest_head_bounds:
    the best bound of the page's written blocks.

    q: [B, H, d]; kmin, kmax: [B, P, blocks, kv_heads, d]; unwritten: [B, 1, 1, P * blocks] (True
    for a block past the sequence: -inf whatever its summary holds) -> [B, kv_heads, group, P]
    float32, -inf for padding pages.
    max(q*lo, q*hi) is q*hi where q >= 0 and q*lo where q < 0 (hi >= lo), so every head's bound is
    two batched matmuls with the positive and negative parts of q (scaled first: one op fewer).
    """
    batch, heads, head_dim = q.shape
    width, blocks, kv_heads = kmin.shape[1:4]
    qg = (q.float() * scale).view(batch, kv_heads, heads // kv_heads, head_dim)   # [B, kvh, g, d]
    hi = kmax.float().flatten(1, 2).permute(0, 2, 3, 1)                           # [B, kvh, d, P*blocks]
    lo = kmin.float().flatten(1, 2).permute(0, 2, 3, 1)
    logits = (qg.clamp(min=0) @ hi + qg.clamp(max=0) @ lo).masked_fill(unwritten, float("-inf"))
    if blocks == 1:
        return logits
    return logits.view(*logits.shape[:3], width, blocks).amax(dim=-1)


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, unwritten: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Page scores per row and KV head, as kernels/reference.quest_page_scores: each q head's page
    bounds (head_page_logits), log-softmax over the row's pages (padding pages, at -inf, take no
    share), max over the GQA group -> [B, kv_heads, P] (float32)."""
    logits = head_page_logits(q, kmin, kmax, unwritten, scale)                   # [B, kvh, g, P]
    return (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)


def select_pages(scores: torch.Tensor, bias: torch.Tensor, budget_pages: int) -> torch.Tensor:
    """Logical pages to attend per row and KV head: forced ones plus the best, sorted ascending.

    scores: [B, kv_heads, P]; bias: [B, 1, P] (+inf forced, -inf beyond the sequence) ->
    [B, kv_heads, budget_pages].
    """
    picked = (scores + bias).topk(budget_pages, dim=-1, sorted=False).indices
    return picked.sort(dim=-1).values


def choose_pages(q: torch.Tensor, kmin_layer: torch.Tensor, kmax_layer: torch.Tensor,
                 pmin_layer: torch.Tensor | None, pmax_layer: torch.Tensor | None, plan: QuestPlan,
                 scale: float, fused: bool) -> torch.Tensor:
    """The engine's page selection (kernels/reference.py's rule) for the plan's sparse rows q [Bs,
    H, d] -> logical pages [Bs, kv_heads, budget_pages], ascending. A page selector is any function
    of this signature (the attention backend's `page_selector`; bench/sparse_quality.py swaps in
    candidate rules that way). kmin_layer, kmax_layer: [pages, blocks, kv_heads, d]; pmin_layer,
    pmax_layer: [pages, kv_heads, d] (the coarse stage's page summaries). fused: score with the CPU
    kernel (kernels/cpu/fused.cpp) instead of gathering summaries for torch ops: the same scores."""
    if plan.shortlist_pages:
        assert pmin_layer is not None and pmax_layer is not None, "the coarse stage needs the page summaries"
        shortlist = _shortlist(q, pmin_layer, pmax_layer, plan, scale, fused)       # [Bs, kvh, S]
        return _select_from_shortlist(q, kmin_layer, kmax_layer, shortlist, plan, scale)
    if fused:
        scores = torch.ops.radixgate_cpu.quest_page_scores(
            q, kmin_layer, kmax_layer, plan.sparse_pages.contiguous(),
            plan.sparse_lengths.reshape(-1).contiguous(), plan.slot.shape[0], scale)
    else:
        kmin, kmax = gather_summaries(kmin_layer, kmax_layer, plan.sparse_pages)
        scores = quest_scores(q, kmin, kmax, plan.unwritten, scale)              # [Bs, kvh, P]
    return select_pages(scores, plan.bias, plan.budget_pages)                    # [Bs, kvh, k]


def sparse_rows_attention(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                          kmin_layer: torch.Tensor, kmax_layer: torch.Tensor, plan: QuestPlan,
                          scale: float, fused: bool = False, pmin_layer: torch.Tensor | None = None,
                          pmax_layer: torch.Tensor | None = None,
                          page_selector=choose_pages) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest decode of the plan's sparse rows, q: [Bs, H, d] -> (out [Bs, H, d], logical pages
    chosen [Bs, kv_heads, budget_pages]): page_selector's pages (choose_pages), attended straight
    from the cache (fused: with the CPU kernel over each head's pages)."""
    chosen = page_selector(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused)
    attend = attend_pages_fused if fused else attend_pages
    return attend(q, k_layer, v_layer, chosen, plan, scale), chosen


def _shortlist(q: torch.Tensor, pmin_layer: torch.Tensor, pmax_layer: torch.Tensor, plan: QuestPlan,
               scale: float, fused: bool) -> torch.Tensor:
    """The coarse stage: every page scored by its page summary, the best plan.shortlist_pages kept
    per row and KV head (forced pages first), ascending -> logical pages [Bs, kv_heads, S]."""
    pmin, pmax = pmin_layer.unsqueeze(1), pmax_layer.unsqueeze(1)                # one block per page
    if fused:
        scores = torch.ops.radixgate_cpu.quest_page_scores(
            q, pmin, pmax, plan.sparse_pages.contiguous(), plan.sparse_lengths.reshape(-1).contiguous(),
            plan.slot.shape[0], scale)
    else:
        lo, hi = gather_summaries(pmin, pmax, plan.sparse_pages)
        scores = quest_scores(q, lo, hi, plan.page_unwritten, scale)
    return select_pages(scores, plan.bias, plan.shortlist_pages)


def _select_from_shortlist(q: torch.Tensor, kmin_layer: torch.Tensor, kmax_layer: torch.Tensor,
                           shortlist: torch.Tensor, plan: QuestPlan, scale: float) -> torch.Tensor:
    """The fine stage: the shortlisted pages [Bs, kv_heads, S] scored by their block summaries
    (each KV head reads its own pages' rows), log-softmax per q head over the shortlist, max over
    the group; the budget's best (forced first) -> logical pages [Bs, kv_heads, budget], ascending."""
    batch, heads, head_dim = q.shape
    _, blocks, kv_heads, _ = kmin_layer.shape
    width = shortlist.shape[-1]
    page_size = plan.slot.shape[0]
    physical = plan.sparse_pages.gather(1, shortlist.flatten(1)).view_as(shortlist)   # [Bs, kvh, S]
    head = torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1, 1)
    block = torch.arange(blocks, device=q.device)
    rows = ((physical.unsqueeze(-1) * blocks + block) * kv_heads + head).flatten()   # flat [pages*blocks*kvh] rows
    lo = kmin_layer.reshape(-1, head_dim).index_select(0, rows).view(batch, kv_heads, width * blocks, head_dim)
    hi = kmax_layer.reshape(-1, head_dim).index_select(0, rows).view(batch, kv_heads, width * blocks, head_dim)
    qg = (q.float() * scale).view(batch, kv_heads, heads // kv_heads, head_dim)
    logits = qg.clamp(min=0) @ hi.float().transpose(-1, -2) + qg.clamp(max=0) @ lo.float().transpose(-1, -2)
    first = (shortlist.unsqueeze(-1) * page_size + block * (page_size // blocks)).view(batch, kv_heads, 1, -1)
    logits = logits.masked_fill(first >= plan.sparse_lengths.unsqueeze(-1), float("-inf"))
    logits = logits.view(batch, kv_heads, -1, width, blocks).amax(dim=-1)         # [Bs, kvh, g, S]
    scores = (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)       # [Bs, kvh, S]
    bias = plan.bias.expand(batch, kv_heads, -1).gather(2, shortlist)
    picked = (scores + bias).topk(plan.budget_pages, dim=-1, sorted=False).indices
    return shortlist.gather(2, picked).sort(dim=-1).values


def gather_summaries(kmin_layer: torch.Tensor, kmax_layer: torch.Tensor, pages: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summaries [pages, blocks, kv_heads, d] of each row's pages [B, P] -> two [B, P, blocks,
    kv_heads, d]. index_select: ~4x faster than kmin[pages] on CPU."""
    flat = pages.flatten()
    kmin = kmin_layer.index_select(0, flat).view(*pages.shape, *kmin_layer.shape[1:])
    kmax = kmax_layer.index_select(0, flat).view(*pages.shape, *kmax_layer.shape[1:])
    return kmin, kmax


def attend_pages_fused(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, chosen: torch.Tensor,
                       plan: QuestPlan, scale: float) -> torch.Tensor:
    """attend_pages in the CPU kernel: each KV head reads its own chosen pages [Bs, kv_heads, k]
    straight from the cache, no gather and no mask. chosen is sorted, so each head's last page
    is the sequence's last (always chosen as recent), the only one that may be partial."""
    batch, kv_heads, k = chosen.shape
    page_size = k_layer.shape[1]
    physical = plan.sparse_pages.gather(1, chosen.flatten(1)).view_as(chosen)    # [Bs, kvh, k]
    last_fill = plan.sparse_lengths.view(batch, 1) - chosen[:, :, -1] * page_size   # [Bs, kvh]
    assert bool(((last_fill >= 1) & (last_fill <= page_size)).all()), "the last page was not chosen"
    lengths = (k - 1) * page_size + last_fill
    return torch.ops.radixgate_cpu.paged_decode_attention(
        q, k_layer.view(-1, *k_layer.shape[2:]), v_layer.view(-1, *v_layer.shape[2:]),
        physical.contiguous(), lengths.contiguous(), page_size, scale)


def get_plan(cache: PagedKVCache, meta: AttentionMetadata) -> QuestPlan:
    plan = getattr(meta, PLAN_ATTRIBUTE, None)
    if plan is None:
        assert cache.kmin is not None, ("sparse decode needs key summaries: build the PagedKVCache with "
                                        "summary_tokens (TorchRunner does when sparse_attention is enabled)")
        assert meta.sparse.summary_tokens == cache.summary_tokens, (
            f"sparse_attention.summary_tokens {meta.sparse.summary_tokens} differs from the cache's "
            f"{cache.summary_tokens}")
        plan = make_plan(meta, cache.page_size, cache.k.shape[3], cache.summary_tokens)
        setattr(meta, PLAN_ATTRIBUTE, plan)
    return plan


def sparse_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                            scale: float, dense_decode, fused: bool = False,
                            page_selector=choose_pages) -> torch.Tensor:
    """Decode attention of B single-token queries [B, H, d] for one sparse-eligible layer.

    When every row is within the budget this layer is exactly dense_decode, arithmetic included.
    fused: score and attend with the CPU kernels (kernels/cpu/fused.cpp) over each head's chosen
    pages instead of gathering them for SDPA; selection is the same."""
    plan = get_plan(cache, meta)
    if counted_all_dense(plan, meta):
        return dense_decode(q, cache, layer, meta, scale)
    k_layer, v_layer = cache.k[layer], cache.v[layer]
    sparse_out, _ = sparse_rows_attention(q[plan.sparse_rows], k_layer, v_layer, cache.kmin[layer],
                                          cache.kmax[layer], plan, scale, fused, cache.pmin[layer],
                                          cache.pmax[layer], page_selector)
    return merge_dense_rows(q, sparse_out, cache, layer, meta, plan, scale, fused)
