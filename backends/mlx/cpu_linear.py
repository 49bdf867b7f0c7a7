"""The linears of the model when MLX runs on the CPU: float32 weights (the exact dequantisation of
the packed groups), stored transposed [in, out] and split by output columns over CPU streams.

Why (mlx 0.32.4 / mlx-cpu on Linux, whose float32 matmul is the reference BLAS, 2 cores; a
576 -> 1536 projection): the 4-bit quantized matmul runs about 2.2 GFLOP/s whatever the batch, so
8 rows cost 8 times one; float32 `x @ w_t` with w_t contiguous [in, out] runs 4.8 GFLOP/s at one
row and about 6 at 64 (`x @ w.T` over [out, in] is about half that). One MLX CPU stream is one
thread, so each column block runs on its own stream and the blocks run at once: 614 -> 293 us at
one row, 3477 -> 2141 us at 8 rows. The whole model's linears (30 layers + the 49152-row head):
128 ms a decode step at one row with 4-bit weights, 60 in float32 on one stream, 43 on two;
at 8 rows 959, 405 and 227 ms. The cost is memory: float32 weights take 8 times the packed bytes
(SmolLM2-135M: ~540 MB instead of ~80 MB).

On a Metal GPU the quantized matmuls stay (runner.build_model chooses once, at load).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

MIN_BLOCK_COLUMNS = 64     # a floor (not tuned): a linear narrower than two of these stays whole


class ColumnSplitLinear(nn.Module):
    """y = x @ W.T (+ b) with W.T stored [in, out] float32 contiguous, in column blocks that run
    on their own CPU streams; the reference is nn.Linear / nn.QuantizedLinear on the same W."""

    def __init__(self, weight: mx.array, bias: mx.array | None, streams: list[mx.Stream]):
        super().__init__()
        out_features = weight.shape[0]
        parts = max(1, min(len(streams), out_features // MIN_BLOCK_COLUMNS))
        width = -(-out_features // parts)
        edges = [(i * width, min(out_features, (i + 1) * width)) for i in range(parts)]
        w_t = weight.astype(mx.float32).T
        self.blocks = [mx.contiguous(w_t[:, a:b]) for a, b in edges]
        if bias is not None:
            self.bias_blocks = [bias.astype(mx.float32)[a:b] for a, b in edges]
        self._streams = tuple(streams[:parts])
        assert sum(b.shape[1] for b in self.blocks) == out_features

    def __call__(self, x: mx.array) -> mx.array:
        if "bias_blocks" in self:
            outs = [mx.addmm(b, x, w, stream=s)
                    for w, b, s in zip(self.blocks, self.bias_blocks, self._streams, strict=True)]
        else:
            outs = [mx.matmul(x, w, stream=s) for w, s in zip(self.blocks, self._streams, strict=True)]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def float_weight(layer: nn.Module) -> mx.array:
    """The [out, in] float weight of a linear or an embedding, dequantised if it is packed."""
    if "scales" in layer:
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight


def cpu_streams(count: int) -> list[mx.Stream]:
    """count new CPU streams (each its own thread). Not the default stream: a block on it and one
    on a new stream did not overlap (measured: no faster than one stream)."""
    assert count >= 1
    return [mx.new_stream(mx.cpu) for _ in range(count)]


def use_cpu_linears(model: nn.Module, streams: list[mx.Stream]) -> None:
    """Replace every linear of the model (nn.Linear or nn.QuantizedLinear) by a ColumnSplitLinear
    on the same numbers; a tied head gets its own transposed float32 copy of the embedding as
    `lm_head` (the embedding stays as it is for the lookup)."""
    swaps = [(path, ColumnSplitLinear(float_weight(layer), layer.get("bias"), streams))
             for path, layer in model.named_modules() if isinstance(layer, (nn.Linear, nn.QuantizedLinear))]
    assert swaps, "a model without linears"
    model.update_modules(tree_unflatten(swaps))
    if "lm_head" not in model:
        model.lm_head = ColumnSplitLinear(float_weight(model.embed_tokens), None, streams)
    mx.eval(model.parameters())
