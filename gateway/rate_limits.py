"""Per-key limits, in this process: requests per minute, tokens per minute, streams in flight.

Requests and tokens are token buckets that hold up to a minute's allowance and refill continuously
(a key may burst its whole minute, then goes at the steady rate). A request takes one request token
when it is admitted; its tokens (prompt + completion, as its usage reports them) are charged when it
ends, so a key may start requests while its token balance is positive and the balance may go below
zero by one request's worth: the refill then pays that back before the key's next request. A stream
slot is taken at admission and given back however the request ends (finished, failed, cancelled, the
client gone). Over a limit: RateLimited with the seconds until the request would be admitted.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.config import KeyLimits

MINUTE_S = 60.0


class RateLimited(Exception):
    """A request over one of its key's limits; `retry_after_s` until it would be admitted."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, at least 1 (HTTP's Retry-After takes no fractions)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class TokenBucket:
    """`per_minute` units refilled evenly over a minute, holding at most `per_minute`; the level may go
    negative when more is charged than is there (tokens counted after the fact)."""

    def __init__(self, per_minute: int, now_s: float):
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / MINUTE_S
        self.level = self.capacity
        self.updated_s = now_s

    def refill(self, now_s: float) -> None:
        self.level = min(self.capacity, self.level + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s

    def wait_s(self, needed: float) -> float:
        """Seconds until the level reaches `needed` (0 when it has)."""
        return max(0.0, (needed - self.level) / self.rate_per_s)


class KeyBudget:
    """One key's three limits. `admit` takes a request token and a stream slot or raises RateLimited;
    each admitted request is ended exactly once by `finish`, which charges its tokens."""

    def __init__(self, name: str, limits: KeyLimits, clock: Callable[[], float] = time.monotonic):
        self.name, self.limits, self.clock = name, limits, clock
        now = clock()
        self.requests = TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.streams = 0

    def admit(self) -> None:
        now = self.clock()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        # every limit is checked before anything is taken: a refused request costs nothing
        cap = self.limits.concurrent_streams
        if cap is not None and self.streams >= cap:
            raise RateLimited(f"The key `{self.name}` has {self.streams} requests in flight, its limit "
                              f"(concurrent_streams {cap}); retry when one ends.", 1.0)
        if self.requests is not None and self.requests.level < 1:
            raise RateLimited(f"The key `{self.name}` reached its limit of {self.limits.requests_per_minute} "
                              "requests per minute.", self.requests.wait_s(1))
        if self.tokens is not None and self.tokens.level <= 0:
            raise RateLimited(f"The key `{self.name}` reached its limit of {self.limits.tokens_per_minute} tokens "
                              "per minute.", self.tokens.wait_s(1))
        if self.requests is not None:
            self.requests.level -= 1
        self.streams += 1

    def finish(self, tokens_used: int) -> None:
        """An admitted request ended (however): its stream slot back, its tokens charged."""
        assert self.streams > 0, f"{self.name}: finish without admit"
        assert tokens_used >= 0, tokens_used
        self.streams -= 1
        if self.tokens is not None:
            self.tokens.refill(self.clock())
            self.tokens.level -= tokens_used


def budgets_of(callers) -> dict[str, KeyBudget]:
    """A budget per caller whose limits set anything; callers without limits are not tracked."""
    out = {}
    for caller in callers:
        limits = caller.limits
        if limits is not None and any(getattr(limits, f) is not None for f in KeyLimits.model_fields):
            out[caller.name] = KeyBudget(caller.name, limits)
    return out
