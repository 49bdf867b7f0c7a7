"""Packing for quant_linear.cpp (the batch-invariant int4 / int8 matmul), and its launcher.

The packed form is made once per layer at start-up from FastLinear's quantised values (the
integers and bf16 scales / zeros); the kernel computes x . ((q - 8) * scale + zero) (int4) or
x . (q * scale) (int8) without rounding a weight, so F.linear(x, weight) with FastLinear's bf16
round-trip weight is its plain reference (tests/test_determinism.py compares them, and a row alone
against the same row in a batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cpu import build

BLOCK = 16      # output columns per block: one zmm of float32 accumulators
GROUP = 32      # int4 group size along K


@dataclass(frozen=True)
class PackedWeight:
    """A weight in quant_linear.cpp's layout: bytes [N/16, K/2, 16 (int4) or 32 (int8)], scales (and
    int4 zeros) bf16 [N/16, groups, 16]: as many bytes as int4pack reads."""

    bits: int
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def available() -> bool:
    """Whether the CPU kernels build (or are built) here with quant_linear, which needs AVX-512 BF16
    or AVX2 and FMA (RADIXGATE_CPU_KERNELS=0: no)."""
    return build.load().available and bool(torch.ops.radixgate_cpu.quant_linear_available())


def supported(out_features: int, in_features: int) -> bool:
    return out_features % BLOCK == 0 and in_features % GROUP == 0


def _lanes(values: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 2, 16]: lane 2i + e of half h holds column 8h + i at k = 2p + e."""
    n, k = values.shape
    grouped = values.reshape(n // BLOCK, 2, 8, k // 2, 2)                  # [blocks, half, i, p, e]
    return grouped.permute(0, 3, 1, 2, 4).reshape(n // BLOCK, k // 2, 2, BLOCK)


def _per_block(per_column: torch.Tensor) -> torch.Tensor:
    """bf16 [N, groups] -> [N/16, groups, 16]: a block's 16 columns together, group by group."""
    n, groups = per_column.shape
    return per_column.to(torch.bfloat16).reshape(n // BLOCK, BLOCK, groups).transpose(1, 2).contiguous()


def pack_int4(q: torch.Tensor, scale_zero: torch.Tensor) -> PackedWeight:
    """q: int32 [N, K] in 0..15; scale_zero: bf16 [K/32, N, 2] (FastLinear's) -> the packed weight."""
    n, k = q.shape
    pairs = q.to(torch.uint8).reshape(n // BLOCK, BLOCK, k // 2, 2).permute(0, 2, 1, 3)   # [blocks, p, L, e]
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()            # byte L: column L's pair
    sz = scale_zero.transpose(0, 1)                                        # [N, groups, 2]
    return PackedWeight(4, packed, _per_block(sz[..., 0]), _per_block(sz[..., 1]))


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> PackedWeight:
    """q: int8 [N, K]; scale: bf16 [N] (FastLinear's) -> the packed weight."""
    packed = _lanes(q).reshape(q.shape[0] // BLOCK, q.shape[1] // 2, 2 * BLOCK).view(torch.uint8).contiguous()
    return PackedWeight(8, packed, _per_block(scale.view(-1, 1)), torch.empty(0, dtype=torch.bfloat16))


def quant_linear(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """x: bf16 [M, K] (contiguous features) -> bf16 [M, N] = x @ W.T, each row as if alone."""
    return torch.ops.radixgate_cpu.quant_linear(x, weight.packed, weight.scales, weight.zeros, weight.bits)
