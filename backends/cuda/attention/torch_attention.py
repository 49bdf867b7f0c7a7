"""The plain attention backend: torch ops only, the reference the others are tested against.

Layout and semantics are those of kernels/reference.py; this module only batches the work: the
metadata (slots, touched pages, decode page tables) is built once per step and reused by every
layer. Prefill/extend chunks attend one sequence at a time (SDPA); single-token decodes are
batched (a gather by flat slot, then one SDPA). Quest sparse decode: attention/sparse.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backends.base import AttentionStats, SparseSettings
from backends.cuda.attention import sparse as quest
from backends.cuda.attention.base import AttentionBackend
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.layout import StepLayout


@dataclass
class PrefillSeq:
    """One sequence attending more than one new token (prefill or extend)."""

    offset: int                 # first row of its tokens in the flattened batch
    start: int                  # tokens already cached before this chunk
    length: int                 # new tokens
    page_table: torch.Tensor    # long, pages covering [0, start + length)


@dataclass
class AttentionMetadata:
    """Everything the layers need about the batch layout, built once per forward."""

    slots: torch.Tensor                  # [T] flat slot (page * page_size + offset) of each new token
    slot_list: list[int]                 # the same on the host (summary indices derive from it)
    summary_pages: torch.Tensor          # [S] pages touched by this batch
    summary_filled: torch.Tensor         # [S] written slots of each touched page after the batch
    prefill: list[PrefillSeq]
    decode_rows: torch.Tensor            # [B] rows of single-token sequences in the flattened batch
    decode_pages: torch.Tensor           # [B, P] their page tables, padded with page 0
    decode_mask: torch.Tensor            # [B, 1, 1, P * page_size] True where the key is attended
    decode_lengths: torch.Tensor         # [B] sequence length including the new token
    sparse: SparseSettings | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Fast-path extras (the fields above keep their meaning for sparse_attention.py):
    decode_only: bool = False            # every chunk is one new token, each on a page of its own
    decode_max_length: int = 0           # max(decode_lengths), known on the host
    decode_slot_index: torch.Tensor | None = None   # flat key slots of the decodes, built lazily
    summary_plan: SummaryPlan | None = None         # how this batch updates summaries, built lazily


def build_metadata(chunks: list[tuple[int, int, list[int]]], page_size: int,
                   device: torch.device | str, sparse: SparseSettings | None = None
                   ) -> AttentionMetadata:
    """chunks: (start_position, new_tokens, page_table) per sequence, in batch order."""
    slots, pages, filled, prefill = [], [], [], []
    decode_rows, decode_tables, decode_lengths = [], [], []
    offset = 0
    for start, length, table in chunks:
        end = start + length
        for pos in range(start, end):
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        for logical in range(start // page_size, -(-end // page_size)):
            pages.append(table[logical])
            filled.append(min(page_size, end - logical * page_size))
        used = table[:-(-end // page_size)]
        if length == 1:
            decode_rows.append(offset)
            decode_tables.append(used)
            decode_lengths.append(end)
        else:
            prefill.append(PrefillSeq(offset, start, length,
                                      torch.tensor(used, dtype=torch.long, device=device)))
        offset += length
    width = max((len(t) for t in decode_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in decode_tables]
    lengths = torch.tensor(decode_lengths, dtype=torch.long)
    mask = torch.arange(width * page_size).unsqueeze(0) < lengths.unsqueeze(1)

    def as_long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    # All single-token chunks on distinct pages: summaries update in place (min/max with the new key).
    decode_only = not prefill and len(set(pages)) == len(pages)
    return AttentionMetadata(
        slots=as_long(slots), slot_list=slots, summary_pages=as_long(pages),
        summary_filled=as_long(filled), prefill=prefill, decode_rows=as_long(decode_rows),
        decode_pages=torch.tensor(padded, dtype=torch.long, device=device).view(len(padded), width),
        decode_mask=mask.view(len(padded), 1, 1, width * page_size).to(device),
        decode_lengths=lengths.to(device), sparse=sparse, decode_only=decode_only,
        decode_max_length=max(decode_lengths, default=0))


@dataclass
class SummaryPlan:
    """How one forward updates the key summaries, the same for every layer (built once).

    Decode-only batches fold each new key into its block's summary in place: `blocks` [T] are the
    flat block rows (page * blocks_per_page + slot // summary_tokens, i.e. slot // summary_tokens),
    `opens_block` [T, 1, 1] says the key is the block's first, and `opened_pages` lists the pages a
    key opens at slot 0, whose blocks are all zeroed first (a recycled page keeps nothing of its
    previous owner). Other batches recompute every block of every touched page from the cache:
    `unwritten` [S, blocks, summary_tokens, 1, 1] marks slots at or past `summary_filled`, and
    `empty` [S, blocks, 1, 1] blocks with no written slot (their summary is 0).
    """

    summary_tokens: int
    blocks: torch.Tensor | None = None
    opens_block: torch.Tensor | None = None
    opened_pages: torch.Tensor | None = None
    unwritten: torch.Tensor | None = None
    empty: torch.Tensor | None = None


def make_summary_plan(meta: AttentionMetadata, page_size: int, summary_tokens: int) -> SummaryPlan:
    device = meta.slots.device
    plan = SummaryPlan(summary_tokens)
    if meta.decode_only:
        slots = meta.slot_list
        plan.blocks = torch.tensor([s // summary_tokens for s in slots], dtype=torch.long, device=device)
        plan.opens_block = torch.tensor([s % summary_tokens == 0 for s in slots], dtype=torch.bool,
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
    else:
        _recompute_touched_pages(cache, layer, meta, plan)


def _fold_new_keys(kmin: torch.Tensor, kmax: torch.Tensor, k: torch.Tensor, plan: SummaryPlan) -> None:
    """One new key per page (so per block): the block's summary over its written slots is the old
    one (exact over the slots before the new key) folded with the key, or the key alone when it
    opens the block. kmin, kmax: one layer's [pages, blocks, kv_heads, d]."""
    if plan.opened_pages is not None:
        kmin.index_fill_(0, plan.opened_pages, 0)
        kmax.index_fill_(0, plan.opened_pages, 0)
    flat_min, flat_max = kmin.view(-1, *kmin.shape[2:]), kmax.view(-1, *kmax.shape[2:])
    rows, first = plan.blocks, plan.opens_block
    flat_min.index_copy_(0, rows, torch.where(first, k, torch.minimum(flat_min.index_select(0, rows), k)))
    flat_max.index_copy_(0, rows, torch.where(first, k, torch.maximum(flat_max.index_select(0, rows), k)))


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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool, scale: float) -> torch.Tensor:
    """q: [B, H, n, d], k/v: [B, kv_heads, L, d] -> [B, H, n, d]; grouped-query heads share k/v."""
    # enable_gqa (torch >= 2.5) beats repeat_interleave on CPU: 4x for one decode, 10x batched.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=True)


