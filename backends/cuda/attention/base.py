"""The attention-backend interface, and the start-up choice between its implementations.

A backend owns what one layer's attention does with the fused QKV projection: rotate q and k,
write k and v (and the pages' key summaries when sparse decode is on) into the paged cache, and
attend. `plan` runs once per step with the step's layout; `forward` runs per layer and reads only
what plan kept, so a graph-safe backend (no host syncs in forward) can be captured in a CUDA graph
after one plan over static buffers.

Implementations: `torch` (plain ops: the reference), `cpu_fused` (kernels/cpu C++ ops), `triton`
(kernels/triton, CUDA); attention/factory.py chooses one at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.base import SparseSettings
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.layout import StepLayout


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


class AttentionBackend:
    """Base of the attention backends: holds the cache, the rotary tables and the sparse settings."""

    name = "base"
    graph_safe = False        # forward() may be captured in a CUDA graph after plan()

    def __init__(self, cache: PagedKVCache, shape: AttentionShape, cos: torch.Tensor, sin_signed: torch.Tensor,
                 sparse: SparseSettings | None):
        self.cache, self.shape = cache, shape
        self.cos, self.sin = cos, sin_signed      # [max_positions, head_dim], activation dtype
        self.sparse = sparse
        self.layout: StepLayout | None = None

    def plan(self, layout: StepLayout) -> None:
        self.layout = layout

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [T, (heads + 2 kv_heads) * d] (rotated in place) -> attention output [T, heads * d]."""
        raise NotImplementedError

    def sparse_layer(self, layer: int) -> bool:
        return self.sparse is not None and layer >= self.sparse.dense_layers
