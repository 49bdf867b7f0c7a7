"""Next-token choice from one row of logits, in plain NumPy: the reference sampler.

The serving path samples on the backend's device (backends/cuda/sampler.py, batched torch); this
module defines what it must produce, token for token, given the same logits and random number.

Order per token: logit_bias is added, presence/frequency penalties are subtracted (OpenAI
semantics: penalty = count*frequency + (count > 0)*presence, in float32), a grammar's bitmask sets
every token it does not allow to -inf (constrained decoding), then logprobs are taken
as log_softmax of these processed logits x, i.e. *before* temperature and filtering, so they
describe the model's adjusted distribution and do not depend on how the token was drawn (a
filtered-out token keeps a finite logprob). Greedy requests (temperature 0 or top_k 1) take the
first argmax of x. Otherwise, with m = max(x) and T = float32(temperature):

* top_k keeps every token with x >= the k-th largest value of x (ties with the k-th are kept);
* z = (x - m) / T in float32 (IEEE subtraction and division: bit-identical on any device), and a
  token's unnormalised probability is exp(z) in float64, so the best token has exactly 1.0;
* top_p (on the tokens top_k kept) sorts them by x descending, finds the first position where the
  float64 cumulative probability reaches top_p * total, and keeps every token with x >= the value
  there (ties with the cut-off are kept);
* min_p keeps tokens with z >= float32(log(min_p)), i.e. probability >= min_p * the best token's;
* the draw: over the kept tokens in ascending token-id order, the first whose float64 cumulative
  probability exceeds uniform * total (clamped to the last kept token).

uniform comes from sampling_params.draw_uniform(seed, index): a counter-based hash of the request's
seed and the token's index, not a stateful generator, so a seed gives the same tokens whether the
draw happens here or on a device, cold, cached or batched. A row whose max is not finite (all -inf
after logit_bias, or nan) falls back to argmax.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

from backends.sampling_params import MAX_TOP_LOGPROBS, SampledToken, SamplingParams, draw_uniform, unpack_bitmask

__all__ = ["MAX_TOP_LOGPROBS", "SampledToken", "Sampler", "SamplingParams", "draw_uniform"]

_TINY = np.finfo(np.float32).tiny    # temperatures below this would make (x - m) / T overflow to nan


def temperature32(temperature: float) -> np.float32:
    """The float32 divisor a sampling temperature > 0 becomes (clamped to the smallest normal)."""
    return max(np.float32(temperature), _TINY)


class Sampler:
    """Per-request sampling state: the seed, the token counter and the penalty bookkeeping."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        # seed None: one drawn from OS entropy now; the draws are still counter-based from it.
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.num_generated = 0            # tokens sampled or observed so far: the next draw's index
        bad = [t for t in params.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self._bias = np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias))
        self._penalize = bool(params.presence_penalty or params.frequency_penalty)
        self._frequency = np.float32(params.frequency_penalty)
        self._presence = np.float32(params.presence_penalty)
        # penalty[t] = count[t]*frequency + (count[t] > 0)*presence in float32, kept up to date per token.
        self._penalty = np.zeros(vocab_size, dtype=np.float32) if self._penalize else None
        self.counts: dict[int, int] = {}

    def observe(self, token_id: int) -> None:
        """Count a generated token for the penalties and the draw index. sample() already does this
        for its own result: call it only for tokens that did not come from sample()."""
        n = self.counts.get(token_id, 0) + 1
        self.counts[token_id] = n
        self.num_generated += 1
        if self._penalize:
            self._penalty[token_id] = np.float32(n) * self._frequency + self._presence

    def process(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """Logits after bias, penalties and the grammar's bitmask (a copy when anything changes them)."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {logits.shape}")
        if self._bias_ids.size or self._penalize or allowed is not None:
            logits = logits.copy()                     # the caller's buffer stays untouched
            if self._bias_ids.size:
                logits[self._bias_ids] += self._bias
            if self._penalize:
                logits -= self._penalty
            if allowed is not None:
                logits[~unpack_bitmask(allowed, self.vocab_size)] = -np.inf
        return logits

    def sample(self, logits: np.ndarray, uniform: float | None = None,
               allowed: np.ndarray | None = None) -> SampledToken:
        """Choose the next token from one row of logits and count it.

        uniform: the draw's random number in [0, 1); None: draw_uniform(self.seed, self.num_generated).
        allowed: a grammar's int32 bitmask of the tokens allowed next (None: every token).
        """
        p = self.params
        x = self.process(logits, allowed)
        if p.greedy:
            token = int(np.argmax(x))
        else:
            if uniform is None:
                uniform = draw_uniform(self.seed, self.num_generated)
            token = self._draw(x, uniform)
        logprob, top = None, []
        if p.logprobs:
            lse = _logsumexp(x)
            logprob = float(x[token] - lse)
            if p.top_logprobs:
                ids = _top_ids(x, p.top_logprobs)
                top = [(int(i), float(x[i] - lse)) for i in ids]
        self.observe(token)
        return SampledToken(token, logprob, top)

    def _draw(self, x: np.ndarray, uniform: float) -> int:
        p = self.params
        v = x.size
        m = x.max()
        if not math.isfinite(m):         # degenerate row (all -inf, +inf or nan): fall back to argmax
            return int(np.argmax(x))
        ids = None                       # None: positions are token ids
        if 0 < p.top_k < v:
            kth = np.partition(x, v - p.top_k)[v - p.top_k]     # O(V), no sort
            ids = np.flatnonzero(x >= kth)                     # ascending ids, ties with the k-th kept
            x = x[ids]
        t = temperature32(p.temperature)
        with np.errstate(over="ignore"):
            z = (x - m) / t              # float32; a tiny T sends all but the best to -inf
        keep = None
        if p.top_p < 1.0:
            keep = x >= _nucleus_cut(x, m, t, p.top_p)
        if p.min_p > 0.0:                # relative to the best token, so normalising is moot
            floor = z >= np.float32(math.log(p.min_p))
            keep = floor if keep is None else keep & floor
        if keep is not None:
            sel = np.flatnonzero(keep)
            z = z[sel]
            ids = sel if ids is None else ids[sel]
        probs = np.exp(z.astype(np.float64))
        i = _cum_index(probs, uniform, "right")
        return int(ids[i]) if ids is not None else i


_BLOCK = 512


def _cum_index(vals: np.ndarray, frac: float, side: str) -> int:
    """First index where cumsum(vals) passes frac * sum(vals) (float64), clamped to the last index,
    without a full cumsum (slow in NumPy): cumulate block sums, then cumsum only the block that
    holds the target."""
    n = vals.size
    if n <= 4 * _BLOCK:
        cdf = np.cumsum(vals, dtype=np.float64)
        return min(int(np.searchsorted(cdf, frac * cdf[-1], side)), n - 1)
    starts = np.arange(0, n, _BLOCK)
    blocks = np.cumsum(np.add.reduceat(vals, starts), dtype=np.float64)
    target = frac * blocks[-1]
    b = min(int(np.searchsorted(blocks, target, side)), blocks.size - 1)
    before = float(blocks[b - 1]) if b else 0.0
    cdf = before + np.cumsum(vals[starts[b]:starts[b] + _BLOCK], dtype=np.float64)
    return int(starts[b]) + min(int(np.searchsorted(cdf, target, side)), cdf.size - 1)


def _nucleus_cut(x: np.ndarray, m: np.float32, t: np.float32, top_p: float) -> np.float32:
    """The logit value at which the highest-probability tokens first hold top_p of the mass.

    Sorts values only (SIMD sort, ~5x faster than argsort); the caller keeps everything at or
    above it, so tokens tied with the last one kept are kept too."""
    desc = np.sort(x)[::-1]
    with np.errstate(over="ignore"):
        probs = np.exp(((desc - m) / t).astype(np.float64))
    return desc[_cum_index(probs, top_p, "left")]


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))


def _top_ids(x: np.ndarray, n: int) -> np.ndarray:
    """The n largest entries, best first (ties: lower id first), without sorting the whole vocabulary."""
    n = min(n, x.size)
    part = np.sort(np.argpartition(x, x.size - n)[x.size - n:])
    return part[np.argsort(-x[part], kind="stable")]
