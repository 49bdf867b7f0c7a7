"""The fused CPU kernels (kernels/cpu/fused.cpp) vs the plain torch code they replace.

Random inputs at the default model's shapes and at odd ones (ragged lengths, partial pages, GQA
1/3/4, long contexts that split into several tasks, float32 and bfloat16). Pages and slots a
sequence does not own hold NaN, so a stray read shows up. The kernels are built in the test run
(kernels/cpu/build.py); a host without a compiler fails here rather than skipping silently.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from backends.cuda.model import RMSNorm, apply_rotary
from kernels import reference as ref
from kernels.cpu.build import load

status = load()
assert status.available, f"fused CPU kernels did not build: {status.detail}"
ops = torch.ops.radixgate_cpu
BF16, F32 = torch.bfloat16, torch.float32


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of bf16 rounding at b's magnitude (0 when identical)."""
    diff = (a.float() - b.float()).abs()
    unit = b.float().abs().clamp(min=1e-30) * 2.0 ** -8
    return float((diff / unit).max())


@pytest.mark.parametrize("rows,n", [(1, 576), (3, 576), (40, 64), (5, 1000)])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_rms_norm_matches_the_reference_norm(rows, n, dtype):
    torch.manual_seed(rows * n)
    x = (torch.randn(rows, n) * 3).to(dtype)
    norm = RMSNorm(n, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(n) + 0.5)
        expected = norm(x)
    got = ops.rms_norm(x, norm.weight.detach(), 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == BF16:       # same rounding steps as the reference: at most one bf16 ulp apart
        assert bf16_ulps(got, expected) <= 1.0
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_of_strided_rows():
    x = torch.randn(4, 2 * 576, dtype=BF16)[:, :576]        # rows with stride 1152
    w = torch.rand(576, dtype=BF16) + 0.5
    assert bf16_ulps(ops.rms_norm(x, w, 1e-5), ops.rms_norm(x.contiguous(), w, 1e-5)) == 0


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_add_rms_norm_updates_the_residual_and_normalises_it(dtype):
    torch.manual_seed(1)
    x = torch.randn(6, 576).to(dtype)
    delta = torch.randn(6, 576).to(dtype)
    w = (torch.rand(576) + 0.5).to(dtype)
    expected_x = x + delta
    expected = ops.rms_norm(expected_x, w, 1e-6)
    y = ops.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(x, expected_x)              # in place, rounded as torch's add rounds
    assert torch.equal(y, expected)


def rotary_tables(positions: int, d: int, dtype):
    inv = 1.0 / 100000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(positions).float()[:, None] * inv[None]
    angles = torch.cat((angles, angles), dim=1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    half = d // 2
    return cos, sin, torch.cat((-sin[:, :half], sin[:, half:]), dim=1)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_rotary_store_rotates_q_k_and_writes_k_v_slots(heads, kv_heads, dtype):
    torch.manual_seed(heads)
    d, tokens, slots_total = 64, 7, 64
    cos, sin, sin_signed = rotary_tables(300, d, dtype)
    positions = torch.tensor([0, 1, 5, 17, 100, 255, 299])
    slots = torch.tensor([3, 9, 10, 33, 40, 0, 63])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    exp_q = apply_rotary(q.float().view(tokens, heads, d), cos[positions].float(), sin[positions].float())
    exp_k = apply_rotary(k.float().view(tokens, kv_heads, d), cos[positions].float(), sin[positions].float())
    exp_v = v.clone().view(tokens, kv_heads, d)
    k_cache = torch.full((slots_total, kv_heads, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))

    ops.rotary_store(qkv, positions, cos, sin_signed, heads, kv_heads, k_cache, v_cache, slots)

    got_q = qkv[:, :heads * d].view(tokens, heads, d)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got_q.float(), exp_q, **tol)
    torch.testing.assert_close(k_cache[slots].float(), exp_k, **tol)
    assert torch.equal(v_cache[slots], exp_v)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:].view(tokens, kv_heads, d), exp_v)
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert torch.isnan(k_cache[untouched]).all() and torch.isnan(v_cache[untouched]).all()


def test_rotary_store_refuses_a_slot_outside_the_cache():
    cos, _, sin_signed = rotary_tables(16, 64, F32)
    qkv = torch.randn(1, 5 * 64)
    k_cache = torch.zeros(16, 1, 64)
    v_cache = torch.zeros(16, 1, 64)
    before = qkv.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rotary_store(qkv, torch.tensor([0]), cos, sin_signed, 3, 1, k_cache, v_cache, torch.tensor([16]))
    assert torch.equal(qkv, before) and not k_cache.any()      # nothing written


