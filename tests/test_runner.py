"""TorchRunner on tiny models: batching, page summaries, dtypes, attention backends, the page-table
store, pool sizing and batch checks."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from kernels import reference
from tests.conftest import TRITON_JIT_MODULES, tiny_llama_folder, triton_interpreter_mode

PAGE = 4
VOCAB = 128
# Sparse decode on (so the cache keeps key summaries), two 2-token summary blocks per page.
SPARSE = SparseSettings(True, token_budget=16, dense_layers=1, sink_tokens=4, recent_tokens=4, summary_tokens=2,
                        shortlist_tokens=32)      # past 8 pages: coarse to fine
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=128)


def make_runner(folder: str, **overrides) -> TorchRunner:
    settings = dict(page_size=PAGE, num_pages=32, threads=1, validate_batches=True) | overrides
    return TorchRunner(RunnerSettings("hf", folder, "tiny", **settings))


def tokens(n: int, seed: int, vocab: int = VOCAB) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def chunk(token_ids: list[int], start: int, table: list[int], slot: int = 0, epoch: int = 1,
          logits: bool = True) -> SequenceChunk:
    """A sequence chunk that samples greedily after its last token (logits=False: mid-prompt)."""
    return SequenceChunk(token_ids, start, table, seq_slot=slot, table_epoch=epoch,
                         sample=GREEDY if logits else None)


def run(runner: TorchRunner, *chunks: SequenceChunk) -> np.ndarray:
    """The float32 logits of the sampled rows, in batch order."""
    result = runner.forward(ForwardBatch(list(chunks), return_logits=True))
    assert len(result.tokens) == sum(c.sample is not None for c in chunks)
    return result.logits


def test_mixed_batch_equals_sequences_alone(folder):
    alone, mixed = make_runner(folder), make_runner(folder)
    a, b, c = tokens(11, 1), tokens(6, 2), tokens(13, 3)
    tables = {"a": [5, 2, 9, 0], "b": [7, 30], "c": [1, 3, 4, 8]}
    slots = {"a": 0, "b": 1, "c": 2}
    for runner in (alone, mixed):                  # both start with a and b prefilled
        run(runner, chunk(a[:10], 0, tables["a"], slots["a"]))
        run(runner, chunk(b[:5], 0, tables["b"], slots["b"]))
    step = [chunk(a[10:], 10, tables["a"], slots["a"]),                      # decode, page crossed
            chunk(c[:7], 0, tables["c"], slots["c"], logits=False),         # prefill chunk, no logits
            chunk(b[5:], 5, tables["b"], slots["b"])]                        # decode
    expected = [run(alone, one) for one in step]
    got = run(mixed, *step)
    assert got.shape == (2, VOCAB) and got.dtype == np.float32
    assert expected[1].shape == (0, VOCAB)
    np.testing.assert_allclose(got[0], expected[0][0], atol=1e-5)
    np.testing.assert_allclose(got[1], expected[2][0], atol=1e-5)
    # The prefill's K/V landed too: c's second chunk, batched with a decode, matches running it alone.
    step = [chunk(c[7:], 7, tables["c"], slots["c"]), chunk(tokens(1, 4), 11, tables["a"], slots["a"])]
    expected = [run(alone, one)[0] for one in step]
    np.testing.assert_allclose(run(mixed, *step), np.stack(expected), atol=1e-5)


def assert_summaries_exact(runner: TorchRunner, table: list[int], length: int) -> None:
    """Every block of the used pages: min/max of its written keys, 0 where none is written yet."""
    cache = runner.cache
    used = table[:-(-length // PAGE)]
    for layer in range(runner.config.num_layers):
        kmin, kmax = torch.full_like(cache.kmin[layer], torch.nan), torch.full_like(cache.kmax[layer], torch.nan)
        reference.update_page_summaries(kmin, kmax, cache.k[layer], torch.tensor(table), 0, length)
        assert torch.equal(cache.kmin[layer][used], kmin[used])
        assert torch.equal(cache.kmax[layer][used], kmax[used])


def test_page_summaries_exact_after_writes_and_page_reuse(folder):
    runner = make_runner(folder, sparse=SPARSE)
    assert runner.cache.kmin.shape == (2, 32 + 1, PAGE // 2, 2, 16)       # + the scratch page
    table = [6, 3, 11, 2]
    seq = tokens(14, 5)
    run(runner, chunk(seq[:5], 0, table))              # page 3 partly filled (1 of 4)
    assert_summaries_exact(runner, table, 5)
    run(runner, chunk(seq[5:7], 5, table))             # extend inside the partial page and block
    assert_summaries_exact(runner, table, 7)
    for pos in range(7, 14):                           # decode across two page boundaries
        run(runner, chunk([seq[pos]], pos, table))
        assert_summaries_exact(runner, table, pos + 1)
    # Reuse pages 11 and 3 (full of the old sequence's keys) for a short new sequence in the same
    # slot (a new table: a new epoch): the summaries must cover only what the new owner wrote.
    reused = [11, 3]
    run(runner, chunk(tokens(5, 6), 0, reused, epoch=2))
    assert_summaries_exact(runner, reused, 5)
    k = runner.cache.k[0]
    assert torch.equal(runner.cache.kmax[0][3, 0], k[3, :1].amax(dim=0))
    assert not runner.cache.kmax[0][3, 1].any()        # the old owner's second block is gone
    # Decodes reuse page 2 (written at slots 0-1 by the first sequence) from slot 0, in place.
    other = [2]
    for pos, token in enumerate(tokens(3, 7)):
        run(runner, chunk([token], pos, other, epoch=3))
        assert_summaries_exact(runner, other, pos + 1)


def test_dense_runner_keeps_no_summaries(folder):
    runner = make_runner(folder)
    assert runner.cache.kmin is None and runner.cache.kmax is None
    seq, table = tokens(9, 8), [3, 1, 7]
    run(runner, chunk(seq[:6], 0, table))
    run(runner, chunk(seq[6:7], 6, table))
    assert runner.cache.kmin is None


def test_bfloat16_close_to_float32(folder):
    fp32, bf16 = make_runner(folder), make_runner(folder, dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16" and bf16.cache.k.dtype == torch.bfloat16
    seq, table = tokens(20, 7), [4, 9, 1, 0, 12, 6]
    for runner in (fp32, bf16):
        runner.out = [run(runner, chunk(seq[:15], 0, table))[0]]
        for pos in range(15, 20):
            runner.out.append(run(runner, chunk([seq[pos]], pos, table))[0])
    for a, b in zip(fp32.out, bf16.out, strict=True):
        assert b.dtype == np.float32
        cos = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
        assert cos > 0.999 and np.abs(a - b).max() < 0.05 * np.abs(a).max()


# ---- attention backends ----------------------------------------------------------------------------

TINY_VOCAB = 256          # the random "tiny" architecture (backends/cuda/loader.py), head_dim 64
BF16_RTOL = 1.6e-2        # torch.testing's bfloat16 rtol, applied at the scale of the logits as well


def random_runner(attention: str, dtype: str = "float32") -> TorchRunner:
    return TorchRunner(RunnerSettings("random", "tiny", "tiny", dtype=dtype, page_size=8, num_pages=48,
                                      threads=1, context_length=256, attention=attention, max_sequences=4,
                                      validate_batches=True))


def attention_backends(request) -> list[str]:
    """torch always; cpu_fused when its C++ ops build here; triton (CPU interpreter) when installed."""
    from kernels.cpu import build as cpu_kernels

    names = ["torch"]
    if cpu_kernels.load().available:
        names.append("cpu_fused")
    if importlib.util.find_spec("triton") is not None:
        request.getfixturevalue("triton_interpreter")
        names.append("triton")
    return names


def mixed_steps(runner: TorchRunner) -> np.ndarray:
    """Prefills, then decodes (one crossing a page) batched with an extend and a prefill chunk, then
    decodes with the chunked prefill's last chunk: every sampled row's logits, stacked."""
    a, b, c, d = (tokens(n, 20 + n, TINY_VOCAB) for n in (13, 9, 20, 15))
    ta, tb, tc, td = [3, 7], [5], [2, 11, 30], [4, 40]
    out = [run(runner, chunk(a[:12], 0, ta, 0), chunk(b[:8], 0, tb, 1), chunk(d[:6], 0, td, 3, logits=False))]
    tb.append(1)                       # b's next token opens a page, appended in place: same epoch
    out.append(run(runner, chunk(a[12:13], 12, ta, 0), chunk(b[8:9], 8, tb, 1),
                   chunk(d[6:], 6, td, 3), chunk(c[:11], 0, tc, 2, logits=False)))
    out.append(run(runner, chunk([a[0]], 13, ta, 0), chunk([b[0]], 9, tb, 1), chunk([d[0]], 15, td, 3),
                   chunk(c[11:], 11, tc, 2)))
    return np.concatenate(out)


def test_attention_backends_agree_on_a_mixed_batch(request):
    names = attention_backends(request)
    for dtype in ("float32", "bfloat16"):
        logits = {name: mixed_steps(random_runner(name, dtype)) for name in names}
        want = logits["torch"]
        assert want.shape == (2 + 3 + 4, TINY_VOCAB) and np.isfinite(want).all()
        for name in names[1:]:
            if dtype == "float32":
                np.testing.assert_allclose(logits[name], want, rtol=0, atol=1e-4, err_msg=name)
            else:
                scale = float(np.abs(want).max())
                np.testing.assert_allclose(logits[name], want, rtol=BF16_RTOL, atol=BF16_RTOL * scale,
                                           err_msg=name)


def greedy_pair(runner: TorchRunner, steps: int) -> tuple[list[list[int]], np.ndarray]:
    """Two sequences decoded together, greedily, from the backend's own sampled tokens."""
    prompts = [tokens(10, 31, TINY_VOCAB), tokens(5, 32, TINY_VOCAB)]
    tables = [[3, 7, 9, 10, 11, 12], [1, 2, 4, 5, 6, 8]]
    batch = [chunk(p, 0, t, slot) for slot, (p, t) in enumerate(zip(prompts, tables, strict=True))]
    out: list[list[int]] = [[], []]
    logits = []
    for step in range(steps):
        result = runner.forward(ForwardBatch(batch, return_logits=True))
        logits.append(result.logits)
        for slot in range(2):
            out[slot].append(result.tokens[slot].token_id)
        batch = [chunk([out[slot][-1]], len(prompts[slot]) + step, tables[slot], slot) for slot in range(2)]
    return out, np.stack(logits)


