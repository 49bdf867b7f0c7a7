"""FastLinear in every mode against F.linear, on contiguous and strided rows, narrow and wide batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.cuda.linear import FastLinear, quantize_int4

# Relative error of the product vs float32 (random Gaussian weights, the worst case for 4 bits).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 3e-2, "int4": 1.2e-1}


@pytest.mark.parametrize("mode", list(TOLERANCE))
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("strided", [False, True])
def test_fast_linear_matches_reference(mode, rows, strided):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1
    layer = FastLinear(weight if mode != "bfloat16" else weight.bfloat16(), bias, mode)
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    wide = torch.randn(rows, 128).to(dtype)
    x = wide[:, :64] if strided else wide[:, :64].contiguous()     # rows of a wider buffer
    got = layer(x).float()
    want = F.linear(x.float(), weight, bias)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= TOLERANCE[mode]


def test_int4_round_trip_is_exact_on_a_q4_1_grid():
    """A tensor already on a per-32 min/max grid (what a GGUF Q4_1 block is) comes back exactly."""
    torch.manual_seed(0)
    steps, low = torch.rand(8, 4, 1) * 0.01 + 1e-3, torch.randn(8, 4, 1)
    q = torch.randint(0, 16, (8, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15                      # every block holds its min and its max
    weight = (low + steps * q).view(8, 128)
    codes, scale, zero = quantize_int4(weight)
    back = ((codes.view(8, 4, 32).float() - 8) * scale[..., None] + zero[..., None]).view(8, 128)
    assert torch.allclose(back, weight, rtol=0, atol=1e-6)
