"""Quest sparse decode in MLX ops: score each page by its key summaries, keep the sink, recent and
best pages within the budget, attend only those. The rule is backends/cuda/attention/sparse.py's
(and kernels/reference.py's), op for op; page_counts and count_pages are that module's own.

Per row past the budget and per KV head: each q head's Quest bound of every page (the best over
the page's written blocks of sum_d max(q_d * kmin_d, q_d * kmax_d), at the attention scale), a
log-softmax over the row's pages per head, the max over the GQA group; forced pages get +inf and
padding pages -inf; the budget_pages best, sorted ascending, are read. Rows within the budget
attend densely (exactly dense decode).

Coarse to fine, as the torch backend: when the longest sparse row has more than
kernels/reference.shortlist_pages(...) pages, every page is first scored by its page summary (one
min/max per page: 1/blocks of the block summaries' reads), the best shortlist_pages per KV head are
kept (forced ones in), and
only those are scored by their block summaries (log-softmax over the shortlist), the budget chosen
from them. A row of at most shortlist_pages pages in such a step keeps all its pages in the
shortlist, so its choice is the one-stage choice, as the reference's per-row rule says.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from backends.base import SparseSettings
from backends.cuda.attention.sparse import count_pages, page_counts
from kernels.reference import shortlist_pages


@dataclass
class DecodeRows:
    """A step's decode rows split into those within the budget (attended densely) and those past it,
    as attention.py reads them; both page selectors' plans (Quest's here, the centroid selector's in
    centroids.py) start with it."""

    dense_rows: mx.array        # [Bd] decode rows within the budget
    sparse_rows: mx.array       # [Bs] decode rows past it
    inverse: mx.array           # [B] where each decode row is in concat(dense rows, sparse rows)
    dense_pages: mx.array       # [Bd, Wd] their page tables, trimmed to the longest
    dense_lengths: mx.array     # [Bd]


def decode_rows(tables: np.ndarray, lengths: np.ndarray, used: np.ndarray, is_sparse: np.ndarray) -> dict:
    """DecodeRows' fields for the rows marked is_sparse (tables [B, W], lengths and used pages [B])."""
    dense_rows, sparse_rows = np.flatnonzero(~is_sparse), np.flatnonzero(is_sparse)
    dense_width = int(used[dense_rows].max()) if len(dense_rows) else 0
    return dict(dense_rows=mx.array(dense_rows), sparse_rows=mx.array(sparse_rows),
                inverse=mx.array(np.argsort(np.concatenate([dense_rows, sparse_rows]))),
                dense_pages=mx.array(tables[dense_rows, :dense_width]), dense_lengths=mx.array(lengths[dense_rows]))


@dataclass
class QuestPlan(DecodeRows):
    """Per-step layout of the decode rows, shared by every sparse layer (built on the host once)."""

    budget_pages: int
    shortlist_pages: int        # 0: every page scored by its block summaries (no row is that long)
    page_size: int
    sparse_pages: mx.array      # [Bs, P] page tables of the sparse rows (padded with the scratch page)
    sparse_lengths: mx.array    # [Bs] tokens, including the new one
    bias: mx.array              # [Bs, 1, P] +inf forced (sink, recent), -inf padding, else 0
    unwritten: mx.array         # [Bs, 1, 1, P * blocks] True for summary blocks past the sequence
    page_unwritten: mx.array    # [Bs, 1, 1, P] True for padding pages (past the sequence)
    pages_read: int             # per layer and KV head, summed over the decode rows
    pages_skipped: int


