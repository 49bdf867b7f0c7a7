"""Quest sparse decode for the torch backend (placeholder until implemented: dense, counted as read)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from backends.cuda.attention import AttentionMetadata, PagedKVCache


def sparse_decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    from backends.cuda.attention import decode_attention
    return decode_attention(q, cache, layer, meta, scale)
