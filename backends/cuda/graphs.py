"""Decode steps captured in CUDA graphs, one per batch-size bucket, over static buffers.

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
from dataclasses import dataclass

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


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    longs: torch.Tensor       # int64 [4, bs]: token ids, positions, slots, page-table rows
    ints: torch.Tensor        # int32 [2, bs]: starts, seq_lens
    logits: torch.Tensor      # float32 [bs, vocab], written by the graph


class DecodeGraphs:
    def __init__(self, model, attention: AttentionBackend, store: PageTableStore, next_tokens: torch.Tensor,
                 page_size: int, scratch_page: int, max_batch: int, device: torch.device):
        assert attention.graph_safe, f"the {attention.name} attention backend cannot be captured"
        self.model, self.attention, self.store, self.next_tokens = model, attention, store, next_tokens
        self.page_size, self.device = page_size, device
        self.scratch_slot = scratch_page * page_size
        self.steps: dict[tuple[int, int], CapturedStep] = {}
        self.sizes = bucket_sizes(max_batch)
        self.widths = table_widths(store.max_pages)
        pool = torch.cuda.graph_pool_handle()
        began = time.monotonic()
        for width in reversed(self.widths):       # largest first: the smaller ones reuse its pool
            for bs in reversed(self.sizes):
                self.steps[bs, width] = self._capture(bs, width, pool)
        log.info("CUDA graphs: %d decode batch sizes up to %d x %d page-table widths up to %d pages "
                 "captured in %.1f s", len(self.sizes), max_batch, len(self.widths), store.max_pages,
                 time.monotonic() - began)

    def _capture(self, bs: int, width: int, pool) -> CapturedStep:
        longs = torch.zeros(4, bs, dtype=torch.long, device=self.device)
        ints = torch.zeros(2, bs, dtype=torch.int32, device=self.device)
        longs[2] = self.scratch_slot
        longs[3] = self.store.padding_row
        ints[1] = 1
        cu = torch.arange(bs + 1, dtype=torch.int32, device=self.device)

        def step() -> torch.Tensor:
            # a PENDING_TOKEN id is the slot's last draw, still on the device
            ids = torch.where(longs[0] < 0, self.next_tokens.index_select(0, longs[3]), longs[0])
            layout = StepLayout(
                num_tokens=bs, num_decode=bs, token_ids=ids, positions=longs[1], slots=longs[2],
                tables=self.store.table[:, :width].index_select(0, longs[3]), starts=ints[0], seq_lens=ints[1],
                cu_seqlens=cu, extend_cu=cu[:1], logits_rows=None, sample_slots=longs[3], host_chunks=[(0, 1, [])] * bs,
                max_new_tokens=0, max_seq_len=width * self.page_size)
            self.attention.plan(layout)
            return self.model(layout.token_ids, self.attention, None)

        blas = torch.backends.cuda.preferred_blas_library()
        if bs >= CUBLASLT_FROM_BATCH:      # the choice is baked into the captured kernels
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):       # warm-up (Triton compiles, BLAS picks) off the capture
                for _ in range(2):
                    step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
        finally:
            torch.backends.cuda.preferred_blas_library(blas)
        return CapturedStep(graph, longs, ints, logits)

    def bucket(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def can_run(self, chunks: list[SequenceChunk]) -> bool:
        return (bool(chunks) and len(chunks) <= self.sizes[-1]
                and all(len(c.token_ids) == 1 and c.sample is not None for c in chunks))

    def run(self, chunks: list[SequenceChunk], next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket's graph for these decode chunks -> (logits float32 [n, vocab], their
        seq slots [n] on the device)."""
        assert next_tokens is self.next_tokens
        n = len(chunks)
        pages = -(-max(c.start_position + 1 for c in chunks) // self.page_size)
        step = self.steps[self.bucket(n), table_width(pages, self.store.max_pages)]
        page_size = self.page_size
        # fresh pinned staging each step: with overlap the last step's copies may still be queued
        # (the caching host allocator keeps a block until the copy that read it is done)
        host_longs = torch.empty(step.longs.shape, dtype=torch.long, pin_memory=True)
        host_ints = torch.empty(step.ints.shape, dtype=torch.int32, pin_memory=True)
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
        step.longs.copy_(host_longs, non_blocking=True)
        step.ints.copy_(host_ints, non_blocking=True)
        step.graph.replay()
        return step.logits[:n], step.longs[3, :n]
