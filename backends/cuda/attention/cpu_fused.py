"""The CPU attention backend: the C++ ops of kernels/cpu/fused.cpp around the torch metadata.

Rotary and the K/V write are one op (rotary_store); attention reads keys straight from the pages
(no gather, no padding mask). Decode-only steps run paged_decode_attention; steps with prefill
chunks run paged_prefill_attention over every row, which computes each row exactly as a decode of
the same length would, so a token's output (and the K/V the next layers write from it) does not
depend on how its prompt was chunked, on what it is batched with, or on whether its prefix came
from the radix cache (docs/cpu.md, "Batch invariance"). Quest sparse decode scores pages and
attends the chosen ones with the same kernels (decode rows only: prefill stays dense).
"""
from __future__ import annotations

import torch

from backends.cuda.attention.summaries import update_summaries
from backends.cuda.attention.torch_attention import TorchAttention, attend
from backends.cuda.attention.torch_metadata import AttentionMetadata
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.layout import StepLayout


def fused_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    """Dense decode in one CPU kernel: each query reads its keys straight from its pages, float32
    softmax; q may be a strided view of the fused qkv rows."""
    return torch.ops.radixgate_cpu.paged_decode_attention(
        q, cache.k_slots[layer], cache.v_slots[layer], meta.decode_pages, meta.decode_lengths,
        cache.page_size, scale)


class CpuFusedAttention(TorchAttention):
    name = "cpu_fused"

    def plan(self, layout: StepLayout) -> None:
        super().plan(layout)
        # Every row's sequence and key count, for paged_prefill_attention (steps with prefill chunks).
        self.row_tables = self.row_seq = self.key_counts = None
        if not self.meta.decode_only:
            page_size, chunks = self.cache.page_size, layout.host_chunks
            tables = [table[:-(-(start + count) // page_size)] for start, count, table in chunks]
            width = max(len(table) for table in tables)
            self.row_tables = torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
            lengths = torch.tensor([count for _, count, _ in chunks])
            self.row_seq = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
            self.key_counts = layout.positions + 1

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        tokens, q_size = qkv.shape[0], heads * d
        # rotates q and k in place in qkv and writes k, v into their slots
        torch.ops.radixgate_cpu.rotary_store(qkv, self.layout.positions, self.cos, self.sin, heads, kv_heads,
                                             self.cache.k_slots[layer], self.cache.v_slots[layer], self.meta.slots)
        if self.cache.kmin is not None:
            update_summaries(self.cache, layer, qkv[:, q_size:q_size + kv_heads * d].view(tokens, kv_heads, d),
                             self.meta)
        q = qkv[:, :q_size].view(tokens, heads, d)
        sparse, meta = self.sparse_layer(layer), self.meta
        if self.row_seq is None:            # decode rows only
            out = attend(layer, q, self.cache, meta, self.shape.scale, sparse,
                         dense_decode=fused_decode_attention, fused_sparse=True, sparse_decode=self.sparse_decode)
            return out.reshape(tokens, q_size)
        # Prefill is dense in every layer (as its decode twin would be below the budget); in a
        # sparse layer only the step's decode rows take Quest's pages.
        out = torch.ops.radixgate_cpu.paged_prefill_attention(
            q, self.cache.k_slots[layer], self.cache.v_slots[layer], self.row_tables, self.row_seq,
            self.key_counts, self.cache.page_size, self.shape.scale)
        if sparse and meta.decode_rows.numel():
            out[meta.decode_rows] = self.sparse_decode(q[meta.decode_rows], self.cache, layer, meta,
                                                       self.shape.scale, fused_decode_attention, True)
        return out.reshape(tokens, q_size)
