"""The Triton attention backend (CUDA; on CPU only under TRITON_INTERPRET=1, as tests run it).

Per layer: one kernel rotates q and k in place and writes k, v into their slots
(kernels/triton/layer_ops.rotary_store); with Quest sparse decode on, one kernel refreshes the key
summaries (blocks and whole pages) of the touched pages; then the decode rows [0, num_decode) run
split-K paged decode (dense, or sparse past the dense layers: Quest, or the centroid selector,
whose summaries the runner writes after the step) and the extend rows run the varlen extend
kernel, both writing into one output. forward() never syncs with the host, so after one plan()
over the static buffers of a batch-size bucket it is captured in a CUDA graph (backends/cuda/graphs.py).
"""
from __future__ import annotations

import torch

from backends.base import SparseSettings
from backends.cuda.attention.base import AttentionBackend
from backends.cuda.layout import StepLayout, graph_batch
from backends.head_budgets import head_groups
from kernels.centroid_reference import CentroidShortlist
from kernels.reference import sparse_page_counts
from kernels.triton import extend_attention, paged_decode, sparse_decode, update_page_summaries
from kernels.triton.centroids import HeadBudgets, centroid_sparse_decode
from kernels.triton.decode import default_num_splits, interpreting
from kernels.triton.layer_ops import rotary_store


class TritonAttention(AttentionBackend):
    name = "triton"
    graph_safe = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sparse is not None and self.sparse.selector == "centroids":     # chosen once, here
            self.sparse_decode = self._centroid_decode
            self.head_budgets: dict[SparseSettings, dict] = {}
            self._layer_head_budgets(self.sparse)       # a table that does not fit the model fails here

    def plan(self, layout: StepLayout) -> None:
        super().plan(layout)
        nd = layout.num_decode
        self.decode_tables, self.decode_lens = layout.tables[:nd], layout.seq_lens[:nd]
        self.extend_tables, self.extend_starts = layout.tables[nd:], layout.starts[nd:]
        self.max_new = max(layout.max_new_tokens, 1)      # bounds the summary kernel's grid
        # Split-K splits planned for the graph bucket of the decode rows, so that a row's numbers
        # are the same replayed in a graph or run eagerly (a split's range depends on it).
        device, kv_heads, page_size = layout.tables.device, self.shape.kv_heads, self.cache.page_size
        padded = graph_batch(nd) if nd else 1
        self.dense_splits = default_num_splits(padded, kv_heads, layout.tables.shape[1] * page_size, device)
        if self.sparse is not None:
            if self.sparse.selector == "centroids":     # the launcher's choices, made for the bucket
                self.centroid_tuning = dict(planned_batch=padded)
            else:
                budget, _, _ = sparse_page_counts(page_size, self.sparse.token_budget, self.sparse.sink_tokens,
                                                  self.sparse.recent_tokens)
                self.sparse_splits = default_num_splits(padded, kv_heads, budget * page_size, device, min_blocks=2)

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        layout, cache = self.layout, self.cache
        tokens, q_size = qkv.shape[0], heads * d
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        rotary_store(qkv, layout.positions, self.cos, self.sin, heads, kv_heads,
                     cache.k_slots[layer], cache.v_slots[layer], layout.slots)
        if cache.kmin is not None:
            update_page_summaries(cache.kmin[layer], cache.kmax[layer], k_cache, layout.tables,
                                  layout.starts, layout.seq_lens, self.max_new, cache.pmin[layer], cache.pmax[layer])
        q = qkv[:, :q_size].view(tokens, heads, d)
        out = torch.empty(tokens, heads, d, dtype=qkv.dtype, device=qkv.device)
        nd = layout.num_decode
        if nd:
            if self.sparse_layer(layer):
                self.sparse_decode(layer, q[:nd], out[:nd])
            else:
                paged_decode(q[:nd], k_cache, v_cache, self.decode_tables, self.decode_lens, self.shape.scale,
                             num_splits=self.dense_splits, out=out[:nd])
        if nd < len(layout.host_chunks):
            extend_attention(q[nd:], k_cache, v_cache, self.extend_tables, layout.extend_cu, self.extend_starts,
                             self.shape.scale, max_new_tokens=layout.max_new_tokens, out=out[nd:])
        return out.view(tokens, q_size)

    def sparse_decode(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """A sparse layer's decode rows by Quest (kernels/triton/sparse.py), into out."""
        s, cache = self.sparse, self.cache
        sparse_decode(q, cache.k[layer], cache.v[layer], cache.kmin[layer], cache.kmax[layer], self.decode_tables,
                      self.decode_lens, s.token_budget, s.sink_tokens, s.recent_tokens, self.shape.scale,
                      num_splits=self.sparse_splits, out=out, pmin=cache.pmin[layer], pmax=cache.pmax[layer],
                      shortlist_tokens=s.shortlist_tokens)

    def _layer_head_budgets(self, sparse: SparseSettings) -> dict[int, tuple[int, HeadBudgets]]:
        """With a budget per (layer, KV head) (backends/head_budgets.py): per sparse layer the
        launcher's budget_tokens (its largest head's) and its HeadBudgets, put on the device once
        per settings (a server's never change; benches swap settings between forwards)."""
        if sparse not in self.head_budgets:
            table = head_groups(sparse, self.cache.k.shape[0], self.shape.kv_heads)
            span, device = sparse.group_tokens, self.cache.k.device
            self.head_budgets[sparse] = {} if table is None else {
                layer: (max(counts) * span, HeadBudgets(torch.tensor(counts, dtype=torch.int32, device=device),
                                                        table.fewest))
                for layer, counts in table.per_layer.items()}
        return self.head_budgets[sparse]

    def _centroid_decode(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """The same by the centroid selector (kernels/triton/centroids.py); its summaries are
        written by the runner after each step (attention/centroids.write_group_summaries). With a
        budget per KV head, each layer's own counts (its largest head sizes the launch)."""
        s, cache = self.sparse, self.cache
        shortlist = None if cache.run_cents is None else CentroidShortlist(
            cache.run_cents[layer], cache.run_cstats[layer], cache.run_pages, s.shortlist_tokens)
        budget_tokens, heads = self._layer_head_budgets(s).get(layer, (s.token_budget, None))
        centroid_sparse_decode(q, cache.k[layer], cache.v[layer], cache.cents[layer], cache.cstats[layer],
                               self.decode_tables, self.decode_lens, budget_tokens, s.sink_tokens,
                               s.recent_tokens, cache.group_pages, self.shape.scale, interpreted=interpreting(),
                               out=out, shortlist=shortlist, head_budgets=heads, **self.centroid_tuning)