def make_quest_plan(sparse: SparseSettings, tables: np.ndarray, lengths: np.ndarray, page_size: int,
                    scratch_page: int) -> QuestPlan | None:
    """tables: int32 [B, W] of the decode rows, lengths [B]. None when no row exceeds the budget
    (every layer then decodes densely)."""
    budget_pages, sink_pages, recent_pages = page_counts(sparse, page_size)
    used = -(-lengths // page_size)
    is_sparse = used > budget_pages
    if not is_sparse.any():
        return None
    read, skipped = count_pages(lengths.tolist(), page_size, budget_pages)
    sparse_rows = np.flatnonzero(is_sparse)
    width = int(used[sparse_rows].max())
    pages = tables[sparse_rows, :width].copy()
    logical = np.arange(width)[None, :]
    beyond = logical >= used[sparse_rows, None]
    pages[beyond] = scratch_page
    forced = (logical < sink_pages) | ((logical >= used[sparse_rows, None] - recent_pages) & ~beyond)
    bias = np.where(forced, np.inf, np.where(beyond, -np.inf, 0.0)).astype(np.float32)
    first = np.arange(0, width * page_size, sparse.summary_tokens)[None, :]
    unwritten = first >= lengths[sparse_rows, None]
    shortlist = shortlist_pages(page_size, budget_pages, sparse.shortlist_tokens)
    return QuestPlan(
        budget_pages=budget_pages, shortlist_pages=shortlist if 0 < shortlist < width else 0,
        page_size=page_size, **decode_rows(tables, lengths, used, is_sparse), sparse_pages=mx.array(pages),
        sparse_lengths=mx.array(lengths[sparse_rows]),
        bias=mx.array(bias[:, None, :]), unwritten=mx.array(unwritten[:, None, None, :]),
        page_unwritten=mx.array(beyond[:, None, None, :]),
        pages_read=read, pages_skipped=skipped)


def quest_scores(q: mx.array, kmin: mx.array, kmax: mx.array, unwritten: mx.array, scale: float) -> mx.array:
    """Page scores per row and KV head (reference quest_page_scores).

    q: [B, H, d]; kmin, kmax: [B, P, blocks, kv_heads, d]; unwritten: [B, 1, 1, P * blocks] ->
    float32 [B, kv_heads, P]. max(q*lo, q*hi) is q*hi where q >= 0 and q*lo where q < 0, so each
    head's bounds are two matmuls with the positive and negative parts of q (scaled first).
    """
    batch, heads, head_dim = q.shape
    width, blocks, kv_heads = kmin.shape[1:4]
    qg = (q.astype(mx.float32) * scale).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    hi = kmax.astype(mx.float32).reshape(batch, width * blocks, kv_heads, head_dim).transpose(0, 2, 3, 1)
    lo = kmin.astype(mx.float32).reshape(batch, width * blocks, kv_heads, head_dim).transpose(0, 2, 3, 1)
    logits = mx.maximum(qg, 0) @ hi + mx.minimum(qg, 0) @ lo                    # [B, kvh, g, P*blocks]
    logits = mx.where(unwritten, -mx.inf, logits)
    logits = logits.reshape(*logits.shape[:3], width, blocks).max(axis=-1)       # [B, kvh, g, P]
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).max(axis=2)


def select_pages(scores: mx.array, bias: mx.array, budget_pages: int) -> mx.array:
    """Logical pages per row and KV head: forced ones plus the best, sorted ascending.
    scores: [B, kv_heads, P]; bias: [B, 1, P] -> int32 [B, kv_heads, budget_pages]."""
    picked = mx.argpartition(-(scores + bias), kth=budget_pages - 1, axis=-1)[..., :budget_pages]
    return mx.sort(picked, axis=-1).astype(mx.int32)


