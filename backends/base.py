"""The backend contract: what the engine hands a model runner each step, and what it gets back.

The engine speaks only plain Python and NumPy here: it knows nothing of torch or mlx. A backend
knows nothing of HTTP, requests or the radix tree: it sees token ids, positions and page tables.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from backends.kv_store import KVStore
from backends.sampling_params import SampledToken, SamplingParams

# In a decode chunk: the token that the step before sampled for the same seq slot, whose id has not
# come back to the host yet. The backend reads it where it left it, on the device (overlap).
PENDING_TOKEN = -1


@dataclass(frozen=True)
class SampleSpec:
    """How the backend draws one sequence's next token, on its own device.

    uniform is the draw's random number in [0, 1), made by the engine from the request's seed and
    the token's index (sampling_params.draw_uniform), so a seed gives the same text cold, cached
    or batched. generated holds the output ids so far; it is read only when penalties are on.
    allowed: a grammar's bitmask of the tokens allowed next (int32 words, token t = bit t % 32 of
    word t // 32), built on the host; the backend sets every other token's logit to -inf.
    """

    params: SamplingParams
    uniform: float
    generated: Sequence[int] = ()
    allowed: np.ndarray | None = None


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: new tokens to run, appended after `start_position` cached ones."""

    token_ids: list[int]          # tokens whose KV this step computes and writes
    start_position: int           # tokens of this sequence already in its KV pages
    page_table: list[int]         # page ids covering positions [0, start_position + len(token_ids))
    seq_slot: int = 0             # the sequence's row in the backend's page-table store, [0, max_sequences)
    table_epoch: int = 0          # a new value whenever page_table changes other than by appending
    sample: SampleSpec | None = None   # draw the next token after the last new one (None: mid-prompt)

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass
class ForwardBatch:
    """Prefill chunks and decode tokens of many sequences, run in one forward pass."""

    sequences: list[SequenceChunk]
    return_logits: bool = False   # also return the raw logits of the sampled rows (tests, tools)

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
    """One entry per sequence that sampled, in batch order: its token, and its logprobs when asked.

    logits (float32 [sampled rows, vocab]) only with ForwardBatch.return_logits: full-vocabulary
    logits do not cross to the host in serving.
    """

    tokens: list[SampledToken]
    attention: AttentionStats = field(default_factory=AttentionStats)
    logits: np.ndarray | None = None


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


class PendingForward(Protocol):
    """A launched step; result() waits for it (the only host<-device sync of a step)."""

    def result(self) -> ForwardResult: ...


class Backend(Protocol):
    """A model runner that owns the KV pages and computes logits for a ForwardBatch."""

    page_size: int
    num_pages: int
    max_sequences: int            # seq slots: the most sequences one batch may hold
    overlap: bool                 # launch() returns before the device is done: build the next step meanwhile
    info: BackendInfo
    kv_store: KVStore | None      # page copies to and from the host tier (L2); None: no host tier

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Run new tokens of each sequence, write their K/V (and page summaries) into the pages,
        and draw the next token of every sequence with a SampleSpec."""
        ...

    def launch(self, batch: ForwardBatch) -> PendingForward:
        """forward(), queued: PENDING_TOKEN chunks read the draw the step before left on the device."""
        ...


def sparse_unit_counts(unit: int, token_budget: int, sink_tokens: int, recent_tokens: int) -> tuple[int, int, int]:
    """(budget, sink, recent) in units of `unit` tokens (pages for Quest, groups for centroids),
    rounded as kernels/reference.sparse_page_counts rounds them to pages: the budget down, the sink
    and recent windows up, at least one recent unit. Validity (budget > sink + recent) is the
    caller's to report, in its own terms."""
    return token_budget // unit, -(-sink_tokens // unit), max(1, -(-recent_tokens // unit))


@dataclass(frozen=True)
class SparseSettings:
    """Quest decode settings in tokens (kernels/reference.py says how they round to pages).

    summary_tokens: tokens per key min/max summary; it divides the page size, so each page keeps
    page_size // summary_tokens summaries. Pages are still what is selected and read.
    shortlist_tokens: a sequence longer than this many tokens (and than twice the budget) is scored
    coarse to fine (kernels/reference.py): one summary per page shortlists that many tokens' worth of
    pages, and only those are scored by their block summaries. 0: every page by its block summaries.
    selector: "quest" (the above: key min/max bounds) or "centroids": each complete run of
    group_tokens tokens per KV head keeps `centroids` k-means centroids in 8 bits with their counts
    and spreads, which estimate its attention mass; whole groups are selected
    (kernels/centroid_reference.centroid_select_pages). summary_tokens is Quest's only. With centroids,
    shortlist_tokens shortlists runs of run_tokens tokens (each with its own `centroids` centroids)
    and the groups are chosen among the shortlisted runs' (centroid_reference.CentroidShortlist).
    head_budget_weights: with centroids, ((layer, weight per KV head), ...) of a per-head table
    (backends/head_budgets.py): each KV head keeps its weight times token_budget; () for uniform.
    """

    enabled: bool = False
    token_budget: int = 2048
    dense_layers: int = 2
    sink_tokens: int = 16
    recent_tokens: int = 64
    summary_tokens: int = 4
    shortlist_tokens: int = 8192
    selector: str = "quest"
    centroids: int = 8
    group_tokens: int = 64
    run_tokens: int = 256
    head_budget_weights: tuple[tuple[int, tuple[float, ...]], ...] = ()


@dataclass(frozen=True)
class RunnerSettings:
    """Everything a backend needs to load a model and size its KV pages; plain data, no config objects."""

    source_kind: str                 # "gguf" | "hf"
    source_path: str                 # the .gguf file or the HF folder
    model_name: str
    dtype: str = "auto"              # auto | float32 | bfloat16 | float16 | int8
    device: str = "cpu"              # cpu | cuda
    page_size: int = 16
    num_pages: int | None = None     # None: sized from memory (below)
    kv_memory_bytes: int = 1 << 30   # CPU: bytes for KV pages
    device_memory_fraction: float = 0.85   # GPU: share of the memory left after weights and buffers
    max_sequences: int = 64          # rows of the page-table store: the engine's max running requests
    attention: str = "auto"          # auto | torch | cpu_fused | triton (chosen once at start-up)
    cuda_graphs: bool = True         # capture decode steps per batch-size bucket (CUDA only)
    validate_batches: bool = False   # check every batch's page tables on the host (tests, debugging)
    context_length: int | None = None
    threads: int | None = None
    sparse: SparseSettings = SparseSettings()
    tensor_parallel_size: int = 1    # ranks (one process and device each) that split one model (cuda/parallel.py)
    host_cache_bytes: int = 0        # the host KV tier (L2, backends/kv_store.py); 0: none
    deterministic: bool = False      # batch-invariant kernels (CUDA: triton_invariant; CPU: already so)
