"""Decode steps captured in CUDA graphs, one per (batch-size bucket, page-table width), over static buffers.

A decode step of a large model is hundreds of small launches; replaying a captured graph issues
them in one call. Each bucket owns its inputs as two packed buffers (int64: token ids, positions,
KV slots, page-table rows; int32: starts, lengths), so a step is two host->device copies and one
replay. The page tables are gathered from the PageTableStore inside the graph. A batch is padded
up to its bucket with rows that read and write only the KV cache's scratch page.
Prefill and mixed steps, and batches above the largest bucket, run eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from backends.base import SequenceChunk
from backends.cuda.attention.base import AttentionBackend
from backends.cuda.layout import StepLayout, graph_batch, table_width, table_widths
from backends.cuda.page_tables import PageTableStore

log = logging.getLogger("radixgate.graphs")
# Batch buckets from this size up are captured with cuBLASLt's matmuls, smaller ones with cuBLAS's.
# Measured on an H200 (Llama-3-8B shapes, docs/benchmarks.md): batch 64 6.44 -> 6.10 ms per step
# (runner alone) and 6.73 -> 5.96 ms (engine); batch 16 5.23 -> 5.74 ms and batch 1 no gain.
CUBLASLT_FROM_BATCH = 64


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (padding wastes at most 7 rows past 8)."""
    return sorted({graph_batch(b) for b in range(1, max_batch + 1)})


class StaticDecodeStep:
    """One (batch bucket, table width)'s decode step over static inputs: what a graph captures.

    Inputs are two packed buffers (int64 [4, bs]: token ids, positions, KV slots, page-table rows;
    int32 [2, bs]: starts, lengths), refilled by fill() each step. Rows past the batch are padding:
    they read and write only the scratch page (through the store's padding row). forward() is
    plain torch + Triton launches with no host sync, so it runs eagerly too (tests on the CPU)."""

    def __init__(self, model, attention: AttentionBackend, store: PageTableStore, next_tokens: torch.Tensor,
                 page_size: int, scratch_page: int, bs: int, width: int, device: torch.device):
        self.model, self.attention, self.store, self.next_tokens = model, attention, store, next_tokens
        self.page_size, self.bs, self.width = page_size, bs, width
        self.scratch_slot = scratch_page * page_size
        self.longs = torch.zeros(4, bs, dtype=torch.long, device=device)
        self.ints = torch.zeros(2, bs, dtype=torch.int32, device=device)
        self.no_extends = torch.zeros(1, dtype=torch.int32, device=device)   # extend_cu of no extend
        self.logits: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """The step over the current inputs -> logits float32 [bs, vocab]."""
        longs, ints = self.longs, self.ints
        # a PENDING_TOKEN id is the slot's last draw, still on the device
        ids = torch.where(longs[0] < 0, self.next_tokens.index_select(0, longs[3]), longs[0])
        layout = StepLayout(
            num_tokens=self.bs, num_decode=self.bs, token_ids=ids, positions=longs[1], slots=longs[2],
            tables=self.store.table[:, :self.width].index_select(0, longs[3]), starts=ints[0],
            seq_lens=ints[1], extend_cu=self.no_extends, logits_rows=None, sample_slots=longs[3],
            host_chunks=[(0, 1, [])] * self.bs, max_new_tokens=0)
        self.attention.plan(layout)
        return self.model(layout.token_ids, self.attention, None)

    def fill(self, chunks: list[SequenceChunk]) -> None:
        """Copy these decode chunks (at most bs) into the inputs, the rest as padding rows."""
        n, page_size = len(chunks), self.page_size
        assert 0 < n <= self.bs
        pinned = self.longs.is_cuda
        # fresh pinned staging each step: with overlap the last step's copies may still be queued
        # (the caching host allocator keeps a block until the copy that read it is done)
        host_longs = torch.empty(self.longs.shape, dtype=torch.long, pin_memory=pinned)
        host_ints = torch.empty(self.ints.shape, dtype=torch.int32, pin_memory=pinned)
        longs, ints = host_longs.numpy(), host_ints.numpy()
        longs[:, n:] = ((0,), (0,), (self.scratch_slot,), (self.store.padding_row,))
        ints[:, n:] = ((0,), (1,))
        for i, chunk in enumerate(chunks):
            position = chunk.start_position
            longs[0, i] = chunk.token_ids[0]
            longs[1, i] = position
            longs[2, i] = chunk.page_table[position // page_size] * page_size + position % page_size
            longs[3, i] = chunk.seq_slot
            ints[0, i] = position
            ints[1, i] = position + 1
        self.longs.copy_(host_longs, non_blocking=pinned)
        self.ints.copy_(host_ints, non_blocking=pinned)


class DecodeGraphs:
    """A CUDA graph of the StaticDecodeStep of every (batch bucket, table width)."""

    def __init__(self, model, attention: AttentionBackend, store: PageTableStore, next_tokens: torch.Tensor,
                 page_size: int, scratch_page: int, max_batch: int, device: torch.device):
        assert attention.graph_safe, f"the {attention.name} attention backend cannot be captured"
        self.store, self.next_tokens, self.page_size, self.device = store, next_tokens, page_size, device
        self.sizes = bucket_sizes(max_batch)
        self.widths = table_widths(store.max_pages)
        self.steps: dict[tuple[int, int], StaticDecodeStep] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        began = time.monotonic()
        for width in reversed(self.widths):       # largest first: the smaller ones reuse its pool
            for bs in reversed(self.sizes):
                step = StaticDecodeStep(model, attention, store, next_tokens, page_size, scratch_page, bs,
                                        width, device)
                self.steps[bs, width], self.graphs[bs, width] = step, self._capture(step, pool)
        log.info("CUDA graphs: %d decode batch sizes up to %d x %d page-table widths up to %d pages "
                 "captured in %.1f s", len(self.sizes), max_batch, len(self.widths), store.max_pages,
                 time.monotonic() - began)

    def _capture(self, step: StaticDecodeStep, pool) -> torch.cuda.CUDAGraph:
        blas = torch.backends.cuda.preferred_blas_library()
        if step.bs >= CUBLASLT_FROM_BATCH:      # the choice is baked into the captured kernels
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):       # warm-up (Triton compiles, BLAS picks) off the capture
                for _ in range(2):
                    step.forward()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step.logits = step.forward()
        finally:
            torch.backends.cuda.preferred_blas_library(blas)
        return graph

    def bucket(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def can_run(self, chunks: list[SequenceChunk]) -> bool:
        return (bool(chunks) and len(chunks) <= self.sizes[-1]
                and all(len(c.token_ids) == 1 and c.sample is not None for c in chunks))

    def run(self, chunks: list[SequenceChunk], next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of these decode chunks' bucket and width -> (logits float32 [n, vocab],
        their seq slots [n] on the device)."""
        assert next_tokens is self.next_tokens
        n = len(chunks)
        pages = -(-max(c.start_position + 1 for c in chunks) // self.page_size)
        key = self.bucket(n), table_width(pages, self.store.max_pages)
        step = self.steps[key]
        step.fill(chunks)
        self.graphs[key].replay()
        return step.logits[:n], step.longs[3, :n]
