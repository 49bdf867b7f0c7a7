"""The small ops between a Llama layer's matmuls, one Triton kernel each (CUDA engine, decode step).

Under CUDA graphs every kernel launch costs ~2-3 us, and torch runs each of these ops as several
kernels. Semantics and rounding are those of kernels/cpu/fused.cpp (and so of the torch code in
backends/cuda/model.py): arithmetic in float32, each result rounded to its storage dtype once,
except RMSNorm, which rounds the normalised row before the weight multiply as the HF reference does.

Launchers only check shapes with asserts and allocate their outputs when `out` is None: no host
sync, so they can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.decode import interpreting

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def needs_rne(dtype: torch.dtype) -> bool:
    """Whether round_to must round float32 -> bfloat16 by hand: triton 3.9's CPU interpreter truncates
    that cast, where the GPU rounds to nearest even (as torch does)."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def round_to(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 x to dtype, rounded to nearest even; RNE: by hand (see needs_rne)."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def row_warps(block: int) -> int:
    """Warps for a program that owns one row of `block` values: ~16 values per thread."""
    return max(1, min(16, block // 512))


def check_rows(t: torch.Tensor, name: str) -> None:
    assert t.dim() == 2 and t.stride(1) == 1, f"{name} must be [rows, features] with contiguous rows"
    assert t.dtype in FLOATS, f"{name}: float32, float16 or bfloat16 only"


def norm_out(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    assert weight.shape == (x.shape[1],) and weight.stride(0) == 1, "weight must be [hidden] matching x"
    assert weight.dtype == x.dtype, "weight and x must share a dtype"
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride(1) == 1, "out must be like x"
    return out


@triton.jit
def _rms_norm(X, D, W, Y, n, eps, s_x, s_d, s_y, ADD: tl.constexpr, BLOCK: tl.constexpr,
              RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0)
    if ADD:  # residual add: rounded to x's dtype and stored back, as torch's `x += delta` does
        x = x.to(tl.float32) + tl.load(D + row * s_d + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x, X.dtype.element_ty, RNE)
        tl.store(X + row * s_x + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    # HF order: normalise in float32, round to the activation dtype, then multiply by the weight.
    h = round_to(x * rstd, Y.dtype.element_ty, RNE).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, round_to(w * h, Y.dtype.element_ty, RNE), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * round(x * rsqrt(mean(x^2) + eps)) per row. x: [T, hidden] (rows may be strided)."""
    check_rows(x, "x")
    out = norm_out(x, weight, out)
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm[(x.shape[0],)](x, x, weight, out, x.shape[1], eps, x.stride(0), 0, out.stride(0),
                             ADD=False, BLOCK=block, RNE=needs_rne(x.dtype), num_warps=row_warps(block))
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x += delta in place (the residual stream), then returns rms_norm(x, weight, eps)."""
    check_rows(x, "x")
    check_rows(delta, "delta")
    assert delta.shape == x.shape and delta.dtype == x.dtype, "delta must match x"
    out = norm_out(x, weight, out)
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm[(x.shape[0],)](x, delta, weight, out, x.shape[1], eps, x.stride(0), delta.stride(0),
                             out.stride(0), ADD=True, BLOCK=block, RNE=needs_rne(x.dtype),
                             num_warps=row_warps(block))
    return out


@triton.jit
def _silu_mul(GU, Y, inter, s_g, s_y, BLOCK: tl.constexpr, RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(GU + row * s_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_g + inter + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, round_to(g / (1.0 + tl.exp(-g)) * u, Y.dtype.element_ty, RNE), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2 inter] = [gate | up] -> silu(gate) * up, [T, inter] in gate_up's dtype."""
    check_rows(gate_up, "gate_up")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.shape[1] == 2 * inter, "gate_up must hold gate and up halves"
    if out is None:
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (rows, inter) and out.dtype == gate_up.dtype and out.stride(1) == 1
    # A row splits into blocks of up to 2048 values: wide MLPs (inter ~14k) still fill the GPU at batch 1.
    block = min(2048, triton.next_power_of_2(inter))
    _silu_mul[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                 BLOCK=block, RNE=needs_rne(gate_up.dtype), num_warps=row_warps(block))
    return out


@triton.jit
def _rotary_store(QKV, Pos, Cos, Sin, Slots, K, V, num_slots, s_t, s_c, s_s, s_k, s_v,
                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, RNE_Q: tl.constexpr, RNE_KV: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)      # heads of the row: [q | k | v]
    offs = tl.arange(0, BLOCK_HALF)
    mask_d = offs < HALF
    rotated = h < HEADS + KV_HEADS
    is_k = rotated & (h >= HEADS)
    is_v = (h >= HEADS + KV_HEADS) & (h < HEADS + 2 * KV_HEADS)
    pos = tl.load(Pos + t)
    c_lo = tl.load(Cos + pos * s_c + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    c_hi = tl.load(Cos + pos * s_c + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s_lo = tl.load(Sin + pos * s_s + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s_hi = tl.load(Sin + pos * s_s + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]

    ptr = QKV + t * s_t + h[:, None] * HEAD_DIM + offs[None, :]
    mask = (rotated | is_v)[:, None] & mask_d[None, :]
    lo = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half: [lo, hi] -> [lo cos - hi sin, hi cos + lo sin]; the table's sin carries the signs.
    rot = rotated[:, None]
    new_lo = tl.where(rot, lo * c_lo + hi * s_lo, lo)
    new_hi = tl.where(rot, hi * c_hi + lo * s_hi, hi)
    mask_rot = rot & mask_d[None, :]
    tl.store(ptr, round_to(new_lo, QKV.dtype.element_ty, RNE_Q), mask=mask_rot)
    tl.store(ptr + HALF, round_to(new_hi, QKV.dtype.element_ty, RNE_Q), mask=mask_rot)

    # Rows whose slot is outside the cache (e.g. padding rows of a graph batch, slot -1) write nothing:
    # a launcher cannot check the slots without a host sync. (tl.where: the interpreter types a
    # tensor & scalar-bool mask as int32 and rejects it.)
    slot = tl.load(Slots + t)
    ok = (slot >= 0) & (slot < num_slots)
    mask_k = tl.where(ok, is_k[:, None] & mask_d[None, :], False)
    k_ptr = K + slot * s_k + (h - HEADS)[:, None] * HEAD_DIM + offs[None, :]
    tl.store(k_ptr, round_to(new_lo, K.dtype.element_ty, RNE_KV), mask=mask_k)
    tl.store(k_ptr + HALF, round_to(new_hi, K.dtype.element_ty, RNE_KV), mask=mask_k)
    mask_v = tl.where(ok, is_v[:, None] & mask_d[None, :], False)
    v_ptr = V + slot * s_v + (h - HEADS - KV_HEADS)[:, None] * HEAD_DIM + offs[None, :]
    tl.store(v_ptr, round_to(lo, V.dtype.element_ty, RNE_KV), mask=mask_v)
    tl.store(v_ptr + HALF, round_to(hi, V.dtype.element_ty, RNE_KV), mask=mask_v)


def rotary_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                 heads: int, kv_heads: int, k_slots: torch.Tensor, v_slots: torch.Tensor,
                 slots: torch.Tensor, block_h: int = 4) -> None:
    """Rotary of q and k in place in qkv, then k and v into their KV cache slots (fused.cpp's op).

    qkv: [T, (heads + 2 kv_heads) d], rows [q heads | k heads | v heads]; positions, slots: int64 [T];
    cos, sin_signed: [max_positions, d] with sin_signed = [-sin, sin] over the halves of d
    (model.py's _grow_rotary), so x -> x cos + swap_halves(x) sin_signed. k_slots, v_slots:
    [num_slots, kv_heads, d]. Positions must lie in the tables; rows with a slot outside
    [0, num_slots) are rotated but write no KV.
    """
    check_rows(qkv, "qkv")
    tokens, d = qkv.shape[0], cos.shape[1]
    assert qkv.shape[1] == (heads + 2 * kv_heads) * d and d % 2 == 0, "qkv width does not match the heads"
    assert cos.shape == sin_signed.shape and cos.stride(1) == 1 and sin_signed.stride(1) == 1, \
        "cos and sin tables must be [positions, head_dim] with contiguous rows"
    assert positions.shape == (tokens,) and slots.shape == (tokens,), "positions and slots must be [T]"
    assert positions.dtype == slots.dtype == torch.int64 and positions.stride(0) == slots.stride(0) == 1, \
        "positions and slots must be contiguous int64"
    assert k_slots.shape == v_slots.shape and k_slots.shape[1:] == (kv_heads, d), \
        "caches must be [num_slots, kv_heads, head_dim]"
    assert k_slots.stride()[1:] == (d, 1) and v_slots.stride()[1:] == (d, 1), "cache slots must be contiguous"
    assert k_slots.dtype == v_slots.dtype and k_slots.dtype in FLOATS, "k and v caches must share a float dtype"
    total = heads + 2 * kv_heads
    block_h = min(block_h, triton.next_power_of_2(total))
    _rotary_store[(tokens, triton.cdiv(total, block_h))](
        qkv, positions, cos, sin_signed, slots, k_slots, v_slots, k_slots.shape[0],
        qkv.stride(0), cos.stride(0), sin_signed.stride(0), k_slots.stride(0), v_slots.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(d // 2), RNE_Q=needs_rne(qkv.dtype), RNE_KV=needs_rne(k_slots.dtype),
        num_warps=1 if block_h * d <= 512 else 4)
