"""Triton layer ops (kernels/triton/layer_ops.py) vs plain torch, on CPU under the Triton interpreter.

Random inputs (torch.randn, never zeros), small shapes, float32 and bfloat16 (float16 once). The
references are written from the formulas in float32 and rounded where the op rounds; outputs and
unused KV slots start as NaN, so a missing or stray write shows up. Every test runs under the
interpreter through the triton_interpreter fixture (tests/conftest.py): the kernel modules are
reloaded with TRITON_INTERPRET=1 for that test only, never for the whole session.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

import torch.nn.functional as F  # noqa: E402

from kernels.triton.gemv import GemvConfig, default_config, gemv, skinny_gemm  # noqa: E402
from kernels.triton.layer_ops import add_rms_norm, rms_norm, rotary_store, silu_mul  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-5


def assert_near(got, expected, dtype):
    """fp32: ~1e-5 relative; bf16/fp16: 1-2 ulps of the values' magnitude."""
    assert torch.isfinite(got).all(), "unwritten output"
    if dtype == F32:
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-5)
    else:
        ulp = 2 ** -7 if dtype == BF16 else 2 ** -10
        torch.testing.assert_close(got.float(), expected.float(), rtol=2 * ulp, atol=2 * ulp)


def ref_norm(x, w):
    """The HF RMSNorm's rounding: normalise in float32, round, multiply by the weight, round."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return (w.float() * h.float()).to(x.dtype)


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype,tokens,hidden", [(F32, 1, 64), (BF16, 3, 576), (F32, 17, 200),
                                                 (BF16, 17, 96), (F16, 3, 128)])
def test_rms_norm_strided_rows(dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(hidden + tokens)
    wide = randn(tokens, hidden + 40, dtype=dtype, gen=gen, scale=3.0)
    x = wide[:, 7:7 + hidden]                      # rows of a wider tensor: stride != hidden
    w = randn(hidden, dtype=dtype, gen=gen) + 1
    before = wide.clone()
    y = rms_norm(x, w, EPS)
    assert y.shape == (tokens, hidden) and y.dtype == dtype
    assert_near(y, ref_norm(x, w), dtype)
    assert torch.equal(wide, before), "rms_norm must not write its input"
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    assert rms_norm(x, w, EPS, out=out) is out and torch.equal(out, y)


@pytest.mark.parametrize("dtype,tokens,hidden", [(F32, 1, 576), (BF16, 3, 64), (BF16, 17, 320),
                                                 (F32, 17, 100)])
def test_add_rms_norm_updates_x_in_place(dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(10 + hidden)
    wide = randn(tokens, hidden + 16, dtype=dtype, gen=gen, scale=2.0)
    x = wide[:, :hidden]                           # the residual stream, a strided view here
    delta = randn(tokens, 2 * hidden, dtype=dtype, gen=gen)[:, hidden:]
    w = randn(hidden, dtype=dtype, gen=gen) + 1
    expected_x = x.clone()
    expected_x += delta                            # torch's in-place add: rounded to x's dtype
    tail = wide[:, hidden:].clone()
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    y = add_rms_norm(x, delta, w, EPS, out=out)
    assert y is out
    assert torch.equal(x, expected_x), "x += delta must round as torch does"
    assert torch.equal(wide[:, hidden:], tail), "columns past the view must stay untouched"
    assert_near(y, ref_norm(expected_x, w), dtype)


@pytest.mark.parametrize("dtype,tokens,inter", [(F32, 1, 64), (BF16, 3, 576), (F32, 17, 160),
                                                (BF16, 17, 3000)])
def test_silu_mul(dtype, tokens, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=3.0)
    g, u = gate_up[:, :inter].float(), gate_up[:, inter:].float()
    expected = (g * torch.sigmoid(g) * u).to(dtype)
    y = silu_mul(gate_up)
    assert y.shape == (tokens, inter) and y.dtype == dtype
    assert_near(y, expected, dtype)
    out = torch.full((tokens, inter), float("nan"), dtype=dtype)
    assert silu_mul(gate_up, out=out) is out and torch.equal(out, y)


def rotary_tables(d, dtype, size=64, theta=10000.0):
    """backends/cuda/model.py: rotary() then _grow_rotary()'s signed sin; also the plain cos, sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    freqs = torch.arange(size).float().unsqueeze(1) * inv_freq.unsqueeze(0)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    half = d // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=1), sin


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@pytest.mark.parametrize("dtype,tokens,d", [(F32, 1, 64), (BF16, 3, 64), (BF16, 17, 128), (F32, 17, 128)])
def test_rotary_store(dtype, tokens, d):
    heads, kv_heads, num_slots = 9, 3, 40
    gen = torch.Generator().manual_seed(tokens * d)
    cos, sin_signed, sin = rotary_tables(d, dtype)
    width = (heads + 2 * kv_heads) * d
    qkv = randn(tokens, width + 8, dtype=dtype, gen=gen)[:, :width]     # strided rows, as a view
    positions = torch.randint(0, cos.shape[0], (tokens,), generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    k_slots = torch.full((num_slots, kv_heads, d), float("nan"), dtype=dtype)
    v_slots = torch.full((num_slots, kv_heads, d), float("nan"), dtype=dtype)

    x = qkv.float().view(tokens, heads + 2 * kv_heads, d)
    c, s = cos[positions].float().unsqueeze(1), sin[positions].float().unsqueeze(1)
    qk = x[:, :heads + kv_heads]
    expected_qk = (qk * c + rotate_half(qk) * s).to(dtype)
    v = qkv[:, (heads + kv_heads) * d:].reshape(tokens, kv_heads, d).clone()

    rotary_store(qkv, positions, cos, sin_signed, heads, kv_heads, k_slots, v_slots, slots)
    got_qk = qkv[:, :(heads + kv_heads) * d].reshape(tokens, heads + kv_heads, d)
    assert_near(got_qk, expected_qk, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:].reshape(tokens, kv_heads, d), v), "v must not move"
    assert torch.equal(k_slots[slots], got_qk[:, heads:]), "cache k must be the rotated k of qkv"
    assert torch.equal(v_slots[slots], v)
    others = torch.ones(num_slots, dtype=torch.bool)
    others[slots] = False
    assert k_slots[others].isnan().all() and v_slots[others].isnan().all(), "only the given slots are written"