def make_cache(lens, page_size, heads, kv_heads, d, dtype, seed):
    """Caches [pages, page_size, kv, d] NaN wherever no sequence owns a written slot, shuffled page
    tables padded with a page of NaN, and one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    num_pages = sum(need) + 3
    k_cache = torch.full((num_pages, page_size, kv_heads, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(need)
    tables, start = [], 0
    for n, pages in zip(lens, need, strict=True):
        table = perm[start:start + pages]
        start += pages
        for p, page in enumerate(table):
            filled = min(page_size, n - p * page_size)
            k_cache[page, :filled] = torch.randn(filled, kv_heads, d, generator=gen).to(dtype)
            v_cache[page, :filled] = torch.randn(filled, kv_heads, d, generator=gen).to(dtype)
        tables.append(table + [perm[-1]] * (width - pages))     # padding: a page nobody wrote
    q = torch.randn(len(lens), heads, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(lens)


@pytest.mark.parametrize("lens,heads,kv_heads", [
    ([1], 9, 3), ([58], 9, 3), ([187], 9, 3), ([16, 33, 1, 250], 9, 3),
    ([700], 4, 4), ([1000, 5], 8, 2), ([2100], 4, 1),          # several splits of 256 keys
])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_paged_decode_attention_matches_the_reference(lens, heads, kv_heads, dtype):
    d, page_size = 64, 16
    q, k_cache, v_cache, tables, lengths = make_cache(lens, page_size, heads, kv_heads, d, dtype, sum(lens))
    scale = 1 / math.sqrt(d)
    got = ops.paged_decode_attention(q, k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d),
                                     tables, lengths, page_size, scale)
    assert got.shape == q.shape and got.dtype == dtype and torch.isfinite(got).all()
    for b, n in enumerate(lens):
        expected = ref.paged_attention(q[b:b + 1], k_cache, v_cache, tables[b], n - 1, scale)[0]
        tol = dict(rtol=2e-5, atol=2e-5) if dtype == F32 else dict(rtol=1.6e-2, atol=1.6e-2)
        torch.testing.assert_close(got[b].float(), expected.float(), **tol)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_paged_decode_attention_with_a_page_table_per_kv_head(dtype):
    """Sparse decode's form: each KV head reads its own pages (here: a random subset, in order)."""
    lens, heads, kv_heads, d, page_size = [300, 90], 9, 3, 64, 16
    q, k_cache, v_cache, tables, lengths = make_cache(lens, page_size, heads, kv_heads, d, dtype, 11)
    gen = torch.Generator().manual_seed(5)
    keep = 4
    per_head, per_head_len, expected = [], [], torch.empty(len(lens), heads, d)
    for b, n in enumerate(lens):
        pages = -(-n // page_size)
        rows, row_lens = [], []
        for h in range(kv_heads):     # some full pages in order, then the partial last one
            chosen = sorted(torch.randperm(pages - 1, generator=gen)[:keep - 1].tolist()) + [pages - 1]
            table = tables[b][chosen]
            rows.append(table)
            row_lens.append((keep - 1) * page_size + n - (pages - 1) * page_size)
            # the reference: the same keys as one sequence of row_lens tokens over `table`
            group = heads // kv_heads
            qh = q[b:b + 1, h * group:(h + 1) * group]
            out = ref.paged_attention(qh, k_cache[:, :, h:h + 1], v_cache[:, :, h:h + 1], table,
                                      row_lens[-1] - 1, 1 / 8)
            expected[b, h * group:(h + 1) * group] = out[0].float()
        per_head.append(torch.stack(rows))
        per_head_len.append(row_lens)
    got = ops.paged_decode_attention(q, k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d),
                                     torch.stack(per_head), torch.tensor(per_head_len), page_size, 1 / 8)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == F32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got.float(), expected, **tol)


def test_paged_decode_attention_reads_q_rows_with_a_stride():
    q, k_cache, v_cache, tables, lengths = make_cache([40, 9], 16, 9, 3, 64, F32, 7)
    wide = torch.cat((q.view(2, -1), torch.randn(2, 6 * 64)), dim=1)     # as a slice of a qkv row
    strided = wide[:, :9 * 64].view(2, 9, 64)
    args = (k_cache.view(-1, 3, 64), v_cache.view(-1, 3, 64), tables, lengths, 16, 0.125)
    assert torch.equal(ops.paged_decode_attention(strided, *args), ops.paged_decode_attention(q, *args))


def test_paged_decode_attention_refuses_a_length_past_its_pages():
    q, k_cache, v_cache, tables, _ = make_cache([20], 16, 9, 3, 64, F32, 3)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.paged_decode_attention(q, k_cache.view(-1, 3, 64), v_cache.view(-1, 3, 64), tables,
                                   torch.tensor([33]), 16, 0.125)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_silu_mul_matches_torch(dtype):
    torch.manual_seed(2)
    gate_up = (torch.randn(5, 2 * 1536) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, -88.0]).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=1)
    expected = F.silu(gate) * up
    got = ops.silu_mul(gate_up)
    assert got.shape == (5, 1536) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got.float(), expected, **tol)


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("blocks", [1, 4])
def test_quest_page_scores_match_the_reference(dtype, blocks):
    lens, heads, kv_heads, d, page_size = [300, 90, 17], 9, 3, 64, 16
    q, k_cache, _, tables, lengths = make_cache(lens, page_size, heads, kv_heads, d, dtype, 21)
    num_pages = k_cache.shape[0]
    gen = torch.Generator().manual_seed(2)
    kmin = torch.randn(num_pages, blocks, kv_heads, d, generator=gen).to(dtype)
    kmax = kmin + torch.rand(num_pages, blocks, kv_heads, d, generator=gen).to(dtype)
    for b, n in enumerate(lens):       # unwritten blocks of each last page: values that would win
        last, filled = tables[b][(n - 1) // page_size], n - (n - 1) // page_size * page_size
        written = -(-filled // (page_size // blocks))
        kmin[last, written:], kmax[last, written:] = -1e4, 1e4
    got = ops.quest_page_scores(q, kmin, kmax, tables, lengths, page_size, 0.125)
    assert got.dtype == F32 and got.shape == (len(lens), kv_heads, tables.shape[1])
    for b, n in enumerate(lens):
        pages = -(-n // page_size)
        expected = ref.quest_page_scores(q[b], kmin, kmax, tables[b], n, page_size, 0.125)
        torch.testing.assert_close(got[b, :, :pages], expected, rtol=1e-4, atol=1e-4)
        assert torch.isinf(got[b, :, pages:]).all()
