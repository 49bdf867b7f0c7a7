"""The plain attention backend: torch ops only, the reference the others are tested against.

Layout and semantics are those of kernels/reference.py; this module only batches the work: the
metadata (attention/torch_metadata.py) is built once per step and reused by every layer.
Prefill/extend chunks attend one sequence at a time (SDPA); single-token decodes are batched (a
gather by flat slot, then one SDPA). Summaries: attention/summaries.py; Quest sparse decode:
attention/sparse.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.cuda.attention import centroids
from backends.cuda.attention import sparse as quest
from backends.cuda.attention.base import AttentionBackend
from backends.cuda.attention.summaries import write_kv_and_summaries
from backends.cuda.attention.torch_metadata import AttentionMetadata, PrefillSeq, build_metadata
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.layout import StepLayout
from backends.head_budgets import head_groups


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
    # Quest page selection (attention/sparse.py's interface): the engine's rule; benches may set
    # another on an instance to compare rules through the same decode path.
    page_selector = staticmethod(quest.choose_pages)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sparse is not None and self.sparse.selector == "centroids":     # chosen once, here
            self.sparse_decode = centroids.centroid_decode_attention
            head_groups(self.sparse, self.cache.k.shape[0], self.shape.kv_heads)   # a table that does not fit: here

    def sparse_decode(self, q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                      scale: float, dense_decode, fused: bool) -> torch.Tensor:
        """A sparse layer's decode rows: Quest's pages (page_selector's), or with the centroid
        selector centroids.centroid_decode_attention (set on the instance at construction)."""
        return quest.sparse_decode_attention(q, cache, layer, meta, scale, dense_decode, fused, self.page_selector)

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
        out = attend(layer, qk[:, :heads], self.cache, self.meta, self.shape.scale, self.sparse_layer(layer),
                     sparse_decode=self.sparse_decode)
        return out.reshape(tokens, heads * d)


def attend(layer: int, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, scale: float,
           sparse_layer: bool, dense_decode=None, fused_sparse: bool = False, sparse_decode=None) -> torch.Tensor:
    """Attention of q: [T, H, d] over the cache, this batch's K/V already written -> [T, H, d].

    dense_decode: the decode function (decode_attention here; the CPU kernel in cpu_fused.py);
    sparse_decode: a sparse layer's (TorchAttention.sparse_decode; default Quest's engine rule);
    prefill chunks always run SDPA.
    """
    dense_decode = dense_decode or decode_attention
    sparse_decode = sparse_decode or quest.sparse_decode_attention
    if meta.decode_only:        # rows are exactly the decode rows, in order: no gather / scatter
        if sparse_layer:
            return sparse_decode(q, cache, layer, meta, scale, dense_decode, fused_sparse)
        return dense_decode(q, cache, layer, meta, scale)
    out = torch.empty_like(q)
    for seq in meta.prefill:
        rows = slice(seq.offset, seq.offset + seq.length)
        out[rows] = prefill_attention(q[rows], cache, layer, seq, scale)
    if meta.decode_rows.numel():
        q_decode = q[meta.decode_rows]
        if sparse_layer:
            out[meta.decode_rows] = sparse_decode(q_decode, cache, layer, meta, scale, dense_decode, fused_sparse)
        else:
            out[meta.decode_rows] = dense_decode(q_decode, cache, layer, meta, scale)
    return out
