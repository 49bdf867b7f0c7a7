"""A batch-invariant matmul for the deterministic CUDA mode: y = x @ W.T (+ b) for any number of rows,
each row computed exactly as it would be alone.

Why: cuBLAS (and the gemv / skinny kernels of gemv.py, chosen by row count) pick their tiling,
tensor-core instruction and split of K from the shape, so a row's rounding depends on how many rows
share the call: a request's numbers change with the batch it lands in and with the size of its
prefill chunk. Here the configuration is a function of the weight's shape only (skinny_config, the
tuning of gemv.skinny_gemm for 16 rows: the decode batch this mode is measured at): the grid
grows with M, but every program walks the whole of K in the same BLOCK_K steps with the same
BLOCK_M x BLOCK_N dot, so an output element is the same sequence of operations for every M.

The plain reference is F.linear; tests compare against it and compare rows alone with rows in a batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.decode import dot_upcast, mma
from kernels.triton.gemv import GemvConfig, skinny_config

BLOCK_M = 16        # rows per program, for every M (the tensor-core instruction follows it)


@triton.jit
def _invariant_matmul(X, W, B, Y, M, N, K, s_xm, s_wn, s_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    # Row blocks vary fastest, so the programs reading one weight block run side by side (L2 reuse).
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + offs_n.to(tl.int64)[:, None] * s_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = mma(x, tl.trans(w), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def invariant_config(n: int, k: int) -> GemvConfig:
    """The one configuration of an N x K weight, whatever the rows (from its shape alone)."""
    return skinny_config(n, k)


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     config: GemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous features) -> [M, N] = x @ weight.T (+ bias), row-invariant.
    config: invariant_config(N, K) unless given; it must not depend on M."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1 and x.dtype == weight.dtype
    assert bias is None or (bias.shape == (n,) and bias.stride(0) == 1)
    c = config or invariant_config(n, k)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _invariant_matmul[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, c.block_n))](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=bias is not None,
        UPCAST=dot_upcast(x.dtype), num_warps=c.num_warps, num_stages=c.num_stages)
    return out
