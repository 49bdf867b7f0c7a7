"""FakeBackend: the backend contract of backends/base.py with no model, for scheduler tests in milliseconds.

Why it is a real backend and not a mock: it keeps each sequence's state in its own KV pages and
reads it back through the page table of every chunk, the way attention does. Each KV slot
(page * page_size + offset) holds the token written there and a hash of the whole prefix that
token was computed under (a real model's K/V depends on every token before it). A chunk's logits
are a function of the tokens read back through its table only, and every slot read must carry the
prefix hash the tokens read so far give it. So a wrong page table, a page reused while still in
use, or a radix hit on the wrong pages changes the output or fails loudly; a correct scheduler
gives each sequence the same tokens alone, batched, chunked, cached or preempted.

Like backends/cuda/page_tables.py it mirrors each seq slot's table and only appends to it while
the chunk's table_epoch stays the same; a table rewritten without a new epoch is an error here (a
GPU would read stale pages). Sampling is TorchSampler on the CPU: the real sampling semantics.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from backends.base import PENDING_TOKEN, AttentionStats, BackendInfo, ForwardBatch, ForwardResult, SequenceChunk
from backends.cuda.sampler import TorchSampler
from backends.kv_store import COPY_DONE, KVLayout, PageCopy, Tier

_P = 0x100000001B3                        # odd, so invertible mod 2**64
_P_INV = pow(_P, -1, 1 << 64)


class FakeBackend:
    """Deterministic logits from the tokens in the KV pages; counters `steps` and `tokens_computed`."""

    def __init__(self, vocab_size: int = 64, page_size: int = 4, num_pages: int = 256,
                 max_sequences: int = 16, context_length: int = 1024, overlap: bool = False,
                 host_pages: int = 0):
        self.page_size, self.num_pages, self.max_sequences = page_size, num_pages, max_sequences
        self.context_length, self.vocab_size = context_length, vocab_size
        # overlap: the scheduler launches step N+1 before taking in step N's draws, as on a GPU;
        # PENDING_TOKEN chunks then read the slot's last draw, kept here as the GPU keeps it
        self.overlap = overlap
        self.last_draw = [None] * max_sequences
        self.info = BackendInfo(model_name="fake", backend="fake", device="cpu", dtype="float32",
                                num_pages=num_pages, page_size=page_size, context_length=context_length,
                                vocab_size=vocab_size)
        slots = num_pages * page_size
        self.kv_tokens = np.full(slots, -1, dtype=np.int64)      # -1: never written
        self.kv_hashes = np.zeros(slots, dtype=np.uint64)        # prefix hash of the token's position
        self._epoch = [-1] * max_sequences                       # the mirrored page-table store
        self._rows: list[list[int]] = [[] for _ in range(max_sequences)]
        # powers of P and P^-1 (mod 2**64): prefix hashes of a whole sequence in three numpy ops
        self._pow = np.cumprod(np.full(context_length, _P, dtype=np.uint64))       # wraps mod 2**64
        self._inv = np.cumprod(np.full(context_length, _P_INV, dtype=np.uint64))
        self.sampler = TorchSampler(vocab_size, torch.device("cpu"))
        self.kv_store = FakeKVStore(self, host_pages) if host_pages else None   # the host tier (L2)
        self.steps = 0               # forward calls that ran
        self.tokens_computed = 0     # new tokens whose KV was computed (prefill and decode)

    def _prefix_hashes(self, tokens: np.ndarray) -> np.ndarray:
        """h[i] = sum_{j<=i} (tokens[j] + 1) * P^(i-j) mod 2**64, for every i at once."""
        n = len(tokens)
        return self._pow[:n] * np.cumsum((tokens.astype(np.uint64) + np.uint64(1)) * self._inv[:n])

    def _validate(self, batch: ForwardBatch) -> None:
        """The checks of TorchRunner._validate (validate_batches), always on."""
        written, seq_slots = [], set()
        for c in batch.sequences:
            end, ps = c.end_position, self.page_size
            assert c.token_ids, "a sequence chunk must carry at least one new token"
            assert c.start_position >= 0
            assert end <= self.context_length, f"positions up to {end} exceed {self.context_length}"
            assert 0 <= c.seq_slot < self.max_sequences, f"seq_slot {c.seq_slot} out of range"
            assert c.seq_slot not in seq_slots, f"two sequences share seq_slot {c.seq_slot}"
            seq_slots.add(c.seq_slot)
            assert len(c.page_table) >= -(-end // ps), "page table too short"
            used = c.page_table[:-(-end // ps)]
            assert 0 <= min(used) and max(used) < self.num_pages, f"page id out of range in {used}"
            assert 0 <= min(c.token_ids) and max(c.token_ids) < self.vocab_size, "token id out of range"
            written.append(self._slots(used, c.start_position, end))
        flat = np.concatenate(written) if written else np.zeros(0, dtype=np.int64)
        assert len(np.unique(flat)) == len(flat), "two sequences write the same KV slot"

    def _slots(self, table: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(table, dtype=np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size

    def _sync_row(self, c: SequenceChunk) -> list[int]:
        """The slot's mirrored table: appended within an epoch, replaced on a new one."""
        needed = -(-c.end_position // self.page_size)
        if self._epoch[c.seq_slot] != c.table_epoch:
            self._epoch[c.seq_slot], self._rows[c.seq_slot] = c.table_epoch, []
        row = self._rows[c.seq_slot]
        row.extend(c.page_table[len(row):needed])
        assert row[:needed] == list(c.page_table[:needed]), (
            f"stale page table in slot {c.seq_slot}: {row[:needed]} != {c.page_table[:needed]} "
            f"(table rewritten without a new table_epoch)")
        return row

    def _run(self, c: SequenceChunk) -> np.ndarray:
        """Read the prefix back through the table, check it, write the new tokens; the logits."""
        row = self._sync_row(c)
        old = self._slots(row, 0, c.start_position)
        tokens = np.concatenate([self.kv_tokens[old], np.asarray(c.token_ids, dtype=np.int64)])
        assert (tokens[:c.start_position] >= 0).all(), f"slot {c.seq_slot} reads KV never written"
        hashes = self._prefix_hashes(tokens)
        bad = np.flatnonzero(self.kv_hashes[old] != hashes[:c.start_position])
        assert not len(bad), (f"slot {c.seq_slot} reads KV computed under another prefix at positions "
                              f"{bad[:8].tolist()} (a page reused or mapped wrongly)")
        new = self._slots(row, c.start_position, c.end_position)
        self.kv_tokens[new], self.kv_hashes[new] = tokens[c.start_position:], hashes[c.start_position:]
        # Logits: a generator seeded by the whole prefix's hash (read back from the pages).
        rng = np.random.default_rng(int(hashes[-1]))
        return (rng.standard_normal(self.vocab_size) * 2.0).astype(np.float32)

    def launch(self, batch: ForwardBatch) -> Finished:
        """forward(), run now; the result is handed over when asked (as the GPU's would be)."""
        return Finished(self.forward(batch))

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        """Validate, run every chunk (KV written), sample the chunks with a SampleSpec."""
        batch = ForwardBatch([self._resolve(c) for c in batch.sequences], batch.return_logits)
        self._validate(batch)
        rows = [self._run(c) for c in batch.sequences]
        self.steps += 1
        self.tokens_computed += batch.num_tokens
        picked = [r for r, c in zip(rows, batch.sequences, strict=True) if c.sample is not None]
        specs = [c.sample for c in batch.sequences if c.sample is not None]
        if not specs:
            return ForwardResult([], AttentionStats(), np.zeros((0, self.vocab_size), np.float32)
                                 if batch.return_logits else None)
        logits = np.stack(picked)
        tokens = self.sampler.sample(torch.from_numpy(logits), specs)
        sampled = [c for c in batch.sequences if c.sample is not None]
        for chunk, token in zip(sampled, tokens, strict=True):
            self.last_draw[chunk.seq_slot] = token.token_id
        return ForwardResult(tokens, AttentionStats(), logits if batch.return_logits else None)

    def _resolve(self, c: SequenceChunk) -> SequenceChunk:
        if c.token_ids != [PENDING_TOKEN]:
            assert PENDING_TOKEN not in c.token_ids, "PENDING_TOKEN only as a decode chunk's one token"
            return c
        token = self.last_draw[c.seq_slot]
        assert token is not None, f"slot {c.seq_slot} has no draw to read"
        self.last_draw[c.seq_slot] = None
        return replace(c, token_ids=[token])


@dataclass
class Finished:
    """A step that already ran (backends/base.PendingForward)."""

    value: ForwardResult

    def result(self) -> ForwardResult:
        return self.value


class FakeKVStore:
    """The host tier of a FakeBackend: each host page holds a page's tokens and prefix hashes, so a
    page that comes back from L2 or L3 wrong fails the fake's prefix check when it is read."""

    def __init__(self, backend: FakeBackend, num_host_pages: int):
        self.backend, self.num_host_pages = backend, num_host_pages
        ps = backend.page_size
        self.layout = KVLayout(model="fake", weights="fake", kv_dtype="int64", device="cpu", attention="fake",
                               page_size=ps, num_layers=1, kv_heads=1, head_dim=1, summary_tokens=None,
                               page_bytes=16 * ps)
        self.host = np.zeros((num_host_pages, 16 * ps), dtype=np.uint8)
        self.copies = 0              # copy_pages calls (tests count moves)

    def _device_page(self, page: int) -> np.ndarray:
        ps, b = self.backend.page_size, self.backend
        return np.concatenate([b.kv_tokens[page * ps:(page + 1) * ps].view(np.uint8),
                               b.kv_hashes[page * ps:(page + 1) * ps].view(np.uint8)])

    def copy_pages(self, src: Tier, dst: Tier, src_pages, dst_pages) -> PageCopy:
        assert len(src_pages) == len(dst_pages) and src is not dst
        ps, b = self.backend.page_size, self.backend
        self.copies += 1
        for s, d in zip(src_pages, dst_pages, strict=True):
            if src is Tier.DEVICE:
                assert 0 <= s < b.num_pages and 0 <= d < self.num_host_pages, (s, d)
                self.host[d] = self._device_page(s)
            else:
                assert 0 <= s < self.num_host_pages and 0 <= d < b.num_pages, (s, d)
                b.kv_tokens[d * ps:(d + 1) * ps] = self.host[s, :8 * ps].view(np.int64)
                b.kv_hashes[d * ps:(d + 1) * ps] = self.host[s, 8 * ps:].view(np.uint64)
        return COPY_DONE

    def read_host_page(self, page: int) -> memoryview:
        return memoryview(self.host[page])

    def write_host_page(self, page: int, data: bytes) -> None:
        self.host[page] = np.frombuffer(data, dtype=np.uint8)
