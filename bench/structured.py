"""Decode tok/s with and without a json_schema constraint, and the grammar's cost per token, for one
stream and 8 streams, in one run: the real Scheduler over the CPU TorchRunner (the default dtype),
the packaged SmolLM2-135M, sampled at temperature 1 with fixed seeds.

    python -m bench.structured [--tokens 128] [--repeat 3] [--threads N]

Unconstrained streams ignore end-of-turn and the schema's last string is long, so every stream runs its
full length in both modes and batches stay the same size. The
mask cost is the time in Constraint.next_mask + accept (host work on the step's critical path).
"""
from __future__ import annotations

import argparse
import statistics
import time

from backends.base import RunnerSettings
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from backends.source import resolve_source
from gateway.detokenizer import IncrementalDetokenizer
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request
from gateway.engine.scheduler import Scheduler
from gateway.grammar import Constraint, compiler_for, json_schema_spec
from gateway.templating import load_tokenizer

SOURCE = "packaged:smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
    # long enough that no stream completes the JSON within the run: every batch stays full, so the
    # ratio is the constraint's cost, not fewer streams (a completed grammar ends its stream)
    "summary": {"type": "string", "minLength": 2000}},
    "required": ["title", "scores", "tags", "summary"], "additionalProperties": False}


class TimedConstraint(Constraint):
    """A Constraint that adds its host time to a shared counter."""

    spent = [0.0, 0]      # seconds, masks built

    def next_mask(self):
        start = time.perf_counter()
        mask = super().next_mask()
        TimedConstraint.spent[0] += time.perf_counter() - start
        TimedConstraint.spent[1] += 1
        return mask

    def accept(self, token_id: int) -> bool:
        start = time.perf_counter()
        ok = super().accept(token_id)
        TimedConstraint.spent[0] += time.perf_counter() - start
        return ok


def run(runner, tokenizer, prompt: list[int], streams: int, tokens: int, constrained: bool) -> tuple[float, int]:
    """Decode tok/s over the steps after every prompt is prefilled; tokens generated."""
    pool = PagePool(runner.num_pages)
    sched = Scheduler(runner, pool, RadixCache(pool, runner.page_size, enabled=False), max_running=streams,
                      prefill_chunk_tokens=4096, context_length=runner.context_length)
    compiler = compiler_for(tokenizer, runner.info.vocab_size)
    requests = []
    for i in range(streams):
        request = Request(id=f"r{i}", index=i, prompt_ids=list(prompt), params=SamplingParams(seed=i),
                          max_new_tokens=tokens, stop_token_ids=frozenset(),
                          detokenizer=IncrementalDetokenizer(tokenizer, []), emit=lambda event: None)
        if constrained:
            matcher = compiler.constraint(json_schema_spec(SCHEMA))
            request.constraint = TimedConstraint(matcher._matcher, matcher.vocab_size)
        requests.append(request)
        sched.add(request)
    while any(not r.output_ids for r in requests):
        sched.step()
    generated = sum(len(r.output_ids) for r in requests)
    start = time.perf_counter()
    while sched.has_work:
        sched.step()
    elapsed = time.perf_counter() - start
    generated = sum(len(r.output_ids) for r in requests) - generated
    return generated / elapsed, generated


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    src = resolve_source(SOURCE)
    runner = TorchRunner(RunnerSettings(src.kind, src.path, "smollm2", page_size=16, num_pages=1024,
                                        max_sequences=8, threads=args.threads))
    tokenizer = load_tokenizer(src)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Review a film as JSON."}])
    compiler_for(tokenizer, runner.info.vocab_size).compile(json_schema_spec(SCHEMA))    # compiled once, before
    run(runner, tokenizer, prompt, 1, 8, True)                                             # warm-up
    print(f"device {runner.info.device}, dtype {runner.info.dtype}, {args.tokens} new tokens, "
          f"median of {args.repeat}")
    print("| streams | plain tok/s | json_schema tok/s | ratio | mask us/token |")
    print("| --- | --- | --- | --- | --- |")
    for streams in (1, 8):
        plain = [run(runner, tokenizer, prompt, streams, args.tokens, False)[0] for _ in range(args.repeat)]
        TimedConstraint.spent = [0.0, 0]
        constrained = [run(runner, tokenizer, prompt, streams, args.tokens, True)[0] for _ in range(args.repeat)]
        spent, masks = TimedConstraint.spent
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"| {streams} | {p:.1f} | {c:.1f} | {c / p:.3f} | {spent / max(masks, 1) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
