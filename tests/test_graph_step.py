"""The CPU-checkable parts of the CUDA-graph decode: buckets and widths, and the static decode step
a graph captures, run eagerly on the CPU (Triton attention under TRITON_INTERPRET=1, per test).

A padded static step must give each real row exactly what the eager layout gives it, write K/V only
into the real rows' slots and the scratch page, and read a PENDING_TOKEN from next_tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import PENDING_TOKEN, ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
from backends.cuda.graphs import StaticDecodeStep, bucket_sizes
from backends.cuda.layout import graph_batch, table_width, table_widths
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams

GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
PAGE = 16


def test_buckets_and_widths():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(3) == [1, 2, 4] and bucket_sizes(10) == [1, 2, 4, 8, 16]
    assert [graph_batch(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 64)] == [1, 2, 4, 4, 8, 8, 16, 24, 64]
    assert table_widths(8192) == [256, 512, 1024, 2048, 4096, 8192] and table_widths(100) == [100]
    assert [table_width(p, 8192) for p in (1, 256, 257, 1025, 2048, 5000)] == [256, 256, 512, 2048, 2048, 8192]
    assert all(table_width(p, 2048) in table_widths(2048) for p in range(1, 2049))


def make_runner() -> TorchRunner:
    return TorchRunner(RunnerSettings("random", "tiny", "tiny", dtype="bfloat16", attention="triton",
                                      num_pages=24, page_size=PAGE, max_sequences=6, context_length=256,
                                      validate_batches=True))


def prefill(runner: TorchRunner, prompts, tables) -> list[int]:
    chunks = [SequenceChunk(p, 0, t, slot, 1, GREEDY)
              for slot, (p, t) in enumerate(zip(prompts, tables, strict=True))]
    return [t.token_id for t in runner.forward(ForwardBatch(chunks)).tokens]


def test_static_step_matches_eager_decode(triton_interpreter):
    """Three decodes padded to bucket 4: same logits as the eager step; padding touches only the
    scratch page; a PENDING_TOKEN row reads the slot's last draw."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (20, 33, 7)]
    tables = [[3, 9], [1, 12, 5], [7]]
    eager, static = make_runner(), make_runner()
    first = prefill(eager, prompts, tables)
    assert prefill(static, prompts, tables) == first
    # decode: rows 0 and 2 know their token, row 1 reads its pending draw from next_tokens
    chunks = [SequenceChunk([first[0]], 20, tables[0], 0, 1, GREEDY),
              SequenceChunk([PENDING_TOKEN], 33, tables[1], 1, 1, GREEDY),
              SequenceChunk([first[2]], 7, tables[2], 2, 1, GREEDY)]
    want = eager.forward(ForwardBatch(chunks, return_logits=True)).logits

    untouched = [p for p in range(static.num_pages) if p not in {3, 9, 1, 12, 5, 7}]
    static.cache.k[:, untouched] = float("nan")
    before_scratch = static.cache.k[:, static.cache.scratch_page].clone()
    static.tables.sync(chunks, PAGE)
    bs = graph_batch(len(chunks))
    step = StaticDecodeStep(static.model, static.attention, static.tables, static.next_tokens, PAGE,
                            static.cache.scratch_page, bs, table_width(3, static.tables.max_pages), static.device)
    step.fill(chunks)
    with torch.inference_mode():
        got = step.forward()
    assert got.shape[0] == bs == 4
    np.testing.assert_array_equal(got[:3].float().numpy(), want)
    assert torch.isnan(static.cache.k[:, untouched]).all(), "padding wrote outside the scratch page"
    assert not torch.equal(static.cache.k[:, static.cache.scratch_page], before_scratch)
    for layer in range(static.config.num_layers):        # the real rows' new K equals the eager run's
        for c in chunks:
            slot = c.page_table[c.start_position // PAGE] * PAGE + c.start_position % PAGE
            assert torch.equal(static.cache.k_slots[layer][slot], eager.cache.k_slots[layer][slot])


def test_fill_pads_with_the_scratch_page(triton_interpreter):
    runner = make_runner()
    step = StaticDecodeStep(runner.model, runner.attention, runner.tables, runner.next_tokens, PAGE,
                            runner.cache.scratch_page, 8, 16, runner.device)
    step.fill([SequenceChunk([5], 40, [2, 4, 6], 3, 1, GREEDY)])
    longs, ints = step.longs.tolist(), step.ints.tolist()
    assert [row[0] for row in longs] == [5, 40, 6 * PAGE + 8, 3] and [row[0] for row in ints] == [40, 41]
    assert all(row[1:] == [v] * 7 for row, v in zip(longs, [0, 0, runner.cache.scratch_page * PAGE,
                                                          runner.tables.padding_row], strict=True))
    assert ints[0][1:] == [0] * 7 and ints[1][1:] == [1] * 7
    with pytest.raises(AssertionError):
        step.fill([SequenceChunk([5], 40, [2, 4, 6], i, 1, GREEDY) for i in range(9)])
