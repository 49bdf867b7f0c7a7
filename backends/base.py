"""The backend contract: what the engine hands a model runner each step, and what it gets back.

The engine speaks only plain Python and NumPy here: it knows nothing of torch or mlx. A backend
knows nothing of HTTP, requests or the radix tree: it sees token ids, positions and page tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: new tokens to run, appended after `start_position` cached ones."""

    token_ids: list[int]          # tokens whose KV this step computes and writes
    start_position: int           # tokens of this sequence already in its KV pages
    page_table: list[int]         # page ids covering positions [0, start_position + len(token_ids))
    want_logits: bool = True      # return logits for the last new token

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass
class ForwardBatch:
    """Prefill chunks and decode tokens of many sequences, run in one forward pass."""

    sequences: list[SequenceChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass
class AttentionStats:
    """Counters of the sparse decode path, summed over layers that could have been sparse."""

    pages_read: int = 0
    pages_skipped: int = 0


@dataclass
class ForwardResult:
    """Logits (float32, [sequences wanting logits, vocab], in batch order) and attention stats."""

    logits: np.ndarray
    attention: AttentionStats = field(default_factory=AttentionStats)


@dataclass(frozen=True)
class BackendInfo:
    """What start-up logs and /health report about a loaded backend."""

    model_name: str
    backend: str          # cpu | cuda | mlx
    device: str           # e.g. "cpu (2 threads)", "NVIDIA H100"
    dtype: str            # the weight dtype actually in use
    num_pages: int
    page_size: int
    context_length: int
    vocab_size: int


class Backend(Protocol):
    """A model runner that owns the KV pages and computes logits for a ForwardBatch."""

    page_size: int
    num_pages: int
    info: BackendInfo

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Run new tokens of each sequence, write their K/V (and page summaries) into the pages."""
        ...


@dataclass(frozen=True)
class SparseSettings:
    """Quest decode settings in tokens (kernels/reference.py says how they round to pages).

    summary_tokens: tokens per key min/max summary; it divides the page size, so each page keeps
    page_size // summary_tokens summaries. Pages are still what is selected and read.
    """

    enabled: bool = False
    token_budget: int = 2048
    dense_layers: int = 2
    sink_tokens: int = 16
    recent_tokens: int = 64
    summary_tokens: int = 4


@dataclass(frozen=True)
class RunnerSettings:
    """Everything a backend needs to load a model and size its KV pages; plain data, no config objects."""

    source_kind: str                 # "gguf" | "hf"
    source_path: str                 # the .gguf file or the HF folder
    model_name: str
    dtype: str = "auto"              # auto | float32 | bfloat16 | float16 | int8
    device: str = "cpu"              # cpu | cuda
    page_size: int = 16
    num_pages: int | None = None     # None: sized from kv_memory_bytes
    kv_memory_bytes: int = 1 << 30
    context_length: int | None = None
    threads: int | None = None
    sparse: SparseSettings = SparseSettings()
