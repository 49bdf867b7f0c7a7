"""TorchRunner: the Backend of backends/base.py on PyTorch, on a CUDA GPU or the CPU.

Chosen once at start-up: the dtype, the attention backend (triton on CUDA, cpu_fused or torch on
CPU) with its layer ops, the KV pool size, and on CUDA the decode graphs. A step syncs the
device-resident page tables (appends only), runs the model (a graph replay for decode batches
that fit a bucket, eagerly otherwise) and samples on the device; only the sampled ids (and
logprobs where asked) come back to the host.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from backends.base import (
    PENDING_TOKEN,
    AttentionStats,
    BackendInfo,
    ForwardBatch,
    ForwardResult,
    RunnerSettings,
    SequenceChunk,
)
from backends.cuda.attention.base import AttentionShape
from backends.cuda.attention.centroids import (
    completed_groups,
    count_group_pages,
    group_counts,
    shortlist_counts,
    write_group_summaries,
)
from backends.cuda.attention.factory import choose_attention, create_attention, deterministic_attention
from backends.cuda.attention.sparse import check_sparse_settings, count_pages, page_counts
from backends.cuda.graphs import DecodeGraphs
from backends.cuda.kv_cache import PagedKVCache
from backends.cuda.kv_store import create_kv_store
from backends.cuda.layer_ops import LAYER_OPS
from backends.cuda.layout import build_layout
from backends.cuda.linear import kernel_available
from backends.cuda.loader import load_model, random_weights
from backends.cuda.model import LlamaModel
from backends.cuda.page_tables import PageTableStore
from backends.cuda.parallel import TensorParallel
from backends.cuda.sampler import DrawnTokens, TorchSampler
from backends.head_budgets import head_groups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.bfloat16,      # int8 / int4: weight-only matmuls, bfloat16 activations and KV
          "int4": torch.bfloat16}
AUTO_CPU = "int4"           # what auto picks on CPU (when its kernel exists; else int8, else float32)
QUANT_MIN_HIDDEN = 256      # quantised weights only from this hidden size up (below, overhead rules)
log = logging.getLogger("radixgate.runner")


def pick_dtype(name: str, device: torch.device, hidden_size: int | None = None) -> str:
    """The serving mode for config's dtype: float32 | bfloat16 | float16 | int8 | int4.

    auto: GPUs want bf16. On CPU auto is int4 (AUTO_CPU): weight-only int4 in groups of 32, which
    holds a GGUF Q4_0/Q4_1 file's weights on their own grid, decodes about 2.5x faster than
    float32 (a sixth of the bytes; docs/cpu.md) and meets the logit tolerance of
    tests/test_cpu_fast_path.py; the head stays int8. With the fused CPU kernels both run
    kernels/cpu/quant_linear.cpp, whose rows do not depend on the batch or the prefill chunk, so a
    request gives the same answer alone, batched, cached or preempted (tests/test_determinism.py);
    the torch fallback switches kernels by row count (docs/cpu.md, "Batch invariance").
    """
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16"
        if hidden_size is None or hidden_size < QUANT_MIN_HIDDEN:
            return "float32"
        for mode in (AUTO_CPU, "int8"):
            if kernel_available(mode):
                return mode
        return "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported by the torch backend "
                         f"(auto, {', '.join(DTYPES)})")
    if name in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"dtype {name} (weight-only) is implemented for the CPU backend only")
    return name


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load(settings: RunnerSettings, device: torch.device, tp: TensorParallel):
    # Convert tensor by tensor while loading: peak memory stays near one copy in the load dtype.
    # int8 / int4 (and auto, which may pick them) quantise from the float32 weights.
    load_dtype = (torch.float32 if settings.dtype in ("auto", "int8", "int4") and device.type == "cpu"
                  else DTYPES.get(pick_dtype(settings.dtype, device), torch.float32))
    if settings.source_kind == "random":            # moved to the device tensor by tensor
        return random_weights(settings.source_path, load_dtype, device, rank=tp.rank, world=tp.world)
    return load_model(settings.source_kind, settings.source_path, load_dtype, tp.rank, tp.world)


class TorchRunner:
    """Owns the model, its paged KV cache and page tables; runs one ForwardBatch at a time."""

    def __init__(self, settings: RunnerSettings, tp: TensorParallel | None = None):
        """tp: a follower rank's group (backends/cuda/parallel.py); None: rank 0, which starts the
        followers when settings.tensor_parallel_size > 1."""
        self.settings = settings
        self.tp = tp = tp or TensorParallel.start(settings)
        self.device = device = tp.device
        if device.type == "cpu":
            torch.set_num_threads(settings.threads or max(1, default_threads() // tp.world))

        config, weights = _load(settings, device, tp)
        self.config = config                    # the whole model's; shard: this rank's part of it
        plan = tp.shard_plan(config)
        self.shard = shard = plan.local_config if plan else config
        self.mode = pick_dtype(settings.dtype, device, config.hidden_size)
        self.dtype = DTYPES[self.mode]          # activations and KV cache
        attention_name = choose_attention(settings.attention, device)
        if attention_name == "cpu_fused" and self.dtype == torch.float16:
            attention_name = "torch"            # the C++ ops take float32 and bfloat16 activations
        if settings.deterministic:              # batch-invariant kernels (docs/cuda.md, "Determinism")
            attention_name = deterministic_attention(attention_name, self.mode)
        ops = LAYER_OPS[attention_name](config.rms_norm_eps)
        self.model = LlamaModel.from_weights(shard, weights, device, self.dtype, self.mode, ops,
                                             tp.collectives(config, ops))
        del weights
        check_sparse_settings(settings.sparse, settings.page_size, config.num_layers)
        self.sparse = settings.sparse if settings.sparse.enabled else None
        # the centroid selector's pages per group (None: not on); its summaries are written after each
        # step's forward (centroids.write_group_summaries), outside any CUDA graph
        self.group_pages = (group_counts(self.sparse, settings.page_size)[0]
                            if self.sparse is not None and self.sparse.selector == "centroids" else None)
        # ... and per run of the coarse stage (None: one stage), summarised the same way
        shortlist = shortlist_counts(self.sparse, settings.page_size) if self.group_pages else None
        self.run_pages = shortlist[0] if shortlist is not None else None

        self.page_size = page_size = settings.page_size
        self.context_length = settings.context_length or config.context_length
        self.max_sequences = settings.max_sequences
        self.num_pages = tp.agree_min(self._size_pool())     # every rank holds the same pages
        self.cache = PagedKVCache(config.num_layers, self.num_pages, page_size, shard.num_kv_heads,
                                  config.head_dim, self.dtype, device, self._summary_tokens(),
                                  (self.sparse.centroids, self.group_pages, self.run_pages)
                                  if self.group_pages else None)
        max_pages = -(-self.context_length // page_size)
        self.tables = PageTableStore(self.max_sequences, max_pages, self.cache.scratch_page, device)
        cos, sin = self.model.rotary_tables(max_pages * page_size)
        self.shape = AttentionShape(shard.num_heads, shard.num_kv_heads, config.head_dim)
        self.attention = create_attention(attention_name, self.cache, self.shape, cos, sin, self.sparse)
        self.sampler = TorchSampler(config.vocab_size, device)
        self.kv_store = create_kv_store(settings, self.cache, self.mode, attention_name)   # L2, or None
        if tp.world > 1 and self.kv_store is not None:
            log.warning("the host KV tier is off under tensor parallelism (page copies are per rank)")
            self.kv_store = None
        # each seq slot's last draw, read on the device by the next step's PENDING_TOKEN chunk
        self.next_tokens = torch.zeros(self.max_sequences + 1, dtype=torch.long, device=device)
        self.overlap = device.type == "cuda"      # the CPU runs a step to its end before returning
        self.graphs = None
        if device.type == "cuda" and settings.cuda_graphs and self.attention.graph_safe:
            self.graphs = DecodeGraphs(self.model, self.attention, self.tables, self.next_tokens, page_size,
                                       self.cache.scratch_page, self.max_sequences, device)
        device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu ({torch.get_num_threads()} threads)")
        self.info = BackendInfo(
            model_name=settings.model_name, backend=device.type, device=device_name, dtype=self.mode,
            num_pages=self.num_pages, page_size=page_size, context_length=self.context_length,
            vocab_size=config.vocab_size)
        log.info("torch runner: dtype %s (config %s), attention %s, %s, %d KV pages = %d tokens, "
                 "CUDA graphs %s", self.mode, settings.dtype, attention_name, device_name, self.num_pages,
                 self.num_pages * page_size, "on" if self.graphs else "off")
        if tp.world > 1:
            log.info("%s", tp.describe(config))
        tp.start_sending(self.max_sequences, page_size)

    def _summary_tokens(self) -> int | None:
        """Quest's tokens per key summary (None: no Quest summaries, sparse off or centroids)."""
        return self.sparse.summary_tokens if self.sparse is not None and self.group_pages is None else None

    def _size_pool(self) -> int:
        """Pages from config: a fixed count, or a share of the memory left after the weights (GPU:
        device_memory_fraction of what is free now; the rest is for activations and graphs) or
        kv_memory_bytes (CPU)."""
        cfg, settings = self.shard, self.settings
        per_page = PagedKVCache.bytes_per_page(cfg.num_layers, self.page_size, cfg.num_kv_heads, cfg.head_dim,
                                               self.dtype.itemsize, self._summary_tokens(),
                                               self.sparse.centroids if self.group_pages else None,
                                               runs=self.run_pages is not None)
        if settings.num_pages:
            return settings.num_pages
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * settings.device_memory_fraction)
        else:
            budget = settings.kv_memory_bytes
        pages = budget // per_page - 1               # one page is the graphs' scratch page
        if pages < 1:
            raise ValueError(f"KV memory {budget} bytes holds no page ({per_page} bytes each)")
        return pages

    def _validate(self, batch: ForwardBatch) -> None:
        """Every chunk's page table, tokens and slots, checked on the host (a debug switch)."""
        slots, seq_slots = [], set()
        for seq in batch.sequences:
            end = seq.end_position
            assert seq.token_ids, "a sequence chunk must carry at least one new token"
            assert seq.start_position >= 0
            assert end <= self.context_length, f"positions up to {end} exceed {self.context_length}"
            assert seq.seq_slot not in seq_slots, f"two sequences share seq_slot {seq.seq_slot}"
            seq_slots.add(seq.seq_slot)
            assert len(seq.page_table) >= -(-end // self.page_size), "page table too short"
            used = seq.page_table[:-(-end // self.page_size)]
            assert 0 <= min(used) and max(used) < self.num_pages, "page id out of range"
            if seq.token_ids != [PENDING_TOKEN]:
                assert 0 <= min(seq.token_ids) and max(seq.token_ids) < self.config.vocab_size, "token id"
            pages = np.asarray(used)[np.arange(seq.start_position, end) // self.page_size]
            slots.append(pages * self.page_size + np.arange(seq.start_position, end) % self.page_size)
        if len(batch.sequences) > 1:
            flat = np.concatenate(slots)
            assert len(np.unique(flat)) == len(flat), "two sequences write the same KV slot"

    def _sparse_stats(self, batch: ForwardBatch) -> AttentionStats:
        if self.sparse is None:
            return AttentionStats()
        lengths = [c.end_position for c in batch.sequences if len(c.token_ids) == 1]
        if self.sparse.selector == "centroids":
            group_pages, budget, _, _ = group_counts(self.sparse, self.page_size)
            table = head_groups(self.sparse, self.config.num_layers, self.config.num_kv_heads)
            if table is not None:           # each (layer, KV head) its own count: summed by count
                counted = [count_group_pages(lengths, self.page_size, group_pages, count) + (times,)
                           for count, times in table.count_frequencies.items()]
                return AttentionStats(sum(r * t for r, _, t in counted), sum(k * t for _, k, t in counted))
            read, skipped = count_group_pages(lengths, self.page_size, group_pages, budget)
        else:
            read, skipped = count_pages(lengths, self.page_size, page_counts(self.sparse, self.page_size)[0])
        per_step = self.config.num_kv_heads * (self.config.num_layers - self.sparse.dense_layers)
        return AttentionStats(read * per_step, skipped * per_step)

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Run every chunk's new tokens, write their K/V, sample where a chunk asks."""
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: ForwardBatch) -> StepResult:
        """Queue the step on the device; only StepResult.result() waits for it. Its draws are left
        in next_tokens[seq_slot], where a PENDING_TOKEN chunk of the next step reads them."""
        chunks = batch.sequences
        if self.settings.validate_batches:
            self._validate(batch)
        if not chunks:
            empty = torch.zeros(0, self.config.vocab_size) if batch.return_logits else None
            return StepResult(None, None, AttentionStats(), empty)
        self.tp.publish(chunks)                 # the follower ranks run the same step
        logits, sample_slots = self.run_model(chunks)
        specs = [c.sample for c in chunks if c.sample is not None]
        drawn = None
        if specs:
            drawn = self.sampler.draw(logits, specs)
            self.next_tokens.index_copy_(0, sample_slots, drawn.tokens)
            self.tp.share_draws(self.next_tokens)
        return StepResult(drawn, _to_host(drawn.packed) if drawn else None, self._sparse_stats(batch),
                          logits if batch.return_logits else None)


    def run_model(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sync the page tables and run the model (a graph replay or eagerly) -> (logits float32
        [sampled rows, vocab], their seq slots); every rank runs this for every step."""
        self.tables.sync(chunks, self.page_size)
        if self.settings.validate_batches:
            self.tables.check(chunks, self.page_size)
        if self.graphs is not None and self.graphs.can_run(chunks):
            result = self.graphs.run(chunks, self.next_tokens)
        else:
            layout = build_layout(chunks, self.tables, self.page_size, self.device, self.next_tokens)
            self.attention.plan(layout)
            result = self.model(layout.token_ids, self.attention, layout.logits_rows), layout.sample_slots
        if self.group_pages is not None:     # the groups (runs) this step completed, summarised for the next ones
            written = [(c.start_position, len(c.token_ids), c.page_table) for c in chunks]
            write_group_summaries(self.cache, completed_groups(written, self.page_size, self.group_pages))
            if self.run_pages is not None:
                write_group_summaries(self.cache, completed_groups(written, self.page_size, self.run_pages), runs=True)
        return result

    def close(self) -> None:
        """Stop the follower ranks (nothing to do on one device)."""
        self.tp.close()


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """An asynchronous copy to pinned host memory, and the event that marks it done."""
    if values.device.type == "cpu":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class StepResult:
    """A launched step (backends/base.PendingForward)."""

    drawn: DrawnTokens | None
    host: tuple[torch.Tensor, torch.cuda.Event | None] | None
    attention: AttentionStats
    logits: torch.Tensor | None

    def result(self) -> ForwardResult:
        tokens = []
        if self.drawn is not None:
            values, event = self.host
            if event is not None:
                event.synchronize()
            tokens = self.drawn.finish(values.tolist())
        raw = self.logits.float().cpu().numpy() if self.logits is not None else None
        return ForwardResult(tokens, self.attention, raw)
