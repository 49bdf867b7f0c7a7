"""One step's token layout, built once per step and read by every layer's attention.

Rows are in batch order. The engine puts decodes first, so the leading run of single-token
sequences (`num_decode`) is the decode part, attended by the decode kernels as q[:num_decode];
every later sequence is an extend (prefill chunk). Device tensors come from one packed upload per
dtype; the page tables are gathered on the device from the PageTableStore, never sent whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backends.base import PENDING_TOKEN, SequenceChunk
from backends.cuda.page_tables import PageTableStore


@dataclass
class StepLayout:
    num_tokens: int
    num_decode: int                 # leading single-token sequences: rows [0, num_decode)
    token_ids: torch.Tensor         # long [T]
    positions: torch.Tensor         # long [T]
    slots: torch.Tensor             # long [T] flat KV slot (page * page_size + offset) of each new token
    tables: torch.Tensor            # int32 [B, table_width] page tables (past a sequence's pages: junk)
    starts: torch.Tensor            # int32 [B] tokens cached before this step
    seq_lens: torch.Tensor          # int32 [B] tokens after this step
    extend_cu: torch.Tensor         # int32 [E + 1] row offsets of the extends, counted from num_decode
    logits_rows: torch.Tensor       # long [N] rows whose next token is sampled
    sample_slots: torch.Tensor      # long [N] the seq slots of those rows
    host_chunks: list[tuple[int, int, list[int]]]   # (start, new tokens, page table) per sequence
    max_new_tokens: int             # longest extend chunk (0 when none)


def graph_batch(batch: int) -> int:
    """The CUDA-graph bucket a decode batch is padded to: 1, 2, 4, then multiples of 8. Eager
    steps plan their kernels for the same size, so a batch computes the same numbers with graphs
    and without."""
    if batch <= 4:
        return 1 << (batch - 1).bit_length()
    return -(-batch // 8) * 8


SMALLEST_WIDTH_PAGES = 256
# Each width class doubles the last: a sequence runs at less than twice its own pages. Kernels whose
# work follows the width (split-K splits, the sparse selectors' scoring and top-k over every entry of
# a row) pay that factor on every layer of every step; with classes four times apart a 32k-token
# sequence ran at 4096 pages instead of 2048 (H200, centroid selection b16: 6.1 us against 4.4 at
# its own width, bench/centroid_stages.py). The price is more captured graphs (log2 instead of
# log4 of the context's pages in widths, each with every batch bucket).
WIDTH_GROWTH = 2


def table_width(pages: int, max_pages: int) -> int:
    """The page-table width a step runs at: the smallest of 256, 512, 1024, ... pages (capped at
    max_pages) that holds its longest sequence. Kernels whose work follows the width then do not
    pay for the model's whole context on short sequences; graphs are captured per (bucket, width)
    and eager steps use the same widths."""
    width = SMALLEST_WIDTH_PAGES
    while width < pages and width < max_pages:
        width *= WIDTH_GROWTH
    return min(width, max_pages)


def table_widths(max_pages: int) -> list[int]:
    """Every width table_width can return."""
    widths, width = [], SMALLEST_WIDTH_PAGES
    while width < max_pages:
        widths.append(width)
        width *= WIDTH_GROWTH
    return widths + [max_pages]


def _upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(values)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def build_layout(chunks: list[SequenceChunk], store: PageTableStore, page_size: int,
                 device: torch.device, next_tokens: torch.Tensor) -> StepLayout:
    """The layout of an eager step (prefill, mixed, or decode outside the graph buckets).
    PENDING_TOKEN ids are read from next_tokens[seq_slot] on the device."""
    num_decode = 0
    while num_decode < len(chunks) and len(chunks[num_decode].token_ids) == 1:
        num_decode += 1
    starts = [c.start_position for c in chunks]
    lengths = [len(c.token_ids) for c in chunks]
    ends = [s + n for s, n in zip(starts, lengths, strict=True)]
    cu = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    positions = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    slot_parts = []
    for chunk, start, end in zip(chunks, starts, ends, strict=True):
        pos = np.arange(start, end)
        table = np.asarray(chunk.page_table[start // page_size:-(-end // page_size)], dtype=np.int64)
        slot_parts.append(table[pos // page_size - start // page_size] * page_size + pos % page_size)
    logits_rows = [int(cu[i + 1]) - 1 for i, c in enumerate(chunks) if c.sample is not None]
    sample_slots = [c.seq_slot for c in chunks if c.sample is not None]
    total = int(cu[-1])
    token_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=total)
    seq_slots = [c.seq_slot for c in chunks]
    longs = _upload(np.concatenate([positions, np.concatenate(slot_parts), seq_slots, logits_rows,
                                    sample_slots, token_ids, np.repeat(seq_slots, lengths)]).astype(np.int64),
                    device)
    extend_cu = cu[num_decode:] - num_decode
    ints = _upload(np.concatenate([starts, ends, extend_cu]).astype(np.int32), device)
    batch = len(chunks)
    # the int64 pack: positions, slots [T] | seq slots [B] | logits rows, sample slots [N] | ids, their slots [T]
    rows_at = 2 * total + batch
    sampled = len(logits_rows)
    ids_at = rows_at + 2 * sampled
    seq_rows = longs[2 * total:rows_at]
    ids = longs[ids_at:ids_at + total]
    if (token_ids == PENDING_TOKEN).any():
        ids = torch.where(ids == PENDING_TOKEN, next_tokens.index_select(0, longs[ids_at + total:]), ids)
    width = table_width(-(-max(ends) // page_size), store.max_pages)
    return StepLayout(
        num_tokens=total, num_decode=num_decode, token_ids=ids, positions=longs[:total],
        slots=longs[total:2 * total], tables=store.table[:, :width].index_select(0, seq_rows),
        starts=ints[:batch], seq_lens=ints[batch:2 * batch], extend_cu=ints[2 * batch:],
        logits_rows=longs[rows_at:rows_at + sampled], sample_slots=longs[rows_at + sampled:ids_at],
        host_chunks=[(start, count, c.page_table) for start, count, c in zip(starts, lengths, chunks, strict=True)],
        max_new_tokens=max(lengths[num_decode:], default=0))