def test_attention_backends_same_greedy_tokens(request):
    names = attention_backends(request)
    runs = {name: greedy_pair(random_runner(name), 32) for name in names}
    want_tokens, want_logits = runs["torch"]
    assert len(want_tokens[0]) == len(want_tokens[1]) == 32
    for name in names[1:]:
        got_tokens, got_logits = runs[name]
        assert got_tokens == want_tokens, name
        np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-4, err_msg=name)


def test_triton_interpreter_is_per_test():
    """Inside: TRITON_INTERPRET=1 and interpreted kernels (launchers see them, tl.sum too); after:
    no TRITON_INTERPRET and compiled jit functions again, in every reloaded module."""
    pytest.importorskip("triton")
    if "TRITON_INTERPRET" in os.environ:
        pytest.skip("TRITON_INTERPRET is set for the whole session")
    import sys

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import kernels.triton
    from kernels.triton import decode, extend

    def jit_kinds() -> set[type]:
        kinds = set()
        for name in TRITON_JIT_MODULES:
            for value in vars(sys.modules[name]).values():
                if isinstance(value, (JITFunction, InterpretedFunction)):
                    kinds.add(type(value))
        return kinds

    assert jit_kinds() == {JITFunction}
    with triton_interpreter_mode():
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert jit_kinds() == {InterpretedFunction}
        assert isinstance(tl.sum, InterpretedFunction) and extend.mma is decode.mma
        assert kernels.triton.paged_decode.__globals__["_decode_stage1"] is decode._decode_stage1
        q = torch.randn(1, 4, 64)
        k, v = torch.randn(2, 2, 8, 2, 64)
        out = kernels.triton.paged_decode(q, k, v, torch.tensor([[1]], dtype=torch.int32),
                                          torch.tensor([5], dtype=torch.int32), 0.125)
        expected = reference.paged_attention(q, k, v, torch.tensor([1]), 4, 0.125)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert "TRITON_INTERPRET" not in os.environ
    assert jit_kinds() == {JITFunction}
    assert isinstance(tl.sum, JITFunction) and extend.mma is decode.mma


