"""Linear layers for the serving path: one fused weight, the fastest kernel for its dtype on this host.

Measured on a 2-core Zen 4 (AVX-512 BF16/VNNI), torch 2.13 CPU, SmolLM2-135M shapes (docs/cpu.md):
  * float32: plain F.linear (MKL sgemm/sgemv) is as fast as anything oneDNN offers for fp32.
  * bfloat16: F.linear on plain bf16 weights is slow for small M; oneDNN with the weight reordered
    once into its blocked layout (torch.ops.mkldnn._linear_pointwise) is ~2x faster at M = 1..8.
  * int8 (weight-only, per-output-channel scales, bf16 activations): aten._weight_int8pack_mm reads
    half the bytes of bf16 and is the fastest kernel for one or two rows (decode of 1-2 streams).
    For more rows it loses to oneDNN bf16, so an int8 layer also keeps the bf16 weight, rebuilt
    from the int8 values (q * scale), and uses it for prefill and for wide decode batches.
  * int4 (weight-only, groups of 32 along K with a scale and a zero each, bf16 activations):
    aten._weight_int4pack_mm_for_cpu reads half the bytes of int8. Inside the model, where the
    weights stream from memory, 30 layers of the default model take 6.4-7.6 ms per token against
    12-13 ms for int8 (2 threads, docs/cpu.md). Groups are quantised min/max-wise, so a GGUF Q4_1
    tensor (d * q + m per block of 32, the block's min and max on the grid) comes back on its own
    grid: int4 serves the file's weights, not a second rounding of them. Wide batches use oneDNN
    bf16 on the int4 round trip, as int8 does. The crossover, measured in the model (decode of N
    streams, 2 threads, tok/s int4pack vs oneDNN): 4 streams 107 vs 80, 8 streams 162 vs 141,
    16 streams 186 vs 217; so int4pack up to 8 rows. int4pack is also bitwise row-invariant (a
    row's result does not depend on the others), so up to 8 concurrent decodes a stream gets
    exactly what it gets alone.
  * Where the CPU kernels build (AVX-512 BF16, or AVX2 and FMA), int4 and int8 (the default dtype
    and its head) run kernels/cpu/quant_linear.cpp instead, for every row count: dot products of x
    with the integer weights in a fixed order, scales and zeros applied per group, so a row's result
    is the same alone, batched or in any prefill chunk (the same request gives the same answer,
    docs/cpu.md). In the model (AVX-512, 1 thread, decode steps interleaved with the kernels above):
    1 stream 1.07x, 8 streams 1.15x, 16 streams 0.98x, a 645-token prefill 0.99x; the int8 head
    alone at 1 row 2.4 vs 3.8 ms (int8pack). On an AVX2-only host the torch kernels it replaces are
    int4pack up to 8 rows and widened float32 above (no oneDNN bf16 there): docs/cpu.md has both.
"""
from __future__ import annotations

import sys
from functools import cache, partial

import torch
import torch.nn.functional as F

from kernels.cpu import quant_linear

INT8_MAX_ROWS = 2          # int8pack_mm for up to this many rows, oneDNN bf16 above
INT4_MAX_ROWS = 8          # int4pack_mm for up to this many rows, oneDNN bf16 above (see below)
INT4_GROUP = 32            # GGUF's Q4_0 / Q4_1 block size


