"""Quest key summaries kept up to date in torch ops (torch and cpu_fused backends): each page's
per-block key min/max, and its page summary (min/max over the whole page), after this step's keys
are written (kernels/reference.update_page_summaries)."""
from __future__ import annotations

import torch

from backends.cuda.attention.torch_metadata import AttentionMetadata, SummaryPlan
from backends.cuda.kv_cache import PagedKVCache


def make_summary_plan(meta: AttentionMetadata, page_size: int, summary_tokens: int) -> SummaryPlan:
    device = meta.slots.device
    plan = SummaryPlan(summary_tokens)
    if meta.decode_only:
        slots = meta.slot_list
        plan.blocks = torch.tensor([s // summary_tokens for s in slots], dtype=torch.long, device=device)
        plan.opens_block = torch.tensor([s % summary_tokens == 0 for s in slots], dtype=torch.bool,
                                        device=device).view(-1, 1, 1)
        plan.page_rows = torch.tensor([s // page_size for s in slots], dtype=torch.long, device=device)
        plan.opens_page = torch.tensor([s % page_size == 0 for s in slots], dtype=torch.bool,
                                       device=device).view(-1, 1, 1)
        opened = [s // page_size for s in slots if s % page_size == 0]
        if opened:                              # known on the host: no op at all on most steps
            plan.opened_pages = torch.tensor(opened, dtype=torch.long, device=device)
        return plan
    blocks = page_size // summary_tokens
    slot = torch.arange(page_size, device=device)
    unwritten = slot.unsqueeze(0) >= meta.summary_filled.unsqueeze(1)                # [S, page]
    plan.unwritten = unwritten.view(-1, blocks, summary_tokens, 1, 1)
    plan.empty = plan.unwritten.all(dim=2)
    return plan


def write_kv_and_summaries(cache: PagedKVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
                           meta: AttentionMetadata) -> None:
    """Store new k, v: [T, kv_heads, d] and, when the cache keeps summaries, bring every block
    summary of every touched page to its exact value (reference.update_page_summaries).

    A page is always written from slot 0 first, and its blocks are all rewritten then (zeros for
    those not yet written), so no summary keeps values of an earlier owner of the page.
    """
    k_slots, v_slots = cache.k_slots[layer], cache.v_slots[layer]
    k = k.to(k_slots.dtype)
    k_slots.index_copy_(0, meta.slots, k)
    v_slots.index_copy_(0, meta.slots, v.to(v_slots.dtype))
    update_summaries(cache, layer, k, meta)


def update_summaries(cache: PagedKVCache, layer: int, k: torch.Tensor, meta: AttentionMetadata) -> None:
    """Bring the block summaries of every page this batch touched up to date, once its new keys
    k: [T, kv_heads, d] (in the cache's dtype) are in the cache. Nothing when there are none."""
    if cache.kmin is None:                  # sparse attention off: nobody reads summaries
        return
    plan = meta.summary_plan
    if plan is None:
        plan = meta.summary_plan = make_summary_plan(meta, cache.page_size, cache.summary_tokens)
    assert plan.summary_tokens == cache.summary_tokens, "metadata was planned for another cache"
    if meta.decode_only:
        _fold_new_keys(cache.kmin[layer], cache.kmax[layer], k, plan)
        _fold(cache.pmin[layer], cache.pmax[layer], k, plan.page_rows, plan.opens_page)
    else:
        _recompute_touched_pages(cache, layer, meta, plan)


def _fold_new_keys(kmin: torch.Tensor, kmax: torch.Tensor, k: torch.Tensor, plan: SummaryPlan) -> None:
    """One new key per page (so per block): the block's summary over its written slots is the old
    one (exact over the slots before the new key) folded with the key, or the key alone when it
    opens the block. kmin, kmax: one layer's [pages, blocks, kv_heads, d]."""
    if plan.opened_pages is not None:
        kmin.index_fill_(0, plan.opened_pages, 0)
        kmax.index_fill_(0, plan.opened_pages, 0)
    _fold(kmin.view(-1, *kmin.shape[2:]), kmax.view(-1, *kmax.shape[2:]), k, plan.blocks, plan.opens_block)


def _fold(lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, first: torch.Tensor) -> None:
    """Summary rows lo/hi [rows, kv_heads, d] folded with one new key each: the key alone where it
    is the first of its block or page (`first`), else the element-wise min/max with it."""
    lo.index_copy_(0, rows, torch.where(first, k, torch.minimum(lo.index_select(0, rows), k)))
    hi.index_copy_(0, rows, torch.where(first, k, torch.maximum(hi.index_select(0, rows), k)))


def _recompute_touched_pages(cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                             plan: SummaryPlan) -> None:
    """Every block of every touched page from the keys in the cache: min/max over the written
    slots [0, filled) of the page, 0 for a block with none."""
    pages = meta.summary_pages
    blocks = cache.kmin.shape[2]
    keys = cache.k[layer][pages]                                                 # [S, page, kvh, d]
    keys = keys.view(len(pages), blocks, cache.summary_tokens, *keys.shape[2:])  # [S, blocks, sub, kvh, d]
    lo = keys.masked_fill(plan.unwritten, float("inf")).amin(dim=2).masked_fill(plan.empty, 0)
    hi = keys.masked_fill(plan.unwritten, float("-inf")).amax(dim=2).masked_fill(plan.empty, 0)
    cache.kmin[layer][pages] = lo
    cache.kmax[layer][pages] = hi
    # The page summary over its written blocks (a touched page has at least one).
    cache.pmin[layer][pages] = lo.masked_fill(plan.empty, float("inf")).amin(dim=1)
    cache.pmax[layer][pages] = hi.masked_fill(plan.empty, float("-inf")).amax(dim=1)
