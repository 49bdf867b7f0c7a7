"""The step metadata of the torch-op attention backends (torch, cpu_fused): slots, touched pages,
prefill chunks and padded decode page tables, built once per step from the host's chunks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backends.base import AttentionStats, SparseSettings


@dataclass
class PrefillSeq:
    """One sequence attending more than one new token (prefill or extend)."""

    offset: int                 # first row of its tokens in the flattened batch
    start: int                  # tokens already cached before this chunk
    length: int                 # new tokens
    page_table: torch.Tensor    # long, pages covering [0, start + length)


@dataclass
class AttentionMetadata:
    """Everything the layers need about the batch layout, built once per forward."""

    slots: torch.Tensor                  # [T] flat slot (page * page_size + offset) of each new token
    slot_list: list[int]                 # the same on the host (summary indices derive from it)
    summary_pages: torch.Tensor          # [S] pages touched by this batch
    summary_filled: torch.Tensor         # [S] written slots of each touched page after the batch
    prefill: list[PrefillSeq]
    decode_rows: torch.Tensor            # [B] rows of single-token sequences in the flattened batch
    decode_pages: torch.Tensor           # [B, P] their page tables, padded with page 0
    decode_mask: torch.Tensor            # [B, 1, 1, P * page_size] True where the key is attended
    decode_lengths: torch.Tensor         # [B] sequence length including the new token
    sparse: SparseSettings | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    # Fast-path extras (the fields above keep their meaning for sparse_attention.py):
    decode_only: bool = False            # every chunk is one new token, each on a page of its own
    decode_max_length: int = 0           # max(decode_lengths), known on the host
    decode_slot_index: torch.Tensor | None = None   # flat key slots of the decodes, built lazily
    summary_plan: SummaryPlan | None = None         # how this batch updates summaries, built lazily


def build_metadata(chunks: list[tuple[int, int, list[int]]], page_size: int,
                   device: torch.device | str, sparse: SparseSettings | None = None
                   ) -> AttentionMetadata:
    """chunks: (start_position, new_tokens, page_table) per sequence, in batch order."""
    slots, pages, filled, prefill = [], [], [], []
    decode_rows, decode_tables, decode_lengths = [], [], []
    offset = 0
    for start, length, table in chunks:
        end = start + length
        for pos in range(start, end):
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        for logical in range(start // page_size, -(-end // page_size)):
            pages.append(table[logical])
            filled.append(min(page_size, end - logical * page_size))
        used = table[:-(-end // page_size)]
        if length == 1:
            decode_rows.append(offset)
            decode_tables.append(used)
            decode_lengths.append(end)
        else:
            prefill.append(PrefillSeq(offset, start, length,
                                      torch.tensor(used, dtype=torch.long, device=device)))
        offset += length
    width = max((len(t) for t in decode_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in decode_tables]
    lengths = torch.tensor(decode_lengths, dtype=torch.long)
    mask = torch.arange(width * page_size).unsqueeze(0) < lengths.unsqueeze(1)

    def as_long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    # All single-token chunks on distinct pages: summaries update in place (min/max with the new key).
    decode_only = not prefill and len(set(pages)) == len(pages)
    return AttentionMetadata(
        slots=as_long(slots), slot_list=slots, summary_pages=as_long(pages),
        summary_filled=as_long(filled), prefill=prefill, decode_rows=as_long(decode_rows),
        decode_pages=torch.tensor(padded, dtype=torch.long, device=device).view(len(padded), width),
        decode_mask=mask.view(len(padded), 1, 1, width * page_size).to(device),
        decode_lengths=lengths.to(device), sparse=sparse, decode_only=decode_only,
        decode_max_length=max(decode_lengths, default=0))


@dataclass
class SummaryPlan:
    """How one forward updates the key summaries, the same for every layer (built once).

    Decode-only batches fold each new key into its block's summary in place: `blocks` [T] are the
    flat block rows (page * blocks_per_page + slot // summary_tokens, i.e. slot // summary_tokens),
    `opens_block` [T, 1, 1] says the key is the block's first, and `opened_pages` lists the pages a
    key opens at slot 0, whose blocks are all zeroed first (a recycled page keeps nothing of its
    previous owner); `page_rows` [T] and `opens_page` [T, 1, 1] do the same for the page summaries
    (slot // page_size; the key is the page's first). Other batches recompute every block of every
    touched page from the cache:
    `unwritten` [S, blocks, summary_tokens, 1, 1] marks slots at or past `summary_filled`, and
    `empty` [S, blocks, 1, 1] blocks with no written slot (their summary is 0).
    """

    summary_tokens: int
    blocks: torch.Tensor | None = None
    opens_block: torch.Tensor | None = None
    opened_pages: torch.Tensor | None = None
    page_rows: torch.Tensor | None = None
    opens_page: torch.Tensor | None = None
    unwritten: torch.Tensor | None = None
    empty: torch.Tensor | None = None