@cache
def onednn_bf16_available() -> bool:
    """Whether oneDNN's bf16 linear runs on this CPU: its reorder raises on CPUs without
    AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only host), where bf16 weights stay with F.linear."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _quant_kernel(shape: torch.Size) -> bool:
    """Whether a CPU int4 / int8 weight of this [N, K] runs kernels/cpu/quant_linear.cpp: when the
    CPU kernels build here with AVX-512 BF16 or AVX2 and FMA (RADIXGATE_CPU_KERNELS=0 keeps the
    torch kernels)."""
    return quant_linear.supported(*shape) and quant_linear.available()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale[:, None]. Returns (q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale


KERNELS = {"int8": ["_weight_int8pack_mm"],
           "int4": ["_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"]}


def kernel_available(mode: str) -> bool:
    """Whether this torch build has the weight-only kernels of `mode` (int8 | int4)."""
    return all(hasattr(torch.ops.aten, name) for name in KERNELS[mode])


def int4_supported(in_features: int) -> bool:
    return in_features % INT4_GROUP == 0 and kernel_available("int4")


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of INT4_GROUP along K, from each group's min and max.

    Returns (q int32 [N, K] in 0..15, scale fp32 [N, K/G], zero fp32 [N, K/G]) with
    w ~= (q - 8) * scale + zero, the convention of aten._weight_int4pack_mm_for_cpu.
    """
    n, k = w.shape
    groups = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15).to(torch.int32)
    return q.view(n, k), scale, low + 8 * scale