def choose_pages(q: mx.array, kmin_layer: mx.array, kmax_layer: mx.array, pmin_layer: mx.array | None,
                 pmax_layer: mx.array | None, plan: QuestPlan, scale: float) -> mx.array:
    """The logical pages each sparse row's KV heads read, q: [Bs, H, d] -> int32 [Bs, kv_heads,
    budget_pages], ascending. kmin_layer, kmax_layer: one layer's block summaries [pages, blocks,
    kv_heads, d]; pmin_layer, pmax_layer: its page summaries [pages, kv_heads, d] (coarse stage)."""
    if plan.shortlist_pages:
        assert pmin_layer is not None and pmax_layer is not None, "the coarse stage needs the page summaries"
        # one summary "block" per page: the same scoring, over every page of the row
        pmin, pmax = pmin_layer[plan.sparse_pages][:, :, None], pmax_layer[plan.sparse_pages][:, :, None]
        coarse = quest_scores(q, pmin, pmax, plan.page_unwritten, scale)
        shortlist = select_pages(coarse, plan.bias, plan.shortlist_pages)           # [Bs, kvh, S]
        return select_from_shortlist(q, kmin_layer, kmax_layer, shortlist, plan, scale)
    kmin, kmax = kmin_layer[plan.sparse_pages], kmax_layer[plan.sparse_pages]
    return select_pages(quest_scores(q, kmin, kmax, plan.unwritten, scale), plan.bias, plan.budget_pages)


def select_from_shortlist(q: mx.array, kmin_layer: mx.array, kmax_layer: mx.array, shortlist: mx.array,
                          plan: QuestPlan, scale: float) -> mx.array:
    """The fine stage: the shortlisted logical pages [Bs, kv_heads, S] (ascending) scored by their
    block summaries, each KV head reading only its own rows of the flat summaries (not every
    head's, as a page gather would); log-softmax per q head over the shortlist, max over the
    group, the budget's best (forced first) -> logical pages [Bs, kv_heads, budget], ascending."""
    batch, heads, head_dim = q.shape
    blocks, kv_heads = kmin_layer.shape[1:3]
    width = shortlist.shape[-1]
    physical = mx.take_along_axis(plan.sparse_pages[:, None, :], shortlist, axis=-1)   # [Bs, kvh, S]
    block = mx.arange(blocks)
    head = mx.arange(kv_heads).reshape(1, kv_heads, 1, 1)
    rows = ((physical[..., None] * blocks + block) * kv_heads + head).reshape(batch, kv_heads, width * blocks)
    lo = kmin_layer.reshape(-1, head_dim)[rows].astype(mx.float32)                 # [Bs, kvh, S*blocks, d]
    hi = kmax_layer.reshape(-1, head_dim)[rows].astype(mx.float32)
    qg = (q.astype(mx.float32) * scale).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    logits = mx.maximum(qg, 0) @ hi.swapaxes(-1, -2) + mx.minimum(qg, 0) @ lo.swapaxes(-1, -2)
    first = (shortlist[..., None] * plan.page_size + block * (plan.page_size // blocks))
    unwritten = first.reshape(batch, kv_heads, 1, -1) >= plan.sparse_lengths.reshape(-1, 1, 1, 1)
    logits = mx.where(unwritten, -mx.inf, logits).reshape(batch, kv_heads, -1, width, blocks).max(axis=-1)
    scores = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).max(axis=2)    # [Bs, kvh, S]
    bias = mx.take_along_axis(mx.broadcast_to(plan.bias, (batch, kv_heads, plan.bias.shape[-1])), shortlist,
                              axis=-1)
    # picked indexes the ascending shortlist and comes back sorted, so the pages are ascending too
    return mx.take_along_axis(shortlist, select_pages(scores, bias, plan.budget_pages), axis=-1)


def chosen_lists(plan: QuestPlan, chosen: mx.array, page_size: int) -> tuple[mx.array, mx.array]:
    """Each head's chosen physical pages [Bs, kv_heads, k] and how many of their positions to read
    [Bs, kv_heads]: chosen is sorted, so a head's last page is the sequence's last (always chosen
    as recent), the only one that may be partial."""
    physical = mx.take_along_axis(plan.sparse_pages[:, None, :], chosen, axis=-1)
    last_fill = plan.sparse_lengths[:, None] - chosen[..., -1] * page_size
    return physical, (chosen.shape[-1] - 1) * page_size + last_fill
