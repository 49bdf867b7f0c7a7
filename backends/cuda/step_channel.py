"""Rank 0 tells the follower ranks what each step runs: one fixed-size int64 message per step.

A step is its chunks' seq slots, table epochs, start positions, token ids, whether each samples,
and only the page ids a follower has not had yet for that slot and epoch (the page tables grow by
appending, as in backends/cuda/page_tables.py), so a decode step is a few dozen numbers. The
message is a broadcast over a gloo group on the host: followers get the step as soon as rank 0's
host has built it and queue it on their GPU as early as rank 0 does (with an NCCL broadcast the
step would land on the device and each follower would wait for it there before launching).
A step too large for one message (long prefill chunks, new page tables) sends the rest in a second
broadcast whose size the first gives. Sampling stays on rank 0 (FOLLOWER_SAMPLE is a placeholder).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from backends.base import SampleSpec, SequenceChunk
from backends.sampling_params import SamplingParams

MESSAGE_WORDS = 1024          # int64 words per message (8 KB): a decode step of 64 sequences fits
STOP, STEP = 0, 1
CHUNK_WORDS = 7               # seq_slot, table_epoch, start, tokens, samples, reset, new pages
# followers only need to know that a chunk samples (its row is gathered and graphs apply), not how
FOLLOWER_SAMPLE = SampleSpec(SamplingParams(temperature=0.0), 0.0)


class StepSender:
    """Rank 0's side: encodes each step for the followers and tracks the page ids they hold."""

    def __init__(self, group, max_sequences: int, page_size: int):
        self.group, self.page_size = group, page_size
        self._epoch = [None] * max_sequences
        self._sent = [0] * max_sequences
        self.buffer = torch.zeros(MESSAGE_WORDS, dtype=torch.int64)

    def send(self, chunks: list[SequenceChunk]) -> None:
        words = [len(chunks)]
        for chunk in chunks:
            slot, needed = chunk.seq_slot, -(-chunk.end_position // self.page_size)
            reset = self._epoch[slot] != chunk.table_epoch
            if reset:
                self._epoch[slot], self._sent[slot] = chunk.table_epoch, 0
            sent = self._sent[slot]
            pages = chunk.page_table[sent:needed]
            self._sent[slot] = max(sent, needed)
            words += [slot, chunk.table_epoch, chunk.start_position, len(chunk.token_ids),
                      chunk.sample is not None, reset, len(pages)]
            words += chunk.token_ids
            words += pages
        self._broadcast(STEP, words)

    def stop(self) -> None:
        self._broadcast(STOP, [])

    def forget(self, slot: int) -> None:
        """The followers' copy of this slot's table is resent whole with its next chunk."""
        self._epoch[slot], self._sent[slot] = None, 0

    def _broadcast(self, kind: int, words: list[int]) -> None:
        head = MESSAGE_WORDS - 2
        self.buffer[0], self.buffer[1] = kind, len(words)
        first = min(len(words), head)
        self.buffer[2:2 + first] = torch.tensor(words[:first], dtype=torch.int64)
        dist.broadcast(self.buffer, src=0, group=self.group)
        if len(words) > head:
            dist.broadcast(torch.tensor(words[head:], dtype=torch.int64), src=0, group=self.group)


class StepReceiver:
    """A follower's side: decodes steps into the chunks rank 0 ran, page tables rebuilt locally."""

    def __init__(self, group, max_sequences: int):
        self.group = group
        self._tables: list[list[int]] = [[] for _ in range(max_sequences)]
        self.buffer = torch.zeros(MESSAGE_WORDS, dtype=torch.int64)

    def receive(self) -> list[SequenceChunk] | None:
        """The next step's chunks; None when rank 0 stops the group."""
        dist.broadcast(self.buffer, src=0, group=self.group)
        kind, length = int(self.buffer[0]), int(self.buffer[1])
        if kind == STOP:
            return None
        assert kind == STEP, f"unknown step message kind {kind}"
        head = MESSAGE_WORDS - 2
        words = self.buffer[2:2 + min(length, head)].tolist()
        if length > head:
            rest = torch.empty(length - head, dtype=torch.int64)
            dist.broadcast(rest, src=0, group=self.group)
            words += rest.tolist()
        chunks, at = [], 1
        for _ in range(words[0]):
            slot, epoch, start, tokens, samples, reset, pages = words[at:at + CHUNK_WORDS]
            at += CHUNK_WORDS
            token_ids = words[at:at + tokens]
            at += tokens
            if reset:
                self._tables[slot] = []
            self._tables[slot] += words[at:at + pages]
            at += pages
            chunks.append(SequenceChunk(token_ids, start, self._tables[slot], slot, epoch,
                                        FOLLOWER_SAMPLE if samples else None))
        assert at == length, f"step message of {length} words decoded to {at}"
        return chunks
