"""One generation request's state, kept in one place and owned by the engine process."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.sampling_params import SamplingParams
from gateway.detokenizer import IncrementalDetokenizer


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """What the scheduler tells the HTTP side after each step of one request (one choice)."""

    index: int                                   # choice index within the HTTP request
    text: str                                    # newly safe text (may be "")
    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]  # (token, logprob, top) per token
    finish_reason: str | None = None             # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A prompt to continue and everything the scheduler tracks about it."""

    id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    emit: Callable[[TokenEvent], None]           # thread-safe hand-off to the HTTP side
    wait_for: Request | None = None              # an n>1 sibling whose prompt we share
    arrival_s: float = field(default_factory=time.monotonic)
    priority: int = 0                            # lower first (the fair policy; fcfs ignores it)

    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    page_table: list[int] = field(default_factory=list)
    tree_pages: int = 0              # leading pages of page_table owned by the radix cache (locked)
    lock_node: object | None = None  # the deepest radix node this request holds locked
    num_computed: int = 0            # tokens whose KV is in the pages or being written by a launched step
    pending: int = 0                 # tokens drawn by launched steps whose ids have not come back
    cached_tokens: int = 0           # prompt tokens served from the cache (first admission)
    admitted_once: bool = False
    cancelled: bool = False
    finish_reason: str | None = None
    first_token_s: float | None = None
    seed: int = 0                    # the draws' seed (Scheduler.add resolves it)
    seq_slot: int = -1               # row of the backend's page-table store while admitted
    table_epoch: int = 0             # new whenever page_table is rewritten, not appended to
    arrival_step: int = 0            # the scheduler step it was queued in (requests age in steps)
    cached_estimate: int = 0         # cached prefix tokens when last measured while waiting (fair)
    measured_step: int = -1          # the step of that measurement; -1: never
    constraint: object | None = None  # a grammar's matcher (gateway/grammar.Constraint): masks each draw

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (the hot path asks for one token per step)."""
        split = len(self.prompt_ids)
        if end <= split:
            return self.prompt_ids[start:end]
        if start >= split:
            return self.output_ids[start - split:end - split]
        return self.prompt_ids[start:] + self.output_ids[:end - split]

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def owned_pages(self) -> int:
        """Pages this request holds outside the radix cache."""
        return len(self.page_table) - self.tree_pages

    @property
    def known_len(self) -> int:
        """Tokens so far, including draws in flight."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def penalized(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty)

    @property
    def needs_last_token(self) -> bool:
        """Its next draw depends on every earlier token on the host (penalties count them, a
        grammar's mask follows them), so under overlap it waits for its draw in flight."""
        return self.penalized or self.constraint is not None
