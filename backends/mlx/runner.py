"""MlxRunner: the Backend of backends/base.py on MLX (a Metal GPU on Apple silicon, else the CPU).

Chosen once at start-up: the activation dtype, the weights (quantised sources stay packed on a GPU;
the CPU serves float32 linears, backends/mlx/cpu_linear.py), the paged decode (the Metal kernel or
its MLX-ops mirror), the sparse page selector (Quest or centroids, with its counts per layer and KV
head: backends/head_budgets.py) and the KV pool size. A step
syncs the page tables (appends only, host side: MLX shares memory with the GPU on Apple silicon),
builds the step's plan, runs the model lazily, summarises the groups it completes (centroid
selector), samples, and hands the whole step to MLX with async_eval: launch() returns at once, and
the engine builds the next step while this one runs (overlap).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from backends.base import PENDING_TOKEN, AttentionStats, BackendInfo, ForwardBatch, ForwardResult, RunnerSettings
from backends.cuda.attention.centroids import completed_groups, group_counts, shortlist_counts
from backends.cuda.attention.sparse import check_sparse_settings
from backends.cuda.page_tables import PageTableStore
from backends.head_budgets import head_groups
from backends.mlx.attention import PagedAttention, plan_step
from backends.mlx.centroids import centroid_budgets, write_group_summaries
from backends.mlx.cpu_linear import cpu_streams, use_cpu_linears
from backends.mlx.kv_cache import PagedKVCache
from backends.mlx.kv_store import create_kv_store
from backends.mlx.loader import load_model
from backends.mlx.model import LlamaModel
from backends.mlx.sampler import DrawnTokens, MlxSampler
from kernels.metal.paged_decode import choose_paged_decode

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_GROUP_SIZE = 32        # int4 / int8 from float weights: the GGUF Q4 group, as the torch backend
log = logging.getLogger("radixgate.mlx")


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def activation_dtype(name: str, weights: dict[str, mx.array]) -> mx.Dtype:
    """auto: float32 on the CPU (MLX's CPU matmuls are fastest there); on a GPU the checkpoint's
    own half type (bfloat16 if its float weights are, else float16: a GGUF's scales are fp16)."""
    if name in DTYPES:
        return DTYPES[name]
    if not on_gpu():
        return mx.float32
    floats = {w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)}
    return mx.bfloat16 if mx.bfloat16 in floats else mx.float16


def build_model(settings: RunnerSettings) -> tuple[LlamaModel, str]:
    """The model with its weights loaded, and the weight format actually served (e.g. "int4/float32")."""
    if settings.dtype not in ("auto", "int4", "int8", *DTYPES):
        raise ValueError(f"dtype {settings.dtype!r} is not supported by the mlx backend (auto, int4, int8, "
                         f"{', '.join(DTYPES)})")
    config, weights, quant = load_model(settings.source_kind, settings.source_path)
    act = activation_dtype(settings.dtype if settings.dtype in DTYPES else "auto", weights)
    model = LlamaModel(config)
    if quant:
        nn.quantize(model, class_predicate=lambda path, _: (
            {"group_size": quant[path][0], "bits": quant[path][1]} if path in quant else False))
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(act)
    if settings.dtype in ("int4", "int8") and not quant:
        bits = int(settings.dtype[3:])
        # the head (or the tied embedding) stays 8-bit under int4, as in the torch backend
        nn.quantize(model, class_predicate=lambda path, _: (
            {"group_size": QUANT_GROUP_SIZE, "bits": bits} if path.startswith("layers.")
            else {"group_size": QUANT_GROUP_SIZE, "bits": 8}))
        quant = {"layers": (QUANT_GROUP_SIZE, bits)}
    mx.eval(model.parameters())
    widths = sorted({bits for _, bits in quant.values()})
    served = "/".join([*(f"int{b}" for b in widths), str(act).removeprefix("mlx.core.")])
    if cpu_float_linears(settings.dtype):
        use_cpu_linears(model, cpu_streams(settings.threads or os.cpu_count() or 1))
        served = "float32" + (f" (dequantised {'/'.join(f'int{b}' for b in widths)})" if widths else "")
    return model, served


def cpu_float_linears(dtype: str) -> bool:
    """On the CPU, auto and float32 serve float32 linears split over CPU streams (cpu_linear.py:
    2-4x the quantized matmuls there); int4 / int8 keep the quantized matmuls, as a Metal GPU does."""
    return not on_gpu() and dtype in ("auto", "float32")


class MlxRunner:
    """Owns the model, its paged KV cache and page tables; runs one ForwardBatch at a time."""

    def __init__(self, settings: RunnerSettings):
        self.settings = settings
        self.model, served = build_model(settings)
        config = self.config = self.model.config
        check_sparse_settings(settings.sparse, settings.page_size, config.num_layers)
        self.sparse = settings.sparse if settings.sparse.enabled else None
        # the centroid selector's pages per group (None: not on) and per run of its coarse stage (None:
        # one stage); their summaries are written after each step's forward (write_group_summaries)
        centroid_selector = self.sparse is not None and self.sparse.selector == "centroids"
        self.group_pages = group_counts(self.sparse, settings.page_size)[0] if centroid_selector else None
        shortlist = shortlist_counts(self.sparse, settings.page_size) if centroid_selector else None
        self.run_pages = shortlist[0] if shortlist is not None else None
        # the per-head table's counts for this model, once (None: uniform); ValueError when it does not fit
        head_table = (head_groups(self.sparse, config.num_layers, config.num_kv_heads) if self.sparse is not None
                      else None)
        self.centroid_budgets = (centroid_budgets(self.sparse, settings.page_size, config.num_layers,
                                                  config.num_kv_heads, head_table) if centroid_selector else None)
        # a centroid plan counts its pages per sparse layer and KV head (their budgets may differ);
        # Quest's per layer and KV head, alike in every one
        self._stats = self._centroid_stats if centroid_selector else self._quest_stats
        self.page_size = page_size = settings.page_size
        self.context_length = settings.context_length or config.context_length
        self.max_sequences = settings.max_sequences
        summary_tokens = self.sparse.summary_tokens if self.sparse and not centroid_selector else None
        centroids = (self.sparse.centroids, self.group_pages, self.run_pages) if centroid_selector else None
        dtype = self.model.norm.weight.dtype
        per_page = PagedKVCache.bytes_per_page(config.num_layers, page_size, config.num_kv_heads, config.head_dim,
                                               dtype.size, summary_tokens,
                                               self.sparse.centroids if centroid_selector else None,
                                               runs=self.run_pages is not None)
        self.num_pages = settings.num_pages or settings.kv_memory_bytes // per_page - 1
        if self.num_pages < 1:
            raise ValueError(f"KV memory {settings.kv_memory_bytes} bytes holds no page ({per_page} bytes each)")
        self.cache = PagedKVCache(config.num_layers, self.num_pages, page_size, config.num_kv_heads,
                                  config.head_dim, dtype, summary_tokens, centroids)
        max_pages = -(-self.context_length // page_size)
        # the host mirror of the page tables (backends/cuda/page_tables.py, on the CPU): appended, not rebuilt
        self.tables = PageTableStore(self.max_sequences, max_pages, self.cache.scratch_page, torch.device("cpu"))
        self.table_rows = self.tables.table.numpy()
        kernel, decode = choose_paged_decode(config.head_dim)
        self.attention = PagedAttention(self.cache, config.num_heads, config.head_dim, decode, self.sparse)
        self.sampler = MlxSampler(config.vocab_size)
        self.kv_store = create_kv_store(settings, self.cache, served, kernel)   # L2 host tier, or None
        # each seq slot's last draw, read by the next step's PENDING_TOKEN chunk without a sync
        self.next_tokens = mx.zeros(self.max_sequences + 1, dtype=mx.int32)
        self.overlap = True
        device = (f"mlx gpu ({mx.metal.device_info().get('device_name', 'Metal')})" if on_gpu() else "mlx cpu")
        self.info = BackendInfo(
            model_name=settings.model_name, backend="mlx", device=device, dtype=served, num_pages=self.num_pages,
            page_size=page_size, context_length=self.context_length, vocab_size=config.vocab_size)
        log.info("mlx runner: %s, weights %s (config %s), paged decode %s, %d KV pages = %d tokens", device,
                 served, settings.dtype, kernel, self.num_pages, self.num_pages * page_size)

    def _validate(self, batch: ForwardBatch) -> None:
        """Every chunk's page table, tokens and slots, checked on the host (a debug switch)."""
        slots, seq_slots = [], set()
        for seq in batch.sequences:
            end, ps = seq.end_position, self.page_size
            assert seq.token_ids, "a sequence chunk must carry at least one new token"
            assert seq.start_position >= 0
            assert end <= self.context_length, f"positions up to {end} exceed {self.context_length}"
            assert 0 <= seq.seq_slot < self.max_sequences, f"seq_slot {seq.seq_slot} out of range"
            assert seq.seq_slot not in seq_slots, f"two sequences share seq_slot {seq.seq_slot}"
            seq_slots.add(seq.seq_slot)
            assert len(seq.page_table) >= -(-end // ps), "page table too short"
            used = np.asarray(seq.page_table[:-(-end // ps)])
            assert 0 <= used.min() and used.max() < self.num_pages, "page id out of range"
            if seq.token_ids != [PENDING_TOKEN]:
                assert 0 <= min(seq.token_ids) and max(seq.token_ids) < self.config.vocab_size, "token id"
            positions = np.arange(seq.start_position, end)
            slots.append(used[positions // ps] * ps + positions % ps)
        flat = np.concatenate(slots)
        assert len(np.unique(flat)) == len(flat), "two sequences write the same KV slot"

    def _quest_stats(self, step) -> AttentionStats:
        if step.sparse is None:
            return AttentionStats()     # no row past the budget: nothing skipped (dense reads uncounted)
        per_step = self.config.num_kv_heads * (self.config.num_layers - self.sparse.dense_layers)
        return AttentionStats(step.sparse.pages_read * per_step, step.sparse.pages_skipped * per_step)

    @staticmethod
    def _centroid_stats(step) -> AttentionStats:
        # no row past the fewest count: nothing skipped (dense reads uncounted)
        return step.centroids.stats if step.centroids is not None else AttentionStats()

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Run every chunk's new tokens, write their K/V, sample where a chunk asks."""
        return self.launch(batch).result()

    def launch(self, batch: ForwardBatch) -> StepResult:
        """Build the step and start it (mx.async_eval); only StepResult.result() waits. Its draws
        are left in next_tokens[seq_slot], where a PENDING_TOKEN chunk of the next step reads them."""
        chunks = batch.sequences
        if not chunks:
            return StepResult(None, AttentionStats(), np.zeros((0, self.config.vocab_size), np.float32)
                              if batch.return_logits else None)
        if self.settings.validate_batches:
            self._validate(batch)
        self.tables.sync(chunks, self.page_size)
        if self.settings.validate_batches:
            self.tables.check(chunks, self.page_size)
        rows = self.table_rows[[c.seq_slot for c in chunks]]
        step = plan_step(chunks, rows, self.page_size, self.cache.scratch_page, self.sparse, self.centroid_budgets)
        ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int32)
        token_ids = mx.array(ids)
        if (ids == PENDING_TOKEN).any():
            owners = np.repeat([c.seq_slot for c in chunks], [len(c.token_ids) for c in chunks])
            token_ids = mx.where(token_ids == PENDING_TOKEN, self.next_tokens[mx.array(owners)], token_ids)
        ends = np.cumsum([len(c.token_ids) for c in chunks]) - 1
        sampled = [i for i, c in enumerate(chunks) if c.sample is not None]
        self.attention.plan(step)
        logits = self.model(token_ids, self.attention, mx.array(ends[sampled].astype(np.int32)))
        if self.group_pages is not None:     # the groups (runs) this step completed, summarised for the next ones
            written = [(c.start_position, len(c.token_ids), c.page_table) for c in chunks]
            write_group_summaries(self.cache, completed_groups(written, self.page_size, self.group_pages))
            if self.run_pages is not None:
                write_group_summaries(self.cache, completed_groups(written, self.page_size, self.run_pages), runs=True)
        drawn = None
        if sampled:
            drawn = self.sampler.draw(logits, [chunks[i].sample for i in sampled])
            self.next_tokens[mx.array([chunks[i].seq_slot for i in sampled])] = drawn.tokens
        outputs = [*(drawn.outputs if drawn else []), *([logits] if batch.return_logits else [])]
        mx.async_eval(outputs, self.next_tokens, self.cache.arrays())
        return StepResult(drawn, self._stats(step), logits if batch.return_logits else None)


@dataclass
class StepResult:
    """A launched step (backends/base.PendingForward)."""

    drawn: DrawnTokens | None
    attention: AttentionStats
    logits: mx.array | np.ndarray | None

    def result(self) -> ForwardResult:
        tokens = []
        if self.drawn is not None:
            tokens = self.drawn.finish([np.array(a) for a in self.drawn.outputs])
        raw = np.array(self.logits, dtype=np.float32) if self.logits is not None else None
        return ForwardResult(tokens, self.attention, raw)
