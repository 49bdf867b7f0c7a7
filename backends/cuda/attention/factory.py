"""The start-up choice of the attention backend, and its construction."""
from __future__ import annotations

import os

import torch

from backends.base import SparseSettings
from backends.cuda.attention.base import AttentionBackend, AttentionShape
from backends.cuda.attention.cpu_fused import CpuFusedAttention
from backends.cuda.attention.torch_attention import TorchAttention
from backends.cuda.kv_cache import PagedKVCache
from kernels.cpu import build as cpu_kernels
from kernels.cpu import quant_linear


def choose_attention(name: str, device: torch.device) -> str:
    """auto: triton on CUDA, cpu_fused on CPU when the C++ ops build here, else torch."""
    if name != "auto":
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention backend triton needs a CUDA device (on CPU it runs only under "
                             "TRITON_INTERPRET=1, as the tests run it)")
        return name
    if device.type == "cuda":
        return "triton"
    return "cpu_fused" if cpu_kernels.load().available else "torch"


def deterministic_attention(name: str, mode: str) -> str:
    """The batch-invariant variant of attention backend `name` for `deterministic: true` (its layer
    ops share the name): triton -> triton_invariant; cpu_fused is batch-invariant as it is when the
    weights run the quant_linear kernels (int4 / int8, the CPU default). Elsewhere none exists."""
    if name == "triton":
        return "triton_invariant"
    if name == "cpu_fused" and mode in ("int4", "int8") and quant_linear.available():
        return name
    raise ValueError(f"deterministic: true needs the triton attention backend (CUDA) or, on CPU, the fused "
                     f"kernels' quant_linear (AVX-512 BF16, or AVX2 and FMA) and dtype int4 / int8 (here: "
                     f"attention {name}, dtype {mode})")


def create_attention(name: str, cache: PagedKVCache, shape: AttentionShape, cos: torch.Tensor,
                     sin_signed: torch.Tensor, sparse: SparseSettings | None) -> AttentionBackend:
    if name == "torch":
        cls = TorchAttention
    elif name == "cpu_fused":
        cls = CpuFusedAttention
        status = cpu_kernels.load()
        if not status.available:
            raise ValueError(f"attention backend cpu_fused: the C++ ops are not available ({status.detail})")
    elif name == "triton":       # imports triton: only when chosen
        from backends.cuda.attention.triton_attention import TritonAttention as cls
    elif name == "triton_invariant":
        from backends.cuda.attention.invariant_triton import InvariantTritonAttention as cls
    else:
        raise ValueError(f"unknown attention backend {name!r} (auto, torch, cpu_fused, triton, triton_invariant)")
    return cls(cache, shape, cos, sin_signed, sparse)
