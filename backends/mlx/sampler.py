"""Batched next-token sampling in MLX: the rules of gateway/engine/sampling.py (the NumPy
reference), in the order backends/cuda/sampler.py computes them.

logit_bias, penalties and grammar bitmasks in float32, then greedy rows take the first argmax and
logprobs are the log_softmax of these processed logits, all in MLX where the logits are. Rows that
draw need float64 probabilities and cumulative sums, which MLX does not compute exactly (see
_draw): those rows alone are read back and drawn by backends/cuda/sampler.py's CPU code, which
implements the reference's rules in float64.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from backends.base import SampleSpec
from backends.cuda.sampler import TorchSampler
from backends.sampling_params import SampledToken, SamplingParams


def _penalized(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty)


def _column(values, dtype: mx.Dtype) -> mx.array:
    return mx.array(np.asarray(values).reshape(-1, 1)).astype(dtype)


@dataclass
class DrawnTokens:
    """A step's draws: `tokens` int32 [B] (left where the next step reads them); `outputs` what
    the host reads, which `finish` turns into SampledTokens."""

    tokens: mx.array
    outputs: list[mx.array]
    finish: Callable[[list[np.ndarray]], list[SampledToken]]


class MlxSampler:
    """Draws the next token of many sequences at once from float32 logits [B, vocab]."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._exact = TorchSampler(vocab_size, torch.device("cpu"))    # the float64 draw (see _draw)

    def _check(self, logits: mx.array, specs: Sequence[SampleSpec]) -> None:
        if logits.ndim != 2 or logits.shape[0] != len(specs) or logits.shape[1] != self.vocab_size:
            raise ValueError(f"expected logits of shape ({len(specs)}, {self.vocab_size}), got {logits.shape}")
        bad = sorted({t for s in specs for t in s.params.logit_bias if t >= self.vocab_size})
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")

    def process(self, logits: mx.array, specs: Sequence[SampleSpec]) -> mx.array:
        """Logits after logit_bias, presence/frequency penalties (float32, as the reference) and grammar bitmasks."""
        V = self.vocab_size
        flat = [i * V + t for i, s in enumerate(specs) for t in s.params.logit_bias]
        x = logits
        if flat:                                  # keys are unique per row: one add per (row, id)
            vals = [b for s in specs for b in s.params.logit_bias.values()]
            x = x.reshape(-1).at[mx.array(flat)].add(mx.array(vals, dtype=mx.float32)).reshape(x.shape)
        if any(_penalized(s.params) for s in specs):
            gens = [np.asarray(s.generated if _penalized(s.params) else (), dtype=np.int64).reshape(-1)
                    for s in specs]
            ids = np.concatenate([r * V + g for r, g in enumerate(gens)])
            if ids.size:
                tokens = np.concatenate(gens)
                if tokens.min() < 0 or tokens.max() >= V:
                    raise ValueError(f"generated token ids outside the vocabulary (size {V})")
                counts = mx.zeros(x.size, dtype=mx.float32).at[mx.array(ids)].add(1.0).reshape(x.shape)
                freq = _column([s.params.frequency_penalty for s in specs], mx.float32)
                pres = _column([s.params.presence_penalty for s in specs], mx.float32)
                x = x - (counts * freq + (counts > 0) * pres)
        masked = [i for i, s in enumerate(specs) if getattr(s, "allowed", None) is not None]
        if masked:                                # a grammar's bitmask: disallowed tokens -> -inf
            words = mx.array(np.stack([specs[i].allowed for i in masked]).astype(np.int32))
            bits = (words[..., None] >> mx.arange(32, dtype=mx.int32)) & 1           # [M, W, 32]
            allowed = mx.ones(x.shape, dtype=mx.bool_)
            allowed[mx.array(masked)] = bits.reshape(len(masked), -1)[:, :V].astype(mx.bool_)
            x = mx.where(allowed, x, -mx.inf)
        return x

    def _draw(self, x: mx.array, params: list[SamplingParams], uniforms: list[float]) -> mx.array:
        """Token ids [S] drawn from processed logits x [S, V] of non-greedy rows.

        The draw needs float64 exp and cumulative sums, which MLX does not compute in float64
        (measured on mlx 0.32: exp 7e-7, cumsum 4e-5 relative error: a token off by one in ~1 of
        30 draws over 49k tokens). So these rows are read back and drawn by the torch sampler's
        exact CPU implementation of the same rules; on Apple silicon the read is from shared memory.
        """
        rows = torch.from_numpy(np.array(x, dtype=np.float32))
        drawn = self._exact._draw(rows, params, uniforms)
        return mx.array(drawn.numpy().astype(np.int32))

    def draw(self, logits: mx.array, specs: list[SampleSpec]) -> DrawnTokens:
        """The draws of every row (logits row i for specs[i]); nothing is read back here."""
        self._check(logits, specs)
        logits = logits.astype(mx.float32)
        params = [s.params for s in specs]
        plain = all(not p.logprobs and not p.logit_bias and not _penalized(p) for p in params) \
            and all(getattr(s, "allowed", None) is None for s in specs)
        if plain and all(p.greedy for p in params):               # the common greedy step
            tokens = logits.argmax(axis=1).astype(mx.int32)
            return DrawnTokens(tokens, [tokens], _plain_tokens)
        x = self.process(logits, specs)
        tokens = x.argmax(axis=1).astype(mx.int32)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            drawn = self._draw(x[mx.array(rows)], [params[i] for i in rows], [specs[i].uniform for i in rows])
            tokens[mx.array(rows)] = drawn
        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        if not lp_rows:
            return DrawnTokens(tokens, [tokens], _plain_tokens)
        # logprobs: log_softmax of the processed logits, before temperature and filters
        xl = x[mx.array(lp_rows)]
        lp = xl - mx.logsumexp(xl, axis=1, keepdims=True)
        chosen = mx.take_along_axis(lp, tokens[mx.array(lp_rows)][:, None], axis=1)[:, 0]
        n_top = min(max(params[i].top_logprobs for i in lp_rows), self.vocab_size)
        top_ids = mx.argsort(-lp, axis=1)[:, :n_top].astype(mx.int32)
        top_vals = mx.take_along_axis(lp, top_ids, axis=1)

        def finish(host: list[np.ndarray]) -> list[SampledToken]:
            ids, values, best_ids, best_values = host
            out = [SampledToken(int(t), None) for t in ids]
            for j, i in enumerate(lp_rows):
                k = min(params[i].top_logprobs, self.vocab_size)
                top = [(int(best_ids[j, c]), float(best_values[j, c])) for c in range(k)]
                out[i] = SampledToken(out[i].token_id, float(values[j]), top)
            return out

        return DrawnTokens(tokens, [tokens, chosen, top_ids, top_vals], finish)

    def sample(self, logits: mx.array, specs: list[SampleSpec]) -> list[SampledToken]:
        """draw() and read the results back: one sync."""
        if not specs:
            return []
        drawn = self.draw(logits, specs)
        mx.eval(drawn.outputs)
        return drawn.finish([np.array(a) for a in drawn.outputs])


def _plain_tokens(host: list[np.ndarray]) -> list[SampledToken]:
    return [SampledToken(int(t), None) for t in host[0]]
