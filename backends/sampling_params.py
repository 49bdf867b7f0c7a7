"""Per-request sampling parameters: part of the backend contract (the engine hands them to the
backend, which samples on its device), validated when a request is parsed."""
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


_MASK64 = (1 << 64) - 1


def draw_uniform(seed: int, index: int) -> float:
    """The random number in [0, 1) for the index-th token of a request with this seed.

    A counter-based hash (splitmix64 of seed and index), not a stateful generator: the draw for a
    token depends only on (seed, index), never on batching, caching or preemption.
    """
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [vocab_size] from a grammar's int32 bitmask: token t is allowed when bit t % 32 of
    word t // 32 is set (the layout xgrammar and llguidance both fill)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8), bitorder="little")
    assert bits.size >= vocab_size, f"a bitmask of {bits.size} bits for a vocabulary of {vocab_size}"
    return bits[:vocab_size].astype(bool)