def prefill_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, seq: PrefillSeq,
                      scale: float) -> torch.Tensor:
    """Causal attention of one chunk's queries [n, H, d] over its cached prefix and itself."""
    total = seq.start + seq.length
    k = cache.k[layer][seq.page_table].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
    v = cache.v[layer][seq.page_table].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)
    if seq.start == 0:
        out = _sdpa(q, k, v, None, True, scale)
    else:
        query_pos = torch.arange(seq.start, total, device=q.device).unsqueeze(1)
        mask = torch.arange(total, device=q.device).unsqueeze(0) <= query_pos
        out = _sdpa(q, k, v, mask, False, scale)
    return out[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """Dense attention of B single-token queries [B, H, d], each over its own pages.

    Keys are gathered by flat slot: one index_select per tensor (3-5x cheaper than indexing by page
    table on CPU), the index built once per forward; one stream attends its exact length unmasked.
    """
    batch, width = meta.decode_pages.shape
    kv_heads, d = cache.k.shape[3:]
    if meta.decode_slot_index is None:
        meta.decode_slot_index = _decode_slot_index(meta, cache.page_size)
    index = meta.decode_slot_index
    length = index.shape[0] // batch
    k = cache.k_slots[layer].index_select(0, index).view(batch, length, kv_heads, d)
    v = cache.v_slots[layer].index_select(0, index).view(batch, length, kv_heads, d)
    mask = meta.decode_mask[..., :length] if batch > 1 else None
    out = _sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask, False, scale)
    return out.squeeze(2)