# ---- the page-table store ----------------------------------------------------------------------------

def test_page_table_store_follows_epochs_and_appends(folder):
    runner, fresh = make_runner(folder, validate_batches=False), make_runner(folder)
    x, y = tokens(10, 11), tokens(7, 12)
    table = [3, 7]
    step = chunk(x[:6], 0, table, slot=0, epoch=1)
    run(runner, step)
    runner.tables.check([step], PAGE)
    table.extend([12, 20])                     # appended in place, as the scheduler does: same epoch
    for pos in range(6, 10):                   # crosses into page 12 at position 8
        step = chunk([x[pos]], pos, table, slot=0, epoch=1)
        run(runner, step)
        runner.tables.check([step], PAGE)
    assert runner.tables.table[0, :3].tolist() == [3, 7, 12]
    # A new sequence in the same slot, with a new epoch: its own table replaces the row.
    other = [9, 1]
    got = [run(runner, chunk(y[:5], 0, other, slot=0, epoch=2))[0]]
    runner.tables.check([chunk(y[:5], 0, other, slot=0, epoch=2)], PAGE)
    assert runner.tables.table[0, :2].tolist() == other
    got.append(run(runner, chunk(y[5:6], 5, other, slot=0, epoch=2))[0])
    # ... and attends over its own pages: the logits of a fresh runner with y in another slot.
    want = [run(fresh, chunk(y[:5], 0, other, slot=2))[0], run(fresh, chunk(y[5:6], 5, other, slot=2))[0]]
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5)
    # A table replaced without a new epoch is a broken contract: the row stays stale, and check says so.
    run(runner, chunk(x[:5], 0, [5, 6], slot=1, epoch=1))
    stale = chunk(x[:5], 0, [8, 6], slot=1, epoch=1)
    run(runner, stale)
    with pytest.raises(AssertionError, match="stale"):
        runner.tables.check([stale], PAGE)
    checked = make_runner(folder)              # validate_batches: every step checks the rows
    run(checked, chunk(x[:5], 0, [5, 6], slot=1, epoch=1))
    with pytest.raises(AssertionError, match="stale"):
        run(checked, chunk(x[:5], 0, [8, 6], slot=1, epoch=1))


