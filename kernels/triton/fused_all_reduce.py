"""All-reduce + residual add + RMSNorm in one kernel: a split point of tensor parallelism on two GPUs
(after attention's o projection and after the MLP's down projection), one launch instead of two.

Each rank's row-parallel projection leaves float32 partial sums [T, hidden] (backends/cuda/linear.py,
use_float32_output). One program per row: it stores its partial row into this rank's exchange
buffer, raises its flag in the peer's memory (release, system scope), waits for the peer's flag in
its own memory (acquire), reads the peer's row over NVLink (a CUDA IPC mapping of the peer's buffer)
and then does what one GPU does after the whole projection: the float32 sum rounded once to the
activation dtype (one GPU's projection output), added to the residual row (rounded and stored back,
as `x += delta`) and RMS-normed with kernels/triton/layer_ops.py's arithmetic. Two addends: a + b ==
b + a exactly, so both ranks get the same sum and the replicated residual stream stays
bit-identical across ranks.

Flags and buffer halves work as backends/cuda/peer_all_reduce.py's: per row index a count of calls
kept on the device, the buffer half chosen by its parity, so a rank writes a row's half again only
two calls later, after the peer has finished the call in between. The plain reference is
backends/cuda/collectives.py's TorchCollectives.add_rms_norm (NCCL or gloo sum of the float32
partials, then the layer ops' add_rms_norm of its rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.layer_ops import _check_rows, _norm_out, _rne, _round, _row_warps


@triton.jit
def _all_reduce_add_rms_norm(P, X, W, Y, mine_ptr, peer_ptr, my_flags, peer_flags, counts, error,
                             n, half, eps, s_p, s_x, s_y, spin_limit, BLOCK: tl.constexpr, RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(counts + row) + 1
    at = (epoch % 2) * half + row * n + offs
    p = tl.load(P + row * s_p + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(mine_ptr + at, p, mask=mask)
    tl.debug_barrier()                  # every thread's part of the row stored before the flag goes up
    tl.atomic_xchg(peer_flags + row, epoch, sem="release", scope="sys")
    seen = tl.atomic_add(my_flags + row, 0, sem="acquire", scope="sys")
    spins = spin_limit * 0
    while (seen < epoch) & (spins < spin_limit):
        seen = tl.atomic_add(my_flags + row, 0, sem="acquire", scope="sys")
        spins += 1
    tl.debug_barrier()
    if seen < epoch:
        tl.store(error, 1)
    q = tl.load(peer_ptr + at, mask=mask, other=0.0, cache_modifier=".cv")
    delta = _round(p + q, X.dtype.element_ty, RNE).to(tl.float32)      # the projection's one rounding
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    x = _round(x + delta, X.dtype.element_ty, RNE)
    tl.store(X + row * s_x + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    h = _round(x * rstd, Y.dtype.element_ty, RNE).to(tl.float32)       # HF order, as layer_ops._rms_norm
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, _round(w * h, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(counts + row, epoch)


def all_reduce_add_rms_norm(partial: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                            mine: torch.Tensor, peer: torch.Tensor, my_flags: torch.Tensor,
                            peer_flags: torch.Tensor, counts: torch.Tensor, error: torch.Tensor,
                            spin_limit: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x += round(partial + the peer's partial) in place (x: [T, hidden], the residual stream), then
    returns rms_norm(x, weight). partial: [T, hidden], float32 (any float is read as float32).
    mine, peer: float32 [2 * half] exchange buffers (this rank's, the peer's mapping), T * hidden <=
    half; my_flags (raised by the peer), peer_flags (the peer's mapping), counts: int64 [>= T];
    error: int32 [1], set when a wait gives up after spin_limit polls. No host sync (graph-safe)."""
    _check_rows(x, "x")
    _check_rows(partial, "partial")
    rows, n = x.shape
    assert partial.shape == x.shape, "partial must match x"
    assert mine.dtype == peer.dtype == torch.float32 and mine.shape == peer.shape and mine.dim() == 1
    half = mine.numel() // 2
    assert rows * n <= half, f"{rows} rows of {n} exceed the exchange buffer ({half} values)"
    assert min(my_flags.numel(), peer_flags.numel(), counts.numel()) >= rows, "one flag and count per row"
    out = _norm_out(x, weight, out)
    block = triton.next_power_of_2(n)
    _all_reduce_add_rms_norm[(rows,)](
        partial, x, weight, out, mine, peer, my_flags, peer_flags, counts, error, n, half, eps,
        partial.stride(0), x.stride(0), out.stride(0), spin_limit, BLOCK=block, RNE=_rne(x.dtype),
        num_warps=_row_warps(block))
    return out
