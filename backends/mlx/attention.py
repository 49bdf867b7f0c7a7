"""Paged attention of the MLX backend: one step's plan, and every layer's K/V write + attention.

The plan is built once per step on the host (NumPy) from the engine's chunks and page tables: the
leading single-token chunks are decode rows, the rest are extends (prefill chunks). Per layer:
write the new K/V into their slots (and, with Quest, bring the touched pages' key summaries, block
and page, up to date), then decode rows go through the paged decode chosen at start-up (the Metal
kernel on a Metal GPU, its MLX-ops mirror elsewhere: kernels/metal/paged_decode.py), sparse layers
through the page selector chosen at start-up (Quest: backends/mlx/sparse.py; the centroid selector:
backends/mlx/centroids.py, whose summaries the runner writes after each step's forward), and each
extend attends causally over its pages.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from backends.base import SequenceChunk, SparseSettings
from backends.mlx import centroids as centroid_selector
from backends.mlx import sparse as quest_selector
from backends.mlx.centroids import CentroidBudgets, CentroidPlan, make_centroid_plan
from backends.mlx.kv_cache import PagedKVCache
from backends.mlx.sparse import QuestPlan, make_quest_plan
from kernels.metal.paged_decode import PagedDecode


@dataclass
class Extend:
    row: int                # first row of the chunk in the step's tokens
    tokens: int             # new tokens
    start: int              # tokens cached before this step
    pages: mx.array         # int32 [ceil((start + tokens) / page_size)] the sequence's pages


@dataclass
class StepPlan:
    positions: mx.array             # int32 [T]
    slots: mx.array                 # int32 [T] flat KV slot of each new token
    num_decode: int                 # leading single-token chunks: rows [0, num_decode)
    decode_pages: mx.array          # int32 [num_decode, W] page tables (padded with the scratch page)
    decode_lengths: mx.array        # int32 [num_decode] tokens after this step
    extends: list[Extend]
    summary_pages: mx.array | None  # [S] pages whose Quest summaries this step changes (Quest on)
    summary_unwritten: mx.array | None   # bool [S, blocks, summary_tokens, 1, 1]
    quest: QuestPlan | None         # Quest: decode rows past the budget (None: every layer dense)
    centroids: CentroidPlan | None = None   # the centroid selector's: rows past the budget in groups

    @property
    def sparse(self) -> QuestPlan | CentroidPlan | None:
        """The selector's plan of the decode rows (None: sparse off, or no row past the budget)."""
        return self.quest if self.quest is not None else self.centroids


