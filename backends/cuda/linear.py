"""Linear layers for the serving path: one fused weight, the fastest kernel for its dtype on this host.

Measured on a 2-core Zen 4 (AVX-512 BF16/VNNI), torch 2.13 CPU, SmolLM2-135M shapes (docs/cpu.md):
  * float32: plain F.linear (MKL sgemm/sgemv) is as fast as anything oneDNN offers for fp32.
  * bfloat16: F.linear on plain bf16 weights is slow for small M; oneDNN with the weight reordered
    once into its blocked layout (torch.ops.mkldnn._linear_pointwise) is ~2x faster at M = 1..8.
  * int8 (weight-only, per-output-channel scales, bf16 activations): aten._weight_int8pack_mm reads
    half the bytes of bf16 and is the fastest kernel for one or two rows (decode of 1-2 streams).
    For more rows it loses to oneDNN bf16, so an int8 layer also keeps the bf16 weight, rebuilt
    from the int8 values (q * scale), and uses it for prefill and for wide decode batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX_ROWS = 2          # int8pack_mm for up to this many rows, oneDNN bf16 above


def _mkldnn_ok() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale[:, None]. Returns (q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale


class FastLinear:
    """y = x @ W.T (+ b) with W prepared once for `mode`: float32 | bfloat16 | int8.

    `weight` is the plain [N, K] tensor in the activation dtype (float32 or bfloat16); int8 mode
    replaces it with its int8 round trip so every kernel of the layer computes the same product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str):
        self.mode = mode
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = None
        self.q = self.scale = None
        if mode == "int8":
            self.q, scale = quantize_int8(weight)
            self.scale = scale.to(torch.bfloat16)
            weight = (self.q.float() * self.scale.float()[:, None]).to(torch.bfloat16)
            if bias is not None:
                self.bias = bias.to(torch.bfloat16)
        self.weight = weight.contiguous()
        if mode in ("bfloat16", "int8") and _mkldnn_ok() and self.weight.device.type == "cpu":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.q is not None and x.shape[0] <= INT8_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