class FastLinear:
    """y = x @ W.T (+ b) with W prepared once for `mode`: float32 | bfloat16 | int8 | int4.

    `weight` is the plain [N, K] tensor in the activation dtype (float32 or bfloat16); int8 and
    int4 replace it with their round trip so every kernel of the layer computes the same product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str):
        self.mode = mode
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = None
        self.q = self.scale = None
        self.q4 = self.scale_zero = None
        self.quant = None                   # kernels/cpu/quant_linear.py's packed weight, else None
        if mode == "int4" and not int4_supported(weight.shape[1]):
            mode = self.mode = "int8"       # a K that is not a multiple of the group size
        if mode == "int4":
            q, scale, zero = quantize_int4(weight)
            # [K/G, N, 2] in the activation dtype: what the int4pack kernel reads.
            self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            if _quant_kernel(weight.shape):
                self.quant = quant_linear.pack_int4(q, self.scale_zero)
            else:
                self.q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = self.scale_zero.float().transpose(0, 1)           # [N, K/G, 2]
            groups = (q.view(q.shape[0], -1, INT4_GROUP).float() - 8) * sz[..., :1] + sz[..., 1:]
            weight = groups.view_as(q).to(torch.bfloat16)
            if bias is not None:
                self.bias = bias.to(torch.bfloat16)
        if mode == "int8":
            self.q, scale = quantize_int8(weight)
            self.scale = scale.to(torch.bfloat16)
            weight = (self.q.float() * self.scale.float()[:, None]).to(torch.bfloat16)
            if _quant_kernel(weight.shape):
                self.quant, self.q = quant_linear.pack_int8(self.q, self.scale), None
            if bias is not None:
                self.bias = bias.to(torch.bfloat16)
        self.weight = weight.contiguous()
        if self.bias is not None:           # F.linear takes one dtype (oneDNN's kernel took any bias)
            self.bias = self.bias.to(self.weight.dtype)
        self.gemv = self.gemv_silu = None   # one-row Triton kernel configs (use_gemv), else None
        self._dense = F.linear              # every other row count (use_float32_output: float32 products)
        self.skinny = None                  # a few-row Triton kernel's config (use_skinny), else None
        if mode in ("bfloat16", "int8", "int4") and self.quant is None and self.weight.device.type == "cpu":
            if onednn_bf16_available():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
            else:
                self._dense = _linear_bf16_without_onednn

    def use_gemv(self, silu_input: bool = False) -> None:
        """Serve one-row inputs with kernels/triton/gemv.py (CUDA, chosen once at start-up by the
        Triton layer ops): faster than cuBLAS at batch 1 on the attention projections (docs/cuda.md).
        silu_input: also prepare silu_down, which takes the gate_up row and applies SiLU * up itself."""
        from kernels.triton.gemv import default_config, gemv
        assert self.weight.device.type == "cuda" and self.q is None and self.q4 is None
        self._gemv = gemv
        self.gemv = default_config(*self.weight.shape, False)
        self.gemv_silu = default_config(*self.weight.shape, True) if silu_input else None

    def use_skinny(self) -> None:
        """Serve 2..16 rows (small decode batches) with kernels/triton/gemv.skinny_gemm (CUDA, chosen
        once at start-up): cuBLAS reads the weights at 79-90% of the copy rate there, the skinny
        kernel at 83-97% (docs/cuda.md)."""
        from kernels.triton.gemv import SKINNY_MAX_ROWS, skinny_config, skinny_gemm
        assert self.weight.device.type == "cuda" and self.q is None and self.q4 is None
        self._skinny, self.skinny_rows = skinny_gemm, SKINNY_MAX_ROWS
        self.skinny = skinny_config(*self.weight.shape)

    def use_invariant(self) -> None:
        """Serve every row count with kernels/triton/invariant_matmul.py, one configuration from the
        weight's shape (CUDA, `deterministic: true`): a row's result does not depend on the batch
        or the prefill chunk it is in. Rides the skinny slot with no row limit, so the call path is
        the same; no one-row gemv (its arithmetic differs)."""
        from kernels.triton.invariant_matmul import invariant_config, invariant_matmul
        assert self.q is None and self.q4 is None and self.quant is None   # (CPU only under TRITON_INTERPRET)
        self.gemv = self.gemv_silu = None
        self._skinny, self.skinny_rows = invariant_matmul, sys.maxsize
        self.skinny = invariant_config(*self.weight.shape)

    def use_float32_output(self) -> None:
        """Return float32 products (CUDA bf16 / fp16 weights, chosen once at start-up after the
        kernels): the row-parallel layers (o, down) under tensor parallelism, whose partial sums the
        ranks add before the one rounding (backends/cuda/collectives.py). Every CUDA kernel here
        accumulates in float32 already; only the store changes. The CPU kernels keep their output
        (the collectives widen it) and float32 weights give float32 anyway."""
        if self.weight.device.type != "cuda" or self.weight.dtype == torch.float32:
            return
        from kernels.triton.gemv import gemv, skinny_gemm
        if self.gemv is not None:               # (gemv_silu comes with it)
            self._gemv = partial(gemv, out_dtype=torch.float32)
        if self.skinny is not None and self._skinny is skinny_gemm:     # (the invariant kernel rounds)
            self._skinny = partial(skinny_gemm, out_dtype=torch.float32)
        self._dense = _linear_float32

    def silu_down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for one gate_up row [1, 2K], in one kernel (use_gemv(silu_input=True))."""
        return self._gemv(gate_up, self.weight, self.bias, silu=True, config=self.gemv_silu)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:          # CPU int4 / int8: one kernel for every row count
            y = quant_linear.quant_linear(x, self.quant)
            return y if self.bias is None else y + self.bias
        if self.gemv is not None and x.shape[0] == 1:
            return self._gemv(x, self.weight, self.bias, config=self.gemv)
        if self.skinny is not None and x.shape[0] <= self.skinny_rows:
            return self._skinny(x, self.weight, self.bias, config=self.skinny)
        if self.q4 is not None and x.shape[0] <= INT4_MAX_ROWS:
            # the kernel refuses strided rows (e.g. a slice of model.rms_norm_fast's output)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.q4, INT4_GROUP, self.scale_zero)
            return y if self.bias is None else y + self.bias
        if self.q is not None and x.shape[0] <= INT8_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return self._dense(x, self.weight, self.bias)


# Rows from which a bf16 linear on a CPU without oneDNN's bf16 kernels (an AVX2-only host) runs in
# float32, the weight widened on the fly: AMD EPYC (AVX2), 2 threads, [1536, 576]: 512 rows 11.2 ms
# against 60.8 for F.linear in bf16, 64 rows 2.5 against 7.8, 16 rows 1.8 against 1.9, 8 rows 1.5
# against 1.0, 1 row 0.6 against 0.1.
WIDEN_FROM_ROWS = 16


def _linear_bf16_without_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] < WIDEN_FROM_ROWS:
        return F.linear(x, weight, bias)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def _linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) stored in float32 from bf16 / fp16 operands (cuBLAS, CUDA only)."""
    y = torch.mm(x, weight.t(), out_dtype=torch.float32)
    return y if bias is None else y + bias