def plan_step(chunks: list[SequenceChunk], tables: np.ndarray, page_size: int, scratch_page: int,
              sparse: SparseSettings | None, budgets: CentroidBudgets | None = None) -> StepPlan:
    """tables: int32 [B, max_pages] the chunks' rows of the page-table store, in batch order.
    budgets: the centroid selector's counts (centroids.centroid_budgets, built at start-up), which
    it needs."""
    starts = np.array([c.start_position for c in chunks])
    lengths = np.array([len(c.token_ids) for c in chunks])
    ends = starts + lengths
    num_decode = 0
    while num_decode < len(chunks) and lengths[num_decode] == 1:
        num_decode += 1
    positions = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    rows = np.repeat(np.arange(len(chunks)), lengths)
    slots = tables[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
    used = -(-ends // page_size)
    width = int(used[:num_decode].max()) if num_decode else 0
    decode_tables = tables[:num_decode, :width].copy()
    decode_tables[np.arange(width)[None, :] >= used[:num_decode, None]] = scratch_page
    cu = np.concatenate([[0], np.cumsum(lengths)])
    extends = [Extend(int(cu[i]), int(lengths[i]), int(starts[i]), mx.array(tables[i, :used[i]]))
               for i in range(num_decode, len(chunks))]
    summary_pages = summary_unwritten = quest = centroid_plan = None
    if sparse is not None and sparse.selector == "centroids":
        # no per-write upkeep: the runner summarises the groups a step completes after its forward
        assert budgets is not None, "the centroid selector plans with its start-up counts"
        if num_decode:
            centroid_plan = make_centroid_plan(budgets, tables[:num_decode], ends[:num_decode], page_size,
                                               scratch_page)
    elif sparse is not None:
        # every page this step writes into: its blocks are recomputed over slots [0, filled)
        touched = [(i, p) for i in range(len(chunks)) for p in range(starts[i] // page_size, used[i])]
        filled = np.array([min(page_size, ends[i] - p * page_size) for i, p in touched])
        blocks = page_size // sparse.summary_tokens
        slot = np.arange(page_size).reshape(1, blocks, sparse.summary_tokens, 1, 1)
        summary_pages = mx.array(np.array([tables[i, p] for i, p in touched], dtype=np.int32))
        summary_unwritten = mx.array(slot >= filled.reshape(-1, 1, 1, 1, 1))
        if num_decode:
            quest = make_quest_plan(sparse, tables[:num_decode], ends[:num_decode], page_size, scratch_page)
    return StepPlan(
        positions=mx.array(positions.astype(np.int32)), slots=mx.array(slots.astype(np.int32)),
        num_decode=num_decode, decode_pages=mx.array(decode_tables.astype(np.int32)),
        decode_lengths=mx.array(ends[:num_decode].astype(np.int32)), extends=extends,
        summary_pages=summary_pages, summary_unwritten=summary_unwritten, quest=quest, centroids=centroid_plan)


def extend_attention(q: mx.array, k_cache: mx.array, v_cache: mx.array, ext: Extend, page_size: int,
                     scale: float) -> mx.array:
    """Causal attention of one chunk's queries q: [n, H, d] at positions [start, start + n) over
    its sequence's first start + n tokens, read through its pages -> [n, H, d]."""
    n, heads, head_dim = q.shape
    kv_heads, total = k_cache.shape[1], ext.start + n
    k = k_cache.reshape(-1, page_size, kv_heads, head_dim)[ext.pages].reshape(-1, kv_heads, head_dim)[:total]
    v = v_cache.reshape(-1, page_size, kv_heads, head_dim)[ext.pages].reshape(-1, kv_heads, head_dim)[:total]
    causal = mx.arange(total)[None, :] <= (ext.start + mx.arange(n))[:, None]     # [n, total]
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], scale=scale,
        mask=causal)
    return out[0].transpose(1, 0, 2)


class PagedAttention:
    """Every layer's K/V write and attention over the cache, for the step plan() was given."""

    def __init__(self, cache: PagedKVCache, heads: int, head_dim: int, decode: PagedDecode,
                 sparse: SparseSettings | None):
        self.cache, self.heads, self.head_dim = cache, heads, head_dim
        self.scale = head_dim ** -0.5
        self.decode, self.sparse = decode, sparse
        self.step: StepPlan | None = None
        # the page selector, chosen once: (sparse rows' q, layer) -> (physical pages, lengths) per KV head
        self.chosen_pages = (self.centroid_pages if sparse is not None and sparse.selector == "centroids"
                             else self.quest_pages)

    def plan(self, step: StepPlan) -> None:
        self.step = step

    def sparse_layer(self, layer: int) -> bool:
        return self.sparse is not None and layer >= self.sparse.dense_layers

    def dense_decode(self, layer: int, q: mx.array, pages: mx.array, lengths: mx.array) -> mx.array:
        """q: [B, H, d] over tables pages [B, W]: every KV head reads the whole table."""
        kv_heads = self.cache.kv_heads
        per_head = mx.broadcast_to(pages[:, None, :], (pages.shape[0], kv_heads, pages.shape[1]))
        per_head_lengths = mx.broadcast_to(lengths[:, None], (lengths.shape[0], kv_heads))
        return self.decode(q, self.cache.k[layer], self.cache.v[layer], per_head, per_head_lengths,
                           self.cache.page_size, self.scale)

    def quest_pages(self, layer: int, qs: mx.array) -> tuple[mx.array, mx.array]:
        plan, cache = self.step.quest, self.cache
        chosen = quest_selector.choose_pages(qs, cache.kmin[layer], cache.kmax[layer], cache.pmin[layer],
                                             cache.pmax[layer], plan, self.scale)
        return quest_selector.chosen_lists(plan, chosen, cache.page_size)

    def centroid_pages(self, layer: int, qs: mx.array) -> tuple[mx.array, mx.array]:
        plan = self.step.centroids
        chosen = centroid_selector.choose_pages(qs, self.cache, layer, plan, self.scale)
        return centroid_selector.chosen_lists(plan, chosen, layer)

    def sparse_decode(self, layer: int, q: mx.array) -> mx.array:
        """The decode rows of a sparse layer: rows past the budget read their selector's pages, the
        others their whole tables (exactly dense decode)."""
        plan, cache = self.step.sparse, self.cache
        qs = q[plan.sparse_rows]
        pages, lengths = self.chosen_pages(layer, qs)
        out = self.decode(qs, cache.k[layer], cache.v[layer], pages, lengths, cache.page_size, self.scale)
        if plan.dense_rows.shape[0]:
            dense = self.dense_decode(layer, q[plan.dense_rows], plan.dense_pages, plan.dense_lengths)
            out = mx.concatenate([dense, out])[plan.inverse]
        return out

    def __call__(self, layer: int, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q: [T, H, d], k, v: [T, kv_heads, d] (rotated) -> [T, H, d]; writes k, v first."""
        step, cache = self.step, self.cache
        cache.write(layer, step.slots, k, v)
        if step.summary_pages is not None:
            cache.update_summaries(layer, step.summary_pages, step.summary_unwritten)
        parts = []
        nd = step.num_decode
        if nd:
            if step.sparse is not None and self.sparse_layer(layer):
                parts.append(self.sparse_decode(layer, q[:nd]))
            else:
                parts.append(self.dense_decode(layer, q[:nd], step.decode_pages, step.decode_lengths))
        for ext in step.extends:
            parts.append(extend_attention(q[ext.row:ext.row + ext.tokens], cache.k[layer], cache.v[layer],
                                          ext, cache.page_size, self.scale))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)
