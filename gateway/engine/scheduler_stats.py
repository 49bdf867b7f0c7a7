"""The scheduler's counters since start-up and the rates derived from them, read by /health and
/metrics through Engine.snapshot()."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    """Counters the scheduler bumps as it works; nothing here is read back by scheduling."""

    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    cancelled: int = 0
    pages_read: int = 0
    pages_skipped: int = 0
    l2_hit_tokens: int = 0       # of cached_prompt_tokens, loaded back from the host tier
    l3_hit_tokens: int = 0       # of cached_prompt_tokens, loaded back from disk

    def hit_rates(self) -> dict[str, float]:
        """Cached prompt tokens per prompt token, in all and by the tier they came from (the three
        tiers' rates add up to the whole)."""
        prompt = self.prompt_tokens or 1
        l1 = self.cached_prompt_tokens - self.l2_hit_tokens - self.l3_hit_tokens
        return {"hit_rate": self.cached_prompt_tokens / prompt, "l1_hit_rate": l1 / prompt,
                "l2_hit_rate": self.l2_hit_tokens / prompt, "l3_hit_rate": self.l3_hit_tokens / prompt}

    def sparsity(self) -> float:
        """Pages sparse attention skipped per page it could have read."""
        eligible = self.pages_read + self.pages_skipped
        return self.pages_skipped / eligible if eligible else 0.0
