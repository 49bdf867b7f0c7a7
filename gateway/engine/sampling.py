"""Next-token choice from one row of logits, in plain NumPy.

Order per token: logit_bias is added, presence/frequency penalties are subtracted (both with
OpenAI semantics), then logprobs are taken as log_softmax of these processed logits, i.e.
*before* temperature and top-k/top-p/min-p filtering, so they describe the model's adjusted
distribution and do not depend on how the token was drawn (a filtered-out token keeps a finite
logprob). Then temperature, top_k, top_p, min_p, and a draw from the request's own Generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20


def _in(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be a number in {left}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0         # 0..20, needs logprobs

    def __post_init__(self):
        _in("temperature", self.temperature, 0.0, 2.0)
        _in("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        _in("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        _in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must be a dict of token id -> bias")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {tok!r}")
            _in(f"logit_bias[{tok}]", bias, -100.0, 100.0)
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")
        top = self.top_logprobs
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
        if top and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None                                   # None unless params.logprobs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)   # best first


class Sampler:
    """Per-request sampling state: the random Generator and the penalty bookkeeping."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)   # seed None -> fresh OS entropy
        bad = [t for t in params.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self._bias = np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias))
        self._penalize = bool(params.presence_penalty or params.frequency_penalty)
        # penalty[t] = count[t]*frequency + (count[t] > 0)*presence, kept up to date per token.
        self._penalty = np.zeros(vocab_size, dtype=np.float32) if self._penalize else None
        self.counts: dict[int, int] = {}

    def observe(self, token_id: int) -> None:
        """Count a generated token for the penalties. sample() already does this for its own
        result: call it only for tokens that did not come from sample()."""
        n = self.counts.get(token_id, 0)
        self.counts[token_id] = n + 1
        if self._penalize:
            p = self.params
            self._penalty[token_id] += p.frequency_penalty + (p.presence_penalty if n == 0 else 0.0)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Logits after bias and penalties (a copy when anything changes them)."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {logits.shape}")
        if self._bias_ids.size or self._penalize:
            logits = logits.copy()                     # the caller's buffer stays untouched
            if self._bias_ids.size:
                logits[self._bias_ids] += self._bias
            if self._penalize:
                logits -= self._penalty
        return logits

    def sample(self, logits: np.ndarray) -> SampledToken:
        """Choose the next token from one row of logits and count it."""
        p = self.params
        x = self.process(logits)
        token = int(np.argmax(x)) if p.greedy else self._draw(x)
        logprob, top = None, []
        if p.logprobs:
            lse = _logsumexp(x)
            logprob = float(x[token] - lse)
            if p.top_logprobs:
                ids = _top_ids(x, p.top_logprobs)
                top = [(int(i), float(x[i] - lse)) for i in ids]
        self.observe(token)
        return SampledToken(token, logprob, top)

    def _draw(self, x: np.ndarray) -> int:
        p = self.params
        v = x.size
        ids = None                               # None: positions are token ids
        if 0 < p.top_k < v:
            ids = np.argpartition(x, v - p.top_k)[v - p.top_k:]    # O(V), no sort
            x = x[ids]
        z = x / np.float32(p.temperature)
        zmax = float(z.max())
        if not math.isfinite(zmax):      # degenerate row (all -inf or nan): fall back to argmax
            return int(ids[np.argmax(x)]) if ids is not None else int(np.argmax(x))
        z -= zmax
        probs = np.exp(z, out=z)         # unnormalised; the best token has exactly 1.0
        keep = _nucleus(probs, p.top_p) if p.top_p < 1.0 else None
        if p.min_p > 0.0:                # relative to the best token, so normalising is moot
            floor = probs >= p.min_p
            keep = floor if keep is None else keep & floor
        if keep is not None:
            sel = np.flatnonzero(keep)
            probs = probs[sel]
            ids = sel if ids is None else ids[sel]
        i = _cum_index(probs, self.rng.random(), "right")
        return int(ids[i]) if ids is not None else i


_BLOCK = 512


def _cum_index(vals: np.ndarray, frac: float, side: str) -> int:
    """First index where cumsum(vals) passes frac * sum(vals), without a full cumsum (slow in
    NumPy): cumulate block sums, then cumsum only the block that holds the target."""
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


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Mask of the smallest highest-probability set holding top_p of the mass.

    Sorts values only (SIMD sort, ~5x faster than argsort) and keeps everything at or above
    the cut-off value, so tokens tied with the last one kept are kept too."""
    desc = np.sort(probs)[::-1]
    cut = _cum_index(desc, top_p, "left")
    return probs >= desc[cut]


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))


def _top_ids(x: np.ndarray, n: int) -> np.ndarray:
    """The n largest entries, best first, without sorting the whole vocabulary."""
    n = min(n, x.size)
    part = np.argpartition(x, x.size - n)[x.size - n:]
    return part[np.argsort(-x[part], kind="stable")]
