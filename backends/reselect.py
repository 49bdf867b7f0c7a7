"""When a decode step may reuse the sequences' earlier page selections (sparse_attention.reselect_every).

Quest scoring reads every page summary of every sequence at every step; the pages a query needs
change slowly from one token to the next. With reselect_every = R > 1 a selection serves R decode
steps: the pages it chose by score are kept, and the recent window follows the sequence
(kernels/reference.py, reused_pages). Scoring then costs 1/R of its bytes per step.

The decision is per step and for the whole batch, so that a CUDA graph either runs the scoring
kernels for every row or for none (a graph per variant, no per-row branches): a step reuses only
when every decode row holds a selection younger than R steps; otherwise every decode row selects
afresh (a row that is not yet due is merely refreshed early). A row is due when it has no selection
(a new sequence in its slot, or its table rewritten: a new table_epoch), when its selection is R
steps old, and when it has just grown past the budget (its selection kept all of its pages then,
not a budget's worth). Every rank of a tensor-parallel model sees the same chunks and so decides
the same. The decision is host-side bookkeeping only: nothing here touches a device.
"""
from __future__ import annotations

from collections.abc import Sequence

from backends.base import SequenceChunk


class ReselectClock:
    """Per seq slot: the table epoch and sequence length of its last selection."""

    def __init__(self, every: int, page_size: int, budget_pages: int):
        assert every >= 1 and page_size >= 1 and budget_pages >= 1
        self.every, self.page_size, self.budget_pages = every, page_size, budget_pages
        self._selected: dict[int, tuple[int, int]] = {}      # seq slot -> (table epoch, length)

    def step(self, decode_rows: Sequence[SequenceChunk]) -> bool:
        """Whether this step's decode rows (single-token chunks) reuse their selections; when they
        do not, records that each of them selects now."""
        if self.every == 1 or not decode_rows:
            return False
        if all(self._fresh(chunk) for chunk in decode_rows):
            return True
        for chunk in decode_rows:
            self._selected[chunk.seq_slot] = (chunk.table_epoch, chunk.end_position)
        return False

    def _fresh(self, chunk: SequenceChunk) -> bool:
        record = self._selected.get(chunk.seq_slot)
        if record is None or record[0] != chunk.table_epoch:
            return False
        selected_at, now = record[1], chunk.end_position
        if not 0 < now - selected_at < self.every:
            return False
        crossed = -(-selected_at // self.page_size) <= self.budget_pages < -(-now // self.page_size)
        return not crossed