def test_rotary_store_skips_out_of_range_slots():
    """A row whose slot is outside the cache (padding, slot -1) is rotated but writes no KV."""
    heads, kv_heads, d, num_slots = 9, 3, 64, 8
    gen = torch.Generator().manual_seed(5)
    cos, sin_signed, _ = rotary_tables(d, BF16)
    qkv = randn(3, (heads + 2 * kv_heads) * d, dtype=BF16, gen=gen)
    reference = qkv.clone()
    k_slots = torch.full((num_slots, kv_heads, d), float("nan"), dtype=BF16)
    v_slots = torch.full((num_slots, kv_heads, d), float("nan"), dtype=BF16)
    positions, slots = torch.tensor([3, 4, 5]), torch.tensor([2, -1, num_slots])
    rotary_store(qkv, positions, cos, sin_signed, heads, kv_heads, k_slots, v_slots, slots)
    other_k, other_v = k_slots.clone(), v_slots.clone()
    rotary_store(reference, positions, cos, sin_signed, heads, kv_heads, other_k, other_v, torch.tensor([2, 0, 1]))
    assert torch.equal(qkv, reference), "rotation does not depend on the slot"
    assert torch.equal(k_slots[2], other_k[2]) and torch.equal(v_slots[2], other_v[2])
    assert k_slots[torch.arange(num_slots) != 2].isnan().all()
    assert v_slots[torch.arange(num_slots) != 2].isnan().all()


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n, k, config", [(40, 96, GemvConfig(8, 32, 1, 1)), (33, 200, GemvConfig(4, 64, 2, 2)),
                                          (6, 1000, default_config(6, 1000, False))])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, n, k, config, bias):
    """One row times a weight (ragged N and K against the blocks): F.linear's product, rounded once."""
    gen = torch.Generator().manual_seed(n + k)
    w, x = randn(n, k, dtype=dtype, gen=gen, scale=0.1), randn(1, k, dtype=dtype, gen=gen)
    b = randn(n, dtype=dtype, gen=gen) if bias else None
    out = torch.full((1, n), float("nan"), dtype=dtype)
    gemv(x, w, b, config=config, out=out)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert_near(out, expected, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("config", [GemvConfig(4, 64, 2, 2), default_config(16, 160, True)])
def test_gemv_fuses_silu_mul(dtype, config):
    """silu=True reads [gate | up] and equals silu_mul (its rounding included) followed by the GEMV."""
    gen = torch.Generator().manual_seed(5)
    n, k = 16, 160
    w, gate_up = randn(n, k, dtype=dtype, gen=gen, scale=0.1), randn(1, 2 * k, dtype=dtype, gen=gen)
    got = gemv(gate_up, w, silu=True, config=config)
    expected = F.linear(silu_mul(gate_up).float(), w.float()).to(dtype)
    assert_near(got, expected, dtype)
    with pytest.raises(AssertionError, match="features"):
        gemv(gate_up[:, :k], w, silu=True)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("m, n, k, config", [(16, 40, 96, GemvConfig(16, 32, 4, 2)), (3, 33, 200, None),
                                             (1, 64, 64, GemvConfig(32, 64, 4, 1))])
def test_skinny_gemm_matches_linear(dtype, m, n, k, config):
    """A few rows times a weight through tensor-core dots (ragged N and K, rows below 16 masked)."""
    gen = torch.Generator().manual_seed(m + n)
    w, x = randn(n, k, dtype=dtype, gen=gen, scale=0.1), randn(m, k, dtype=dtype, gen=gen)
    b = randn(n, dtype=dtype, gen=gen)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    skinny_gemm(x, w, b, config=config, out=out)
    assert_near(out, F.linear(x.float(), w.float(), b.float()).to(dtype), dtype)
