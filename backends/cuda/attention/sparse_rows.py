"""The decode rows of a sparse layer, whatever selects their pages (attention/sparse.py's Quest,
attention/centroids.py's groups): which rows are past the budget, attention over each KV head's
chosen pages straight from the paged cache, and the batch's output with the rows within the
budget attended densely (exactly dense decode's arithmetic)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from backends.cuda.attention.torch_metadata import AttentionMetadata
    from backends.cuda.kv_cache import PagedKVCache


@dataclass
class RowSplit:
    """A forward's decode rows split by the budget: within it (attended densely) and past it."""

    dense_rows: torch.Tensor        # [Bd] decode rows within the budget
    sparse_rows: torch.Tensor       # [Bs] decode rows past it
    dense_pages: torch.Tensor       # [Bd, Wd] their page tables, trimmed to the longest
    dense_mask: torch.Tensor        # [Bd, 1, 1, Wd * page_size]
    sparse_pages: torch.Tensor      # [Bs, P] page tables of the sparse rows
    used: torch.Tensor              # [Bs, 1] pages of each sparse row
    slot: torch.Tensor              # [page_size] 0..page_size-1
    slot_head: torch.Tensor         # [1, kv_heads, 1, page_size] slot * kv_heads + head


def split_rows(meta: AttentionMetadata, page_size: int, kv_heads: int, budget_pages: int) -> RowSplit:
    """Rows of more pages than budget_pages are sparse, the others dense."""
    device = meta.decode_pages.device
    num_pages = (meta.decode_lengths + page_size - 1) // page_size               # [B]
    is_sparse = num_pages > budget_pages
    sparse_rows = is_sparse.nonzero().flatten()
    dense_rows = (~is_sparse).nonzero().flatten()
    pages_cpu, sparse_cpu = num_pages.cpu(), is_sparse.cpu()
    dense_width = int(pages_cpu[~sparse_cpu].max()) if len(dense_rows) else 0
    slot = torch.arange(page_size, device=device)
    head = torch.arange(kv_heads, device=device).view(1, kv_heads, 1, 1)
    return RowSplit(dense_rows=dense_rows, sparse_rows=sparse_rows,
                    dense_pages=meta.decode_pages[dense_rows][:, :dense_width],
                    dense_mask=meta.decode_mask[dense_rows][..., :dense_width * page_size],
                    sparse_pages=meta.decode_pages[sparse_rows], used=num_pages[sparse_rows].unsqueeze(1),
                    slot=slot, slot_head=slot * kv_heads + head)


def dense_rows_attention(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, pages: torch.Tensor,
                         mask: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention's math on a subset of rows: q [B, H, d] over pages [B, W] -> [B, H, d]."""
    batch, width = pages.shape
    page_size, kv_heads, head_dim = k_layer.shape[1:]
    flat = pages.flatten()
    k = k_layer.index_select(0, flat).view(batch, width * page_size, kv_heads, head_dim).transpose(1, 2)
    v = v_layer.index_select(0, flat).view(batch, width * page_size, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def attend_pages(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, chosen: torch.Tensor,
                 plan, scale: float, virtual_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the sparse rows' q [Bs, H, d] over the chosen logical pages [Bs, kv_heads, k]
    of each KV head, read straight from the paged cache -> [Bs, H, d]. plan: a selector's plan
    with sparse_pages [Bs, P], slot, slot_head and sparse_lengths [Bs, 1, 1] (QuestPlan's fields).
    virtual_lengths [Bs, kv_heads]: each head reads only the first that many tokens of its chosen
    pages (ascending pages whose last is the row's own: the same tokens as the positions' mask,
    and nothing of a row's padding past a head's own count)."""
    batch, heads, head_dim = q.shape
    page_size, kv_heads = k_layer.shape[1:3]
    group = heads // kv_heads
    physical = plan.sparse_pages.gather(1, chosen.flatten(1)).view_as(chosen)    # [Bs, kvh, k]
    # Flat row (page * page_size + slot) * kv_heads + head of the cache viewed as [-1, d].
    rows = (physical.unsqueeze(-1) * (page_size * kv_heads) + plan.slot_head).flatten()
    span = chosen.shape[-1] * page_size
    k = k_layer.view(-1, head_dim).index_select(0, rows).view(batch, kv_heads, span, head_dim)
    v = v_layer.view(-1, head_dim).index_select(0, rows).view(batch, kv_heads, span, head_dim)
    if virtual_lengths is None:
        positions = (chosen.unsqueeze(-1) * page_size + plan.slot).view(batch, kv_heads, 1, span)
        mask = positions < plan.sparse_lengths.unsqueeze(-1)                     # [Bs, kvh, 1, span]
    else:
        mask = (torch.arange(span, device=q.device) < virtual_lengths.unsqueeze(-1)).unsqueeze(2)
    qg = q.view(batch, kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, head_dim)


def counted_all_dense(plan, meta: AttentionMetadata) -> bool:
    """Add a sparse layer's page counts (the plan's) to the step's stats; True when every decode row
    is within the budget, so the layer is exactly dense decode."""
    meta.stats.pages_read += plan.pages_read
    meta.stats.pages_skipped += plan.pages_skipped
    return plan.all_dense


def merge_dense_rows(q: torch.Tensor, sparse_out: torch.Tensor, cache: PagedKVCache, layer: int,
                     meta: AttentionMetadata, rows, scale: float, fused: bool) -> torch.Tensor:
    """The whole batch's output: the sparse rows' sparse_out beside the dense rows attended densely
    (rows: a RowSplit or a plan with its fields: sparse_rows, dense_rows, dense_pages, dense_mask)."""
    if not len(rows.dense_rows):
        return sparse_out
    out = torch.empty_like(q)
    out[rows.sparse_rows] = sparse_out
    if fused:
        out[rows.dense_rows] = torch.ops.radixgate_cpu.paged_decode_attention(
            q[rows.dense_rows], cache.k_slots[layer], cache.v_slots[layer], rows.dense_pages.contiguous(),
            meta.decode_lengths[rows.dense_rows], cache.page_size, scale)
    else:
        out[rows.dense_rows] = dense_rows_attention(q[rows.dense_rows], cache.k[layer], cache.v[layer],
                                                    rows.dense_pages, rows.dense_mask, scale)
    return out
