"""The small ops between a layer's matmuls (RMSNorm, residual add + RMSNorm, SiLU * up), one
implementation per device family, chosen once at start-up with the attention backend's family.

`torch`: plain ops (RMSNorm as one fused layer_norm over [x, -x], see rms_norm_fast), the
reference; `cpu_fused`: the C++ ops of kernels/cpu/fused.cpp; `triton`: kernels/triton/layer_ops.py
(one launch each: under CUDA graphs every launch costs microseconds).
Each prepares its norm weights once (prepare_norm) into the form its rms_norm takes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_fast(x: torch.Tensor, doubled_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused LayerNorm over [x, -x]: that vector has mean 0 and variance mean(x^2).

    Same result as RMSNorm (bit-identical on the default model's bf16 rows), but two kernels
    (cat, layer_norm) instead of torch's eight small ops for rms_norm: 2x faster for one row and
    3x for a 512-token prefill chunk on CPU. doubled_weight is cat([w, w]); returns a view.
    """
    hidden = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * hidden,), doubled_weight, None, eps)[..., :hidden]


class TorchLayerOps:
    name = "torch"

    def __init__(self, eps: float):
        self.eps = eps

    def prepare_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, weight])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm_fast(x, weight, self.eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x += delta (x is the forward's own residual stream), then RMSNorm of x."""
        x += delta
        return rms_norm_fast(x, weight, self.eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        inter = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])

    def prepare_linears(self, qkv, o, gate_up, down) -> None:
        """Per-layer linear kernels chosen once at start-up (nothing to choose here)."""

    def prepare_head(self, head) -> None:
        """The lm head's kernel, chosen once at start-up (nothing to choose here)."""

    def mlp_down(self, gate_up: torch.Tensor, down) -> torch.Tensor:
        """down(silu(gate) * up) of the gate_up projection's output."""
        return down(self.silu_mul(gate_up))


class CpuFusedLayerOps(TorchLayerOps):
    name = "cpu_fused"

    def prepare_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()      # a plain tensor: not registered again as a module parameter

    def rms_norm(self, x, weight):
        return torch.ops.radixgate_cpu.rms_norm(x, weight, self.eps)

    def add_rms_norm(self, x, delta, weight):
        return torch.ops.radixgate_cpu.add_rms_norm(x, delta, weight, self.eps)

    def silu_mul(self, gate_up):
        return torch.ops.radixgate_cpu.silu_mul(gate_up)


class TritonLayerOps(TorchLayerOps):
    name = "triton"

    def __init__(self, eps: float):
        super().__init__(eps)
        from kernels.triton import layer_ops
        self.kernels = layer_ops

    def prepare_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()

    def rms_norm(self, x, weight):
        return self.kernels.rms_norm(x, weight, self.eps)

    def add_rms_norm(self, x, delta, weight):
        return self.kernels.add_rms_norm(x, delta, weight, self.eps)

    def silu_mul(self, gate_up):
        return self.kernels.silu_mul(gate_up)

    def prepare_linears(self, qkv, o, gate_up, down) -> None:
        """One-row inputs (batch-1 decode) go through kernels/triton/gemv.py on CUDA, SiLU * up fused
        into the down projection, and 2..16 rows through its skinny_gemm; bf16/fp16 weights only
        (the CPU-side int modes never run here)."""
        if qkv.weight.device.type != "cuda" or qkv.weight.dtype == torch.float32:
            return
        for linear in (qkv, o, gate_up):
            linear.use_gemv()
        down.use_gemv(silu_input=True)
        for linear in (qkv, o, gate_up, down):     # 2..16 rows: 1.05-1.18x cuBLAS at 16 (docs/cuda.md)
            linear.use_skinny()

    def mlp_down(self, gate_up, down):
        if down.gemv_silu is not None and gate_up.shape[0] == 1:
            return down.silu_down(gate_up)
        return down(self.kernels.silu_mul(gate_up))


class InvariantTritonLayerOps(TritonLayerOps):
    """`deterministic: true` on CUDA: the Triton small ops (one program per row: already
    batch-invariant) and every linear, head included, through kernels/triton/invariant_matmul.py
    (one configuration per weight shape, whatever the rows); SiLU * up stays its own kernel."""

    name = "triton_invariant"

    def prepare_linears(self, qkv, o, gate_up, down) -> None:
        for linear in (qkv, o, gate_up, down):
            linear.use_invariant()

    def prepare_head(self, head) -> None:
        head.use_invariant()


LAYER_OPS = {"torch": TorchLayerOps, "cpu_fused": CpuFusedLayerOps, "triton": TritonLayerOps,
             "triton_invariant": InvariantTritonLayerOps}
