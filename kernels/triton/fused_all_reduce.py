"""All-reduce + residual add + RMSNorm in one kernel: a split point of tensor parallelism on two GPUs
(after attention's o projection and after the MLP's down projection), one launch instead of two.

Each rank's row-parallel projection leaves float32 partial sums [T, hidden] (backends/cuda/linear.py,
use_float32_output). One program per row: it stores its partial row straight into the peer's
exchange buffer over NVLink (a CUDA IPC mapping of the peer's memory) and polls its own buffer until
the peer's row has landed there, then does what one GPU does after the whole projection: the float32
sum rounded once to the activation dtype (one GPU's projection output), added to the residual row
(rounded and stored back, as `x += delta`) and RMS-normed with kernels/triton/layer_ops.py's
arithmetic. Two addends: a + b == b + a exactly, so both ranks get the same sum and the replicated
residual stream stays bit-identical across ranks.

No flags: the data carries its own arrival (the "Lamport" one-shot exchange). Buffer slots hold the
sentinel -0.0 until written, and a sent value of -0.0 goes as +0.0 (the sum's value is the same;
both ranks send and add the same pair, so they stay identical). A row is there when none of its
values is the sentinel; 32-bit stores land whole, so a value is either the sentinel or the sent one.
Against the flag exchange this saves the release fence before the flag and the read over NVLink
after it: one one-way trip of the data instead of a flag trip plus a read round trip.
Three slots by a call count per row kept on the device (graph replays keep counting): call e sends
into the peer's slot e % 3, reads its own slot e % 3 and resets its slot (e + 2) % 3, which it read
in call e - 1 and which the peer writes next in call e + 2: the peer gets there only after reading
this rank's call e + 1 data, sent after this kernel ended. The plain reference is
backends/cuda/collectives.py's TorchCollectives.add_rms_norm (NCCL or gloo sum of the float32
partials, then the layer ops' add_rms_norm of its rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.layer_ops import check_rows, needs_rne, norm_out, round_to, row_warps

SLOTS = 3
EMPTY_BITS = -2 ** 31       # float32 -0.0 as int32: a slot value not yet written by the peer


@triton.jit
def _all_reduce_add_rms_norm(P, X, W, Y, mine_ptr, peer_ptr, counts, error, n, slot_size, eps, s_p, s_x, s_y,
                             spin_limit, BLOCK: tl.constexpr, RNE: tl.constexpr, EMPTY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counts + row) + 1
    at = (epoch % 3) * slot_size + row * n + offs
    p = tl.load(P + row * s_p + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.where(p.to(tl.int32, bitcast=True) == EMPTY, 0.0, p)        # -0.0 goes as +0.0
    tl.store(peer_ptr + at, p, mask=mask)
    empty = tl.full([BLOCK], EMPTY, tl.int32).to(tl.float32, bitcast=True)
    tl.store(mine_ptr + ((epoch + 2) % 3) * slot_size + row * n + offs, empty, mask=mask)
    q = tl.load(mine_ptr + at, mask=mask, other=0.0, volatile=True)
    waiting = tl.max((q.to(tl.int32, bitcast=True) == EMPTY).to(tl.int32), 0)
    spins = spin_limit * 0
    while (waiting > 0) & (spins < spin_limit):
        q = tl.load(mine_ptr + at, mask=mask, other=0.0, volatile=True)
        waiting = tl.max((q.to(tl.int32, bitcast=True) == EMPTY).to(tl.int32), 0)
        spins += 1
    if waiting > 0:
        tl.store(error, 1)
    delta = round_to(p + q, X.dtype.element_ty, RNE).to(tl.float32)      # the projection's one rounding
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    x = round_to(x + delta, X.dtype.element_ty, RNE)
    tl.store(X + row * s_x + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    h = round_to(x * rstd, Y.dtype.element_ty, RNE).to(tl.float32)       # HF order, as layer_ops._rms_norm
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, round_to(w * h, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(counts + row, epoch)


def empty_slots(buffer: torch.Tensor) -> torch.Tensor:
    """Fill a float32 exchange buffer with the sentinel (before first use), in place."""
    assert buffer.dtype == torch.float32
    return buffer.view(torch.int32).fill_(EMPTY_BITS).view(torch.float32)


def all_reduce_add_rms_norm(partial: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                            mine: torch.Tensor, peer: torch.Tensor, counts: torch.Tensor, error: torch.Tensor,
                            spin_limit: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x += round(partial + the peer's partial) in place (x: [T, hidden], the residual stream), then
    returns rms_norm(x, weight). partial: [T, hidden], float32 (any float is read as float32).
    mine, peer: float32 [SLOTS * slot] exchange buffers (this rank's, the peer's mapping), filled
    with empty_slots() before the first call, T * hidden <= slot; counts: int64 [>= T], zeros at first;
    error: int32 [1], set when a wait gives up after spin_limit polls. No host sync (graph-safe)."""
    check_rows(x, "x")
    check_rows(partial, "partial")
    rows, n = x.shape
    assert partial.shape == x.shape, "partial must match x"
    assert mine.dtype == peer.dtype == torch.float32 and mine.shape == peer.shape and mine.dim() == 1
    slot_size = mine.numel() // SLOTS
    assert rows * n <= slot_size, f"{rows} rows of {n} exceed the exchange buffer ({slot_size} values)"
    assert counts.numel() >= rows, "one call count per row"
    out = norm_out(x, weight, out)
    block = triton.next_power_of_2(n)
    _all_reduce_add_rms_norm[(rows,)](
        partial, x, weight, out, mine, peer, counts, error, n, slot_size, eps,
        partial.stride(0), x.stride(0), out.stride(0), spin_limit, BLOCK=block, RNE=needs_rne(x.dtype),
        EMPTY=EMPTY_BITS, num_warps=row_warps(block))
    return out