# ---- KV pool sizing and info ---------------------------------------------------------------------------

def test_info_and_pool_sizing(folder):
    runner = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 20)
    info = runner.info
    # 2 layers * 2 kv heads * 16 dims * 4 bytes * 2 (K, V) * 4 slots = 2048 bytes: no summaries.
    # The budget holds the pages and the scratch page (CUDA-graph padding writes there).
    assert info.num_pages == (1 << 20) // 2048 - 1 == runner.num_pages == runner.cache.num_pages
    assert runner.cache.k.shape[1] == runner.num_pages + 1 and runner.cache.scratch_page == runner.num_pages
    assert 2 * runner.cache.k.numel() * runner.cache.k.element_size() <= 1 << 20
    # Sparse on: 2 summary blocks of 2 tokens per page and the page's own summary, a min and a max
    # row (256 bytes over the layers) each: 2048 + 6 * 256 bytes
    sparse = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 20, sparse=SPARSE)
    assert sparse.num_pages == (1 << 20) // 3584 - 1
    assert (info.page_size, info.context_length, info.vocab_size) == (PAGE, 128, VOCAB)
    assert info.backend == "cpu" and info.dtype == "float32" and info.device == "cpu (1 threads)"
    one = make_runner(folder, num_pages=None, kv_memory_bytes=2 * 2048)
    assert one.num_pages == 1
    with pytest.raises(ValueError, match="holds no page"):
        make_runner(folder, num_pages=None, kv_memory_bytes=2 * 2048 - 1)


def test_fixed_num_pages_is_honoured(folder):
    runner = make_runner(folder, num_pages=37, kv_memory_bytes=2048, max_sequences=5)
    assert runner.num_pages == runner.info.num_pages == runner.cache.num_pages == 37
    assert runner.cache.k.shape[1] == 38 and runner.cache.scratch_page == 37
    assert runner.tables.table.shape == (5 + 1, 128 // PAGE)
    assert runner.tables.table[5].unique().tolist() == [37]      # the padding row: scratch page only


def test_pool_is_not_capped_by_sequences(folder):
    """The pool holds what the memory budget holds: no cap of max_sequences full contexts (a
    short-context server with many pages serves more concurrent prefixes from the cache)."""
    runner = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 24, context_length=64)
    assert runner.num_pages > 64 // PAGE * runner.max_sequences and runner.context_length == 64


# ---- batch validation ---------------------------------------------------------------------------------

def test_bad_batches_are_refused(folder):
    runner = make_runner(folder, context_length=16, validate_batches=True)
    with pytest.raises(AssertionError, match="page table"):
        run(runner, chunk(tokens(9, 8), 0, [1, 2]))
    with pytest.raises(AssertionError, match="exceed"):
        run(runner, chunk([1], 16, [1, 2, 3, 4, 5]))
    with pytest.raises(AssertionError, match="same KV slot"):
        run(runner, chunk([1, 2], 0, [1], slot=0), chunk([3], 1, [1], slot=1))
    with pytest.raises(AssertionError, match="share seq_slot 3"):
        run(runner, chunk([1, 2], 0, [1], slot=3), chunk([3], 0, [2], slot=3))
    for n, table in ((5, [4, 32]), (3, [32]), (3, [-1])):     # 32: the scratch page, no sequence's
        with pytest.raises(AssertionError, match="page id out of range"):
            run(runner, chunk(tokens(n, 9), 0, table))
    with pytest.raises(AssertionError, match="seq_slot 64 outside"):
        run(runner, chunk([1], 0, [1], slot=64))
    assert run(runner, chunk([1, 2], 0, [31], slot=2)).shape == (1, VOCAB)


