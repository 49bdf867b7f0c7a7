"""Reuse of sparse page selections (sparse_attention.reselect_every > 1).

The host's decision (backends/reselect.ReselectClock), the rule (kernels/reference.reused_pages),
the torch and CPU-kernel decode paths against the reference, and the runner on a tiny model: the
steps that select and the steps that reuse, and that a reusing step reads exactly the budget.
The Triton kernel's twin of these is in tests/test_triton_kernels.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings
from backends.cuda.attention import sparse as sa
from backends.cuda.attention.cpu_fused import fused_decode_attention
from backends.cuda.attention.torch_attention import decode_attention
from backends.cuda.runner import TorchRunner
from backends.reselect import ReselectClock
from backends.sampling_params import SamplingParams
from gateway.config import ConfigError, parse_config
from kernels import reference
from tests.conftest import tiny_llama_folder
from tests.test_sparse_attention import decode_meta, random_cache


def chunk(slot: int, end: int, epoch: int = 1) -> SequenceChunk:
    return SequenceChunk([1], end - 1, [], seq_slot=slot, table_epoch=epoch)


def test_clock_selects_then_reuses_until_due():
    clock = ReselectClock(every=3, page_size=16, budget_pages=8)
    rows = lambda end: [chunk(0, end), chunk(4, end + 50)]            # noqa: E731
    assert [clock.step(rows(200 + i)) for i in range(7)] == [False, True, True, False, True, True, False]


def test_clock_new_or_rewritten_or_crossing_rows_select_for_everyone():
    clock = ReselectClock(every=4, page_size=16, budget_pages=8)
    assert not clock.step([chunk(0, 300)])
    assert clock.step([chunk(0, 301)])
    assert not clock.step([chunk(0, 302), chunk(1, 500)])            # a new sequence: all select
    assert clock.step([chunk(0, 303), chunk(1, 501)])
    assert not clock.step([chunk(0, 304), chunk(1, 502, epoch=2)])   # its table rewritten
    assert clock.step([chunk(0, 305)])                                # a row leaving changes nothing
    # 128 tokens are the budget's 8 pages: 129 is past it, and its earlier selection kept every page
    assert not clock.step([chunk(2, 128)])
    assert not clock.step([chunk(2, 129)])
    assert clock.step([chunk(2, 130)])
    assert not clock.step([chunk(3, 300), chunk(3 + 1, 300)]) and not clock.step([chunk(3, 299)])  # shorter
    assert not ReselectClock(every=1, page_size=16, budget_pages=8).step([chunk(0, 300)])
    assert not clock.step([])


def test_reference_reused_pages_keeps_the_scored_pages_and_moves_the_window():
    gen = torch.Generator().manual_seed(0)
    budget, sink, recent = 10, 1, 3
    scores = torch.randn(2, 40, generator=gen)
    stored = reference.select_pages(scores, budget, sink, recent)          # 40 pages
    for pages in (40, 41, 42):
        reused = reference.reused_pages(stored, pages, budget, recent)
        assert reused.shape == (2, budget)
        for h in range(2):
            scored = stored[h][stored[h] < 40 - recent]
            assert reused[h].tolist() == scored.tolist() + list(range(pages - recent, pages))
    assert torch.equal(reference.reused_pages(stored, 7, budget, recent), torch.arange(7).expand(2, 7))


@pytest.mark.parametrize("fused", [False, True])
def test_decode_path_reuses_stored_selection_as_reference(fused):
    if fused:
        from kernels.cpu.build import load
        assert load().available, load().detail
    page_size, budget, sink, recent, kv_heads, group, head_dim = 16, 96, 16, 32, 2, 3, 32
    before = [300, 16 * 12, 120, 50]
    after = [303, 16 * 12 + 4, 123, 53]          # one opens a page; one stays within the budget
    cache, tables = random_cache(after, page_size, kv_heads, head_dim, seed=4)
    settings = SparseSettings(True, budget, 1, sink, recent, 4, 0, reselect_every=4)
    budget_pages, _, recent_pages = reference.sparse_page_counts(page_size, budget, sink, recent)
    store = torch.full((2, 9, kv_heads, budget_pages), -5, dtype=torch.int32)
    slots = torch.tensor([7, 2, 0, 3])
    dense = fused_decode_attention if fused else decode_attention
    scale, layer = reference.default_scale(head_dim), 1
    gen = torch.Generator().manual_seed(1)

    meta = decode_meta(before, tables, page_size, settings)
    meta.selections, meta.decode_seq_slots = store, slots
    q = torch.randn(len(before), kv_heads * group, head_dim, generator=gen)
    sa.sparse_decode_attention(q, cache, layer, meta, scale, dense, fused)
    plan = meta._quest_plan
    _, chosen = sa.sparse_rows_attention(q[plan.sparse_rows], cache.k[layer], cache.v[layer], cache.kmin[layer],
                                         cache.kmax[layer], plan, scale)
    assert torch.equal(store[layer, slots[plan.sparse_rows]].long(), chosen)
    assert (store[0] == -5).all() and (store[layer, [1, 4, 5, 6, 8]] == -5).all()

    meta = decode_meta(after, tables, page_size, settings)
    meta.selections, meta.decode_seq_slots, meta.reuse_selection = store, slots, True
    q = torch.randn(len(after), kv_heads * group, head_dim, generator=gen)
    out = sa.sparse_decode_attention(q, cache, layer, meta, scale, dense, fused)
    for i, n in enumerate(after):
        pages = reference.reused_pages(store[layer, slots[i]].long(), -(-n // page_size), budget_pages,
                                       recent_pages)
        expected = reference.attend_chosen_pages(q[i], cache.k[layer], cache.v[layer], torch.tensor(tables[i]),
                                                 pages, n, scale)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)
    read, skipped = sa.count_pages(after, page_size, budget_pages)
    assert (meta.stats.pages_read, meta.stats.pages_skipped) == (read * kv_heads, skipped * kv_heads)


# ---- the runner --------------------------------------------------------------------------------

PAGE, VOCAB = 4, 96
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-reselect"), hidden_size=48, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=256)


@pytest.mark.parametrize("attention", ["torch", "cpu_fused"])
def test_runner_selects_every_n_steps_and_reads_the_budget(tiny_folder, attention):
    """Two sequences past the budget decode 9 steps with reselect_every 3, a third joins at step
    4: the steps that select are 0, 3, 4 (the newcomer) and 7; the others attend the stored
    selections, which they leave as they were; every step reads exactly the budget's pages. The
    first step computes what a runner that selects at every step computes (the K/V then part)."""
    sparse = SparseSettings(True, 16, 1, 4, 4, 2, 0, reselect_every=3)
    every_step = SparseSettings(True, 16, 1, 4, 4, 2, 0)
    runners = [TorchRunner(RunnerSettings("hf", tiny_folder, "tiny", page_size=PAGE, num_pages=64, threads=1,
                                          sparse=s, attention=attention, validate_batches=True))
               for s in (sparse, every_step)]
    runner, reference_runner = runners
    gen = np.random.default_rng(0)
    prompts = [gen.integers(0, VOCAB, size=n).tolist() for n in (41, 30, 37)]
    tables = [list(range(1, 16)), list(range(16, 31)), list(range(31, 46))]
    for r in runners:
        r.forward(ForwardBatch([SequenceChunk(p, 0, t, seq_slot=i, table_epoch=1, sample=GREEDY)
                                for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]))
    lengths = [len(p) for p in prompts]
    decisions = []
    clock_step = runner.reselect.step
    runner.reselect.step = lambda rows: decisions.append(clock_step(rows)) or decisions[-1]
    budget_pages, kv_heads, layers = 4, runner.config.num_kv_heads, runner.config.num_layers - 1
    for step in range(9):
        rows = [0, 1] + ([2] if step >= 4 else [])
        batch = ForwardBatch([SequenceChunk([int(gen.integers(0, VOCAB))], lengths[i], tables[i], seq_slot=i,
                                            table_epoch=1, sample=GREEDY) for i in rows], return_logits=True)
        stored = runner.attention.selections.clone()
        result = runner.forward(batch)
        if step == 0:
            expected = reference_runner.forward(batch)
            np.testing.assert_allclose(result.logits, expected.logits, rtol=1e-5, atol=1e-5)
        if decisions[-1]:
            assert torch.equal(runner.attention.selections, stored)
        assert np.isfinite(result.logits).all()
        read, skipped = sa.count_pages([lengths[i] + 1 for i in rows], PAGE, budget_pages)
        assert result.attention.pages_read == read * kv_heads * layers
        assert result.attention.pages_skipped == skipped * kv_heads * layers
        for i in rows:
            lengths[i] += 1
    assert decisions == [False, True, True, False, False, True, True, False, True]


def test_config_bounds_and_default():
    def config(value):
        return {"models": [{"name": "m", "source": "packaged:smollm2-135m-instruct",
                            "sparse_attention": {"enabled": True, "reselect_every": value}}]}
    assert parse_config(config(8)).models[0].sparse_attention.reselect_every == 8
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="reselect_every"):
            parse_config(config(bad))
    assert SparseSettings().reselect_every == parse_config(config(1)).models[0].sparse_attention.__class__(
    ).reselect_every
