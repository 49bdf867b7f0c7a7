"""The Triton attention backend of `deterministic: true` (CUDA): every row, decode or prefill,
through the split-K decode kernel in its batch-invariant mode.

kernels/triton/decode.py with split_tokens > 0 splits a row's keys at fixed positions and merges
them in order, so a row's output depends only on its query, its keys and its length. Decode rows
run it as they are; prefill (extend) rows run it too, one query per row over its own sequence's
pages up to its own position (its K/V written first, as for a decode), instead of the extend
kernel, whose blocking follows the chunk. So a token's attention, and the K/V the next layers write
from it, is the same alone or batched, in a graph or eagerly, cold or after a cached prefix, in one
prefill chunk or many, and after preemption recomputes it. The price is prefill: each query reads
its keys itself (from L2 mostly) rather than a tile of queries sharing them.
"""
from __future__ import annotations

import torch

from backends.cuda.attention.triton_attention import TritonAttention
from backends.cuda.layout import StepLayout
from kernels.triton import paged_decode
from kernels.triton.layer_ops import rotary_store

SPLIT_TOKENS = 256      # keys per split, fixed: a multiple of the decode kernel's key block (64)


class InvariantTritonAttention(TritonAttention):
    name = "triton_invariant"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sparse is not None:
            raise ValueError("deterministic: true does not combine with sparse_attention (its page "
                             "choice follows the decode step, not the prefill)")

    def plan(self, layout: StepLayout) -> None:
        super().plan(layout)
        if layout.num_decode == len(layout.host_chunks):        # decode rows only: graphs capture this
            self.row_tables, self.row_lens, self.row_splits = self.decode_tables, self.decode_lens, None
            return
        # one query row per token: its sequence's table, keys up to and including its own position;
        # the grid's splits cover the longest row only (the table's capacity may be far longer)
        self.row_splits = -(-max(start + count for start, count, _ in layout.host_chunks) // SPLIT_TOKENS)
        lengths = torch.tensor([count for _, count, _ in layout.host_chunks])
        row_seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(layout.tables.device,
                                                                                  non_blocking=True)
        self.row_tables = layout.tables.index_select(0, row_seq)
        self.row_lens = (layout.positions + 1).to(torch.int32)

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        layout, cache = self.layout, self.cache
        tokens, q_size = qkv.shape[0], heads * d
        rotary_store(qkv, layout.positions, self.cos, self.sin, heads, kv_heads,
                     cache.k_slots[layer], cache.v_slots[layer], layout.slots)
        q = qkv[:, :q_size].view(tokens, heads, d)
        out = paged_decode(q, cache.k[layer], cache.v[layer], self.row_tables, self.row_lens, self.shape.scale,
                           split_tokens=SPLIT_TOKENS, num_splits=self.row_splits)
        return out.view(tokens, q_size)