def _decode_slot_index(meta: AttentionMetadata, page_size: int) -> torch.Tensor:
    """Flat slots [B * L] of every decode sequence's keys, L = the longest one (shorter: padded)."""
    batch, width = meta.decode_pages.shape
    length = meta.decode_max_length if batch == 1 else width * page_size
    offsets = torch.arange(page_size, device=meta.decode_pages.device)
    slots = (meta.decode_pages.unsqueeze(2) * page_size + offsets).view(batch, width * page_size)
    return slots[:, :length].reshape(-1)


def rotate_qk(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
              heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """q and k heads of the fused qkv rows, rotated (rotate_half convention) -> [T, heads + kv_heads, d].

    rotate_half(x) * sin == swap_halves(x) * sin_signed, and swapping the halves is a flip of a
    [2, half] view: one kernel instead of roll's slice + cat.
    """
    tokens, qk_heads, half = qkv.shape[0], heads + kv_heads, head_dim // 2
    qk = qkv[:, :qk_heads * head_dim].view(tokens, qk_heads, head_dim)
    swapped = qk.view(tokens, qk_heads, 2, half).flip(2).view(tokens, qk_heads, head_dim)
    return torch.addcmul(qk * cos[positions].unsqueeze(1), swapped, sin_signed[positions].unsqueeze(1))


class TorchAttention(AttentionBackend):
    """Rotary, KV write, summaries and attention in plain torch ops (any device)."""

    name = "torch"

    def plan(self, layout: StepLayout) -> None:
        super().plan(layout)
        self.meta = build_metadata(layout.host_chunks, self.cache.page_size, layout.positions.device,
                                   self.sparse)
        self.meta.slots = layout.slots

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        tokens = qkv.shape[0]
        qk = rotate_qk(qkv, self.layout.positions, self.cos, self.sin, heads, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d:].view(tokens, kv_heads, d)
        write_kv_and_summaries(self.cache, layer, qk[:, heads:], v, self.meta)
        out = attend(layer, qk[:, :heads], self.cache, self.meta, self.shape.scale, self.sparse_layer(layer))
        return out.reshape(tokens, heads * d)


def attend(layer: int, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, scale: float,
           sparse_layer: bool, dense_decode=None, fused_sparse: bool = False) -> torch.Tensor:
    """Attention of q: [T, H, d] over the cache, this batch's K/V already written -> [T, H, d].

    dense_decode: the decode function (decode_attention here; the CPU kernel in cpu_fused.py);
    prefill chunks always run SDPA.
    """
    dense_decode = dense_decode or decode_attention
    if meta.decode_only:        # rows are exactly the decode rows, in order: no gather / scatter
        if sparse_layer:
            return quest.sparse_decode_attention(q, cache, layer, meta, scale, dense_decode, fused_sparse)
        return dense_decode(q, cache, layer, meta, scale)
    out = torch.empty_like(q)
    for seq in meta.prefill:
        rows = slice(seq.offset, seq.offset + seq.length)
        out[rows] = prefill_attention(q[rows], cache, layer, seq, scale)
    if meta.decode_rows.numel():
        q_decode = q[meta.decode_rows]
        if sparse_layer:
            out[meta.decode_rows] = quest.sparse_decode_attention(q_decode, cache, layer, meta, scale,
                                                                  dense_decode, fused_sparse)
        else:
            out[meta.decode_rows] = dense_decode(q_decode, cache, layer, meta, scale)
    return out