def test_empty_batch(folder):
    runner = make_runner(folder, validate_batches=True)
    result = runner.forward(ForwardBatch([], return_logits=True))
    assert result.tokens == []
    assert result.logits.shape == (0, VOCAB)


def test_overlapped_scheduler_gives_the_same_outputs():
    """The real runner under the scheduler with overlap (decodes send PENDING_TOKEN, read on the
    device from next_tokens) gives every request what the step-by-step schedule gives it."""
    from gateway.detokenizer import IncrementalDetokenizer
    from gateway.engine.page_pool import PagePool
    from gateway.engine.radix_cache import RadixCache
    from gateway.engine.request import Request
    from gateway.engine.scheduler import Scheduler

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

    def serve(overlap: bool):
        runner = TorchRunner(RunnerSettings("random", "tiny", "tiny", dtype="float32", attention="torch",
                                            num_pages=200, max_sequences=4, validate_batches=True))
        runner.overlap = overlap
        pool = PagePool(runner.num_pages)
        scheduler = Scheduler(runner, pool, RadixCache(pool, runner.page_size), max_running=4,
                              prefill_chunk_tokens=64, context_length=4096)
        assert scheduler.overlap is overlap
        rng = np.random.default_rng(0)
        requests = []
        for i in range(6):
            params = (SamplingParams(temperature=0) if i % 2 else
                      SamplingParams(temperature=0.9, top_p=0.9, seed=i))
            request = Request(f"r{i}", 0, rng.integers(0, 256, 20 + 17 * i).tolist(), params, 12,
                              frozenset({5}), IncrementalDetokenizer(Tok(), ["<7>"]), lambda event: None)
            scheduler.add(request)
            requests.append(request)
        while scheduler.has_work:
            scheduler.step()
            scheduler.check_accounting()
        return [(r.output_ids, r.finish_reason) for r in requests]

    assert serve(True) == serve(False)


def test_attention_backends_agree_with_a_budget_per_kv_head(request):
    """The centroid selector with a budget per (layer, KV head) (backends/head_budgets.py) through the
    runner: every attention backend decodes the same greedy tokens and logits past the budgets (8-token
    groups, a mean of 4; layer 1's heads keep 5 and 3, layer 2's 4 and 4), and each step reports the
    pages read and skipped of each (layer, KV head)'s own count."""
    from backends.base import SparseSettings
    weights = ((1, (1.25, 0.75)), (2, (1.0, 1.0)))
    sparse = SparseSettings(True, token_budget=32, dense_layers=1, sink_tokens=8, recent_tokens=8, shortlist_tokens=0,
                            selector="centroids", centroids=2, group_tokens=8, head_budget_weights=weights)
    prompts = [tokens(30, 31, TINY_VOCAB), tokens(21, 32, TINY_VOCAB)]
    tables = [[3, 7, 9, 10, 11, 12, 13, 14], [1, 2, 4, 5, 6, 8, 15, 16]]
    runs = {}
    for name in attention_backends(request):
        runner = TorchRunner(RunnerSettings("random", "tiny", "tiny", page_size=8, num_pages=48, threads=1,
                                            context_length=256, attention=name, max_sequences=4,
                                            validate_batches=True, sparse=sparse))
        batch = [chunk(p, 0, t, slot) for slot, (p, t) in enumerate(zip(prompts, tables, strict=True))]
        out, logits = [[], []], []
        for step in range(24):
            result = runner.forward(ForwardBatch(batch, return_logits=True))
            logits.append(result.logits)
            if step:            # decode steps: rows of len(prompt) + step tokens
                want = [0, 0]
                for n in (len(p) + step for p in prompts):
                    for count in (5, 3, 4, 4):
                        dropped = max(0, -(-n // 8) - count)
                        want = [want[0] + -(-n // 8) - dropped, want[1] + dropped]
                assert (result.attention.pages_read, result.attention.pages_skipped) == tuple(want), (name, step)
            for slot in range(2):
                out[slot].append(result.tokens[slot].token_id)
            batch = [chunk([out[slot][-1]], len(prompts[slot]) + step, tables[slot], slot) for slot in range(2)]
        runs[name] = out, np.stack(logits)
    want_tokens, want_logits = runs.pop("torch")
    for name, (got_tokens, got_logits) in runs.items():
        assert got_tokens == want_tokens, name
        np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-4, err_msg=name)
