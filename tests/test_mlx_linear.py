"""backends/mlx/cpu_linear.py: the CPU's float32 column-split linears against MLX's own
nn.Linear / nn.QuantizedLinear on the same weights (the reference), and the swap over a model."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from backends.cuda.loader import ModelConfig  # noqa: E402
from backends.mlx.cpu_linear import MIN_BLOCK_COLUMNS, ColumnSplitLinear, cpu_streams, use_cpu_linears  # noqa: E402
from backends.mlx.model import LlamaModel  # noqa: E402

ATOL = 1e-4      # float32 sums in another order; the products are |x| ~ 1 times weights ~ 0.1 over K = 96


def reference_layer(out_features: int, bias: bool, bits: int | None) -> nn.Module:
    mx.random.seed(out_features + 7 * (bits or 0))
    layer = nn.Linear(96, out_features, bias=bias)
    if bits:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=bits)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("bits", [None, 4, 8], ids=["float", "int4", "int8"])
@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("out_features", [200, 100])
def test_column_split_linear_matches_mlx(bits, streams, out_features):
    """Uneven blocks (200 over 3 streams: 67, 67, 66) and too few columns to split (100 over 2
    or 3: one block of MIN_BLOCK_COLUMNS or more); bias only on float layers (GGUF linears have none)."""
    bias = bits is None
    layer = reference_layer(out_features, bias, bits)
    weight = (mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=bits) if bits
              else layer.weight)
    fast = ColumnSplitLinear(weight, layer.bias if bias else None, cpu_streams(streams))
    widths = [b.shape[1] for b in fast.blocks]
    assert sum(widths) == out_features and min(widths) >= min(out_features, MIN_BLOCK_COLUMNS)
    assert len(widths) == max(1, min(streams, out_features // MIN_BLOCK_COLUMNS))
    assert all(b.dtype == mx.float32 and b.shape[0] == 96 for b in fast.blocks)
    for rows in (1, 7):
        x = mx.random.normal((rows, 96), key=mx.random.key(rows))
        got, want = np.array(fast(x)), np.array(layer(x))
        assert got.shape == (rows, out_features)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def tiny_config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                       context_length=256, tie_word_embeddings=tied, attention_bias=True)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_use_cpu_linears_swaps_every_linear(tied):
    """Every linear (quantised or not) becomes a ColumnSplitLinear computing the same product; a
    tied head gets its own float copy of the (quantised) embedding, the lookup stays as it was."""
    mx.random.seed(3)
    model = LlamaModel(tiny_config(tied))
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, m: path.endswith(("mlp.up_proj",
                                                                                            "embed_tokens")))
    mx.eval(model.parameters())
    before = {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    head = model.embed_tokens.as_linear if tied else model.lm_head
    embedding = model.embed_tokens
    use_cpu_linears(model, cpu_streams(2))
    after = dict(model.named_modules())
    assert not [p for p, m in after.items() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert model.embed_tokens is embedding and isinstance(model.lm_head, ColumnSplitLinear)
    x = mx.random.normal((5, 64), key=mx.random.key(0))
    for path, old in before.items():
        assert isinstance(after[path], ColumnSplitLinear), path
        inputs = x if after[path].blocks[0].shape[0] == 64 else mx.concatenate([x, x], -1)     # down_proj: 128
        np.testing.assert_allclose(np.array(after[path](inputs)), np.array(old(inputs)), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(model.lm_head(x)), np.array(head(x)), atol=ATOL, rtol=0)
