"""A one-shot all-reduce between two GPUs of one host over peer-to-peer buffers (CUDA, 2 ranks).

Why: a decode step at batch 1 all-reduces 2 x layers small tensors (8-16 KB); NCCL takes 19-20 us
each even inside a CUDA graph (docs/cuda.md), which alone caps Llama-3-8B at TP=2 near 1.3x of
one GPU. Here one Triton kernel per call does the whole exchange: each program copies its block of
the input into this rank's buffer, raises its flag in the peer's memory (release, system scope),
waits for the peer's flag in its own memory (acquire), then reads the peer's block over NVLink and
writes the sum. No multicast: plain loads and stores through mappings of the peer's memory (CUDA
IPC), which is vLLM's custom all-reduce idea written as one Triton kernel.

Flags count calls per block (int64, kept on the device, so graph replays keep counting) and the
data buffer alternates between two halves by the count's parity: a rank writes a half again only
two calls later, after the peer's flag for the call in between, which the peer raises only once
its previous kernel (the reads of that half) has ended. Blocks have one fixed size, so a block's
buffer range is the same whatever the tensor's size. a + b == b + a exactly, so both ranks get
identical sums (as with NCCL). Tensors above the buffer (prefill) go through NCCL. In the start-up
self-test a wait that spins past TEST_SPIN_LIMIT gives up and raises an error flag, and both
ranks fall back to NCCL rather than hang; serving waits for the peer as NCCL does.

The split points of the model (add_rms_norm: the sum of the row-parallel projections' float32
partials, the residual add and the next RMSNorm) use a second exchange of whole float32 rows and
kernels/triton/fused_all_reduce.py, one launch per split point, when the layer ops are Triton's:
there the data marks its own arrival (three slots, no flags; that file says why it is safe), which
cuts each of the 2 x layers calls per step from 5.2 to 3.8 us on two H200s. Each exchange has its own buffer and counts.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from backends.cuda.collectives import TorchCollectives
from backends.cuda.layer_ops import TritonLayerOps
from kernels.triton import layer_ops
from kernels.triton.fused_all_reduce import SLOTS, all_reduce_add_rms_norm, empty_slots

log = logging.getLogger("radixgate.parallel")
BLOCK = 4096                  # elements per program (a batch-1 Llama-3-8B activation is one block)
CAPACITY_BYTES = 1 << 20      # per buffer half: batch 64 x hidden 8192 in bf16
ROW_CAPACITY_BYTES = 2 << 20  # per slot of the split points' exchange: 64 rows x hidden 8192 in float32
TEST_SPIN_LIMIT = 1 << 22     # the self-test's polls of the peer's flag before giving up (seconds)
SERVE_SPIN_LIMIT = 1 << 62    # serving waits for the peer as long as NCCL would (a dead peer: see docs/cuda.md)


@triton.jit
def _one_shot_kernel(x_ptr, mine_ptr, peer_ptr, my_flags, peer_flags, counts, error, n, half, spin_limit,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counts + pid) + 1
    at = (epoch % 2) * half + offs
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(mine_ptr + at, x, mask=mask)
    tl.debug_barrier()                  # every thread's block stored before the flag goes up
    tl.atomic_xchg(peer_flags + pid, epoch, sem="release", scope="sys")
    seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")
    spins = spin_limit * 0
    while (seen < epoch) & (spins < spin_limit):
        seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")
        spins += 1
    tl.debug_barrier()
    if seen < epoch:
        tl.store(error, 1)
    y = tl.load(peer_ptr + at, mask=mask, cache_modifier=".cv")
    if x.dtype == tl.float32:
        total = x + y
    else:           # one rounding of the exact sum, to nearest even, as NCCL's bf16/fp16 sum
        total = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype, fp_downcast_rounding="rtne")
    tl.store(x_ptr + offs, total, mask=mask)
    tl.store(counts + pid, epoch)


def _share(tensor: torch.Tensor) -> tuple:
    """What a peer process needs to map this tensor's memory (CUDA IPC, as torch.multiprocessing does)."""
    storage = tensor.untyped_storage()
    _, handle, size, offset, ref_handle, ref_offset, event, _ = storage._share_cuda_()
    return handle, size, offset, ref_handle, ref_offset, event, tensor.storage_offset(), tensor.numel(), tensor.dtype


def _open(shared: tuple, device: torch.device) -> torch.Tensor:
    """The peer's tensor mapped into this process, opened from this rank's device (the driver
    enables peer access to the owner's GPU)."""
    handle, size, offset, ref_handle, ref_offset, event, element_offset, numel, dtype = shared
    # no event wait: the owner synchronised its device after zeroing the buffers, before sharing
    storage = torch.UntypedStorage._new_shared_cuda(device.index, handle, size, offset, ref_handle, ref_offset,
                                                    event, False)
    tensor = torch.empty(0, dtype=dtype, device=device)
    tensor.set_(storage, element_offset, (numel,))
    return tensor


