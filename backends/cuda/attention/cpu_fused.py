"""The CPU attention backend: the C++ ops of kernels/cpu/fused.cpp around the torch metadata.

Rotary and the K/V write are one op (rotary_store); decode attention reads keys straight from the
pages (no gather, no padding mask); Quest sparse decode scores pages and attends the chosen ones
with the same kernels. Prefill chunks run SDPA as in the torch backend.
"""
from __future__ import annotations

import torch

from backends.cuda.attention.summaries import update_summaries
from backends.cuda.attention.torch_attention import TorchAttention, attend
from backends.cuda.attention.torch_metadata import AttentionMetadata
from backends.cuda.kv_cache import PagedKVCache


def fused_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    """Dense decode in one CPU kernel: each query reads its keys straight from its pages, float32
    softmax; q may be a strided view of the fused qkv rows."""
    return torch.ops.radixgate_cpu.paged_decode_attention(
        q, cache.k_slots[layer], cache.v_slots[layer], meta.decode_pages, meta.decode_lengths,
        cache.page_size, scale)


class CpuFusedAttention(TorchAttention):
    name = "cpu_fused"

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
        out = attend(layer, q, self.cache, self.meta, self.shape.scale, self.sparse_layer(layer),
                     dense_decode=fused_decode_attention, fused_sparse=True, page_selector=self.page_selector)
        return out.reshape(tokens, q_size)
