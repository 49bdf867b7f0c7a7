"""The device-resident page tables of the running sequences (`req_to_page`), appended, not rebuilt.

One int32 row per sequence slot (the engine's SequenceChunk.seq_slot) holds that sequence's page
ids. A step sends only what changed: the pages appended since the last step, or the whole row when
the chunk's table_epoch says the engine rewrote the table (a new request in the slot, a prefix
swapped for the radix cache's pages). The extra last row points every entry at the KV cache's
scratch page: CUDA-graph padding rows read and write only there.
"""
from __future__ import annotations

import torch

from backends.base import SequenceChunk


class PageTableStore:
    """req_to_page: int32 [max_sequences + 1, max_pages] on the device, with a host mirror of what
    each row holds (epoch and length), so a decode step usually uploads nothing."""

    def __init__(self, max_sequences: int, max_pages: int, scratch_page: int, device: torch.device):
        self.max_sequences, self.max_pages = max_sequences, max_pages
        self.padding_row = max_sequences
        self.table = torch.zeros(max_sequences + 1, max_pages, dtype=torch.int32, device=device)
        self.table[self.padding_row] = scratch_page
        self._epoch = [-1] * max_sequences
        self._synced = [0] * max_sequences

    def sync(self, chunks: list[SequenceChunk], page_size: int) -> None:
        """Bring every chunk's row up to the pages its new tokens need; one upload for all changes."""
        rows: list[int] = []
        cols: list[int] = []
        values: list[int] = []
        for chunk in chunks:
            slot = chunk.seq_slot
            assert 0 <= slot < self.max_sequences, f"seq_slot {slot} outside [0, {self.max_sequences})"
            needed = -(-chunk.end_position // page_size)
            assert needed <= self.max_pages, f"{needed} pages exceed the table width {self.max_pages}"
            if self._epoch[slot] != chunk.table_epoch:
                self._epoch[slot], self._synced[slot] = chunk.table_epoch, 0
            start = self._synced[slot]
            if start < needed:
                rows.extend([slot] * (needed - start))
                cols.extend(range(start, needed))
                values.extend(chunk.page_table[start:needed])
                self._synced[slot] = needed
        if rows:
            host = torch.tensor([rows, cols, values], dtype=torch.int64)
            if self.table.is_cuda:
                host = host.pin_memory()
            index = host.to(self.table.device, non_blocking=True)
            self.table[index[0], index[1]] = index[2].to(torch.int32)

    def check(self, chunks: list[SequenceChunk], page_size: int) -> None:
        """Debug check: every chunk's device row equals its host page table (syncs the device)."""
        for chunk in chunks:
            needed = -(-chunk.end_position // page_size)
            row = self.table[chunk.seq_slot, :needed].tolist()
            assert row == list(chunk.page_table[:needed]), \
                f"device page table of slot {chunk.seq_slot} is stale: {row} != {chunk.page_table[:needed]}"

    def forget(self, slot: int) -> None:
        """Mark a slot's row unknown (its next chunk uploads the whole table)."""
        self._epoch[slot], self._synced[slot] = -1, 0
