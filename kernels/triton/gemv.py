"""One-row matrix-vector products for batch-1 decode: y = x @ W.T (+ b), optionally with SiLU * up
fused in front (the MLP's down projection reading gate_up directly); and the same walk for a few
rows (2..16, small decode batches) with tensor-core dots (skinny_gemm).

Why: at batch 1 a decode step is weight reads. cuBLAS reaches the copy rate on the big MLP matrices
but only ~75% of it on the 4096-wide attention projections, and splits K for some shapes (a second
reduce kernel per GEMV). Here one program owns BLOCK_N output rows and walks all of K: no split, no
reduce kernel, and the SiLU * up of the down projection is computed from gate_up as its blocks are
read, which removes the silu_mul launch. Which shapes use it is decided once per linear layer at
start-up from a table measured on the card (backends/cuda/linear.py).

The plain reference is F.linear (and layer_ops.silu_mul before it); the tests compare against both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.decode import dot_upcast, mma
from kernels.triton.layer_ops import needs_rne, round_to


@triton.jit
def _gemv(X, W, B, Y, N, K, s_wn,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
          RNE_X: tl.constexpr, RNE_Y: tl.constexpr, EVICT: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = W + offs_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if SILU:  # X is the gate_up row [gate (K) | up (K)]: the down projection's input, rounded as
            # layer_ops.silu_mul rounds it, so the product is the unfused one's
            g = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            u = tl.load(X + K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = round_to(g / (1.0 + tl.exp(-g)) * u, X.dtype.element_ty, RNE_X).to(tl.float32)
        else:
            x = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        if EVICT:  # weights are streamed once per step: keep them from displacing reusable lines
            w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, round_to(y, Y.dtype.element_ty, RNE_Y), mask=mask_n)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    evict_first: bool = True


# Shapes measured on an H200 whose best tuning differs from the rule below (python3 -m bench.gemv
# --tp 2 --skinny-rows 0, docs/benchmarks.md): one rank's shard of Llama-3-8B at tensor_parallel_size 2.
# Its qkv wants what the whole model's qkv has (2 rows per program: twice the programs in flight),
# which also keeps its arithmetic TP=1's. Faster tunings measured for the row-parallel o (6.4 -> 4.3 us)
# and down (18.3 -> 17.6 us) are left out: they reorder the partial sums' float32 additions, and on the
# bench's random model that flipped an exact top-2 tie of TP=1's logits (greedy tokens 32 -> 4 equal).
MEASURED_CONFIGS = {
    (3072, 4096, False): GemvConfig(2, 1024, 4, 2),     # qkv: 9.7 -> 5.2 us
}


def default_config(n: int, k: int, silu: bool) -> GemvConfig:
    """The tuning for an N x K weight, from bench/gemv.py on an H200: MEASURED_CONFIGS where the
    shape is there, else the rule measured on Llama-3-8B's shapes (docs/cuda.md): the fused down
    projection (long K) wants 16 rows and 8 warps per program; the others 2-4 rows (wide N: 2, so
    that a program's rows stay in flight) with 4 warps; 1024-wide K blocks throughout."""
    if (n, k, silu) in MEASURED_CONFIGS:
        return MEASURED_CONFIGS[(n, k, silu)]
    block_k = min(1024, triton.next_power_of_2(k))
    if silu:
        return GemvConfig(16, block_k, 8, 2)
    return GemvConfig(2 if n >= 6144 else 4, block_k, 4, 2)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False,
         config: GemvConfig = GemvConfig(), out: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] (silu: [1, 2K] = [gate | up]) -> [1, N] = x' @ weight.T (+ bias), weight [N, K] with
    contiguous rows; x' = silu(gate) * up rounded to x's dtype when silu, else x.
    out_dtype: the product's dtype, x's when None; float32 keeps the float32 accumulation unrounded
    (the row-parallel layers under tensor parallelism, whose partial sums are added before rounding)."""
    n, k = weight.shape
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1, "gemv takes one contiguous row"
    assert x.shape[1] == (2 * k if silu else k), f"x has {x.shape[1]} features for a weight of K = {k}"
    assert weight.stride(1) == 1 and x.dtype == weight.dtype
    assert bias is None or (bias.shape == (n,) and bias.stride(0) == 1)
    if out is None:
        out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    c = config
    _gemv[(triton.cdiv(n, c.block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, SILU=silu, HAS_BIAS=bias is not None, RNE_X=needs_rne(x.dtype),
        RNE_Y=needs_rne(out.dtype), EVICT=c.evict_first, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


@triton.jit
def _skinny_gemm(X, W, B, Y, M, N, K, s_xm, s_wn, s_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EVICT: tl.constexpr, UPCAST: tl.constexpr):
    """One program per BLOCK_N output columns for all M (<= BLOCK_M) rows, walking the whole of K."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * s_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_ptr = W + offs_n.to(tl.int64)[:, None] * s_wn + offs_k[None, :]
        if EVICT:
            w = tl.load(w_ptr, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = mma(x, tl.trans(w), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * s_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


SKINNY_MAX_ROWS = 16


def skinny_config(n: int, k: int) -> GemvConfig:
    """The tuning of skinny_gemm for an N x K weight: the best of bench/gemv.py's skinny table at 16
    rows on an H200 for each Llama-3-8B shape (down: long K; gate_up: wide N; qkv: N > K; o)."""
    if k >= 8192:
        return GemvConfig(32, 512, 4, 4)
    if n >= 16384:
        return GemvConfig(32, 128, 4, 3)
    if n > k:
        return GemvConfig(64, min(256, triton.next_power_of_2(k)), 4, 4)
    return GemvConfig(32, min(512, triton.next_power_of_2(k)), 4, 3)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: GemvConfig | None = None, out: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (M <= SKINNY_MAX_ROWS, bf16/fp16) -> [M, N] = x @ weight.T (+ bias): every weight
    block is read once for all rows, K walked whole (no split, no reduce kernel). out_dtype: as gemv's."""
    m, k = x.shape
    n = weight.shape[0]
    assert 1 <= m <= SKINNY_MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
    c = config or skinny_config(n, k)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    _skinny_gemm[(triton.cdiv(n, c.block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), BLOCK_M=16, BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=bias is not None,
        EVICT=c.evict_first, UPCAST=dot_upcast(x.dtype), num_warps=c.num_warps, num_stages=c.num_stages)
    return out