class Exchange:
    """One rank's side of a one-shot exchange: a data buffer of `parts` parts of capacity_bytes
    (two halves for the flag exchange, SLOTS for the split points'), the flags the peer raises and
    this rank's call counts (one per block or row); the peer's data and flags once connected."""

    def __init__(self, capacity_bytes: int, slots: int, device: torch.device, parts: int = 2):
        self.data = torch.zeros(parts * capacity_bytes, dtype=torch.uint8, device=device)
        self.flags = torch.zeros(slots, dtype=torch.int64, device=device)      # the peer raises these
        self.counts = torch.zeros(slots, dtype=torch.int64, device=device)
        self.peer_data = self.peer_flags = None

    def share(self) -> tuple:
        return _share(self.data), _share(self.flags)

    def connect(self, peer_shared: tuple) -> None:
        self.peer_data = _open(peer_shared[0], self.data.device)
        self.peer_flags = _open(peer_shared[1], self.data.device)


class PeerCollectives(TorchCollectives):
    """TorchCollectives whose all-reduce of tensors up to CAPACITY_BYTES is the one-shot kernel,
    and whose add_rms_norm of up to max_rows rows is the fused kernel (Triton layer ops only: it
    computes their RMSNorm). Made in two steps on both ranks: allocate (then exchange share() with
    the peer), connect()."""

    def __init__(self, group, device: torch.device, vocab_start: int, vocab_shard: int, vocab_size: int,
                 ops, hidden_size: int):
        super().__init__(group, 2, vocab_start, vocab_shard, vocab_size, ops)
        self.flat = Exchange(CAPACITY_BYTES, CAPACITY_BYTES // 2 // BLOCK + 1, device)
        self.fused = isinstance(ops, TritonLayerOps)
        self.hidden_size = hidden_size
        assert vocab_size < 2 ** 24, "share_from_first carries token ids as float32"
        self.max_rows = ROW_CAPACITY_BYTES // 4 // hidden_size if self.fused else 0
        self.rows = Exchange(ROW_CAPACITY_BYTES, self.max_rows + 1, device, parts=SLOTS)
        empty_slots(self.rows.data.view(torch.float32))        # no flags: the data marks its arrival
        self.error = torch.zeros(1, dtype=torch.int32, device=device)
        self.spin_limit = TEST_SPIN_LIMIT
        torch.cuda.synchronize(device)

    def share(self) -> tuple:
        return self.flat.share(), self.rows.share()

    def connect(self, peer_shared: tuple) -> None:
        self.flat.connect(peer_shared[0])
        self.rows.connect(peer_shared[1])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * x.element_size() > CAPACITY_BYTES or not x.is_contiguous():
            return super().all_reduce(x)
        half = CAPACITY_BYTES // x.element_size()
        ex = self.flat
        _one_shot_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, ex.data.view(x.dtype), ex.peer_data.view(x.dtype), ex.flags, ex.peer_flags, ex.counts, self.error,
            x.numel(), half, self.spin_limit, BLOCK=BLOCK, num_warps=4)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The one-shot all-reduce of the logits row placed at this rank's vocabulary rows, zeros
        elsewhere (x + 0 is exact): one peer kernel instead of an NCCL all-gather per step."""
        rows = logits.shape[0]
        width = self.world * self.vocab_shard
        if rows * width * logits.element_size() > CAPACITY_BYTES:
            return super().gather_vocab(logits)
        whole = logits.new_zeros(rows, width)
        whole[:, self.vocab_start:self.vocab_start + self.vocab_shard] = logits
        return self.all_reduce(whole)[:, :self.vocab_size]

    def share_from_first(self, values: torch.Tensor) -> None:
        """Rank 0's int64 token ids on every rank through the one-shot all-reduce: float32 holds
        every id below 2^24 exactly, and the other rank adds zeros."""
        if values.numel() * 4 > CAPACITY_BYTES or values.dtype != torch.int64:
            return super().share_from_first(values)
        carried = values.float() if self.group.rank() == 0 else torch.zeros(values.shape, device=values.device)
        values.copy_(self.all_reduce(carried))

    def add_rms_norm(self, x: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """TorchCollectives.add_rms_norm in one kernel (kernels/triton/fused_all_reduce.py) for up
        to max_rows rows (decode batches); prefill goes through NCCL."""
        if x.shape[0] > self.max_rows or partial.stride(-1) != 1:
            return super().add_rms_norm(x, partial, weight)
        ex = self.rows
        return all_reduce_add_rms_norm(partial, x, weight, self.ops.eps, ex.data.view(torch.float32),
                                       ex.peer_data.view(torch.float32), ex.counts, self.error, self.spin_limit)

    def self_test(self) -> bool:
        """Random tensors of several sizes against NCCL's sums, bit for bit; the fused split point
        against NCCL + the Triton add_rms_norm (the residual bit for bit, the norm within a bf16
        step: its row sum may reduce in another order); and no timed-out wait."""
        device = self.flat.data.device
        gen = torch.Generator(device=device).manual_seed(1234 + self.group.rank())
        ok = True
        for numel in (1, 4096, 8192 + 3, 64 * 4096, CAPACITY_BYTES // 2):
            for dtype in (torch.bfloat16, torch.float32):
                if numel * dtype.itemsize > CAPACITY_BYTES:
                    continue
                x = torch.randn(numel, generator=gen, device=device).to(dtype)
                want = x.clone()
                dist.all_reduce(want, group=self.group)
                for _ in range(3):                  # both halves of the buffer, and back
                    got = self.all_reduce(x.clone())
                    ok = ok and bool(torch.equal(got, want))
        for rows in (1, 3):                 # the vocabulary gather and the drawn ids, against NCCL's
            logits = torch.randn(rows, self.vocab_shard, generator=gen, device=device).to(torch.bfloat16)
            ok = ok and bool(torch.equal(self.gather_vocab(logits), super().gather_vocab(logits)))
            ids = torch.randint(0, self.vocab_size, (65,), generator=gen, device=device)
            want, got = ids.clone(), ids.clone()
            super().share_from_first(want)
            self.share_from_first(got)
            ok = ok and bool(torch.equal(got, want))
        shared = torch.Generator(device=device).manual_seed(99)     # the residual and norm: the same on both
        for rows in sorted({1, 3, min(64, self.max_rows), self.max_rows} - {0}):
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(rows, self.hidden_size, generator=shared, device=device).to(dtype)
                weight = (1 + 0.1 * torch.randn(self.hidden_size, generator=shared, device=device)).to(dtype)
                partial = torch.randn(rows, self.hidden_size, generator=gen, device=device)
                want_x, summed = x.clone(), partial.clone()
                dist.all_reduce(summed, group=self.group)
                want = layer_ops.add_rms_norm(want_x, summed.to(dtype), weight, self.ops.eps)
                for _ in range(SLOTS + 1):          # every slot, and back to the first
                    got_x = x.clone()
                    got = self.add_rms_norm(got_x, partial.clone(), weight)
                    ok = ok and bool(torch.equal(got_x, want_x))
                    ok = ok and bool(torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-5))
        torch.cuda.synchronize(device)
        self.spin_limit = SERVE_SPIN_LIMIT
        return ok and int(self.error.item()) == 0


def _all_agree(ok: bool, channel) -> bool:
    verdict = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=channel)
    return bool(verdict.item())


def create_peer_collectives(group, channel, rank: int, device: torch.device, vocab_start: int, vocab_shard: int,
                            vocab_size: int, ops, hidden_size: int) -> TorchCollectives | None:
    """PeerCollectives when both ranks map each other's buffers and pass the self-test, else None.
    Every step ends in the same collectives on both ranks whatever failed where, so both fall
    back to NCCL together and never wait in different collectives."""
    collectives, shared, reason = None, None, ""
    try:
        peer_device = torch.device("cuda", (device.index or 0) - rank + 1 - rank)
        if not torch.cuda.can_device_access_peer(device, peer_device):
            raise RuntimeError(f"{device} has no peer access to {peer_device}")
        collectives = PeerCollectives(group, device, vocab_start, vocab_shard, vocab_size, ops, hidden_size)
        shared = collectives.share()
    except Exception as error:          # e.g. no peer access, no CUDA IPC here
        reason = f"{type(error).__name__}: {error}"
    both: list = [None, None]
    dist.all_gather_object(both, shared, group=channel)
    ok = all(entry is not None for entry in both)
    if ok:
        try:
            collectives.connect(both[1 - rank])
        except Exception as error:
            ok, reason = False, f"{type(error).__name__}: {error}"
    if _all_agree(ok, channel):
        try:
            ok = collectives.self_test()
            reason = "" if ok else "the self-test's sums differ from NCCL's or a wait timed out"
        except Exception as error:
            ok, reason = False, f"{type(error).__name__}: {error}"
        if _all_agree(ok, channel):
            log.info("peer-to-peer one-shot all-reduce on (up to %d bytes; NCCL above); split points fused "
                     "with the RMSNorm up to %d rows", CAPACITY_BYTES, collectives.max_rows)
            return collectives
    log.warning("peer-to-peer all-reduce off, NCCL serves every all-reduce (%s)",
                reason or "it failed on the other rank")
    return None
