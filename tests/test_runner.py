"""TorchRunner on a tiny random Llama: batching, page summaries, dtypes, sizing and batch checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk, SparseSettings
from backends.cuda.runner import TorchRunner
from kernels import reference

PAGE = 4
VOCAB = 128
# Sparse decode on (so the cache keeps key summaries), two 2-token summary blocks per page.
SPARSE = SparseSettings(True, token_budget=16, dense_layers=1, sink_tokens=4, recent_tokens=4, summary_tokens=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_runner(folder: str, **overrides) -> TorchRunner:
    settings = dict(page_size=PAGE, num_pages=32, threads=1) | overrides
    return TorchRunner(RunnerSettings("hf", folder, "tiny", **settings))


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def run(runner: TorchRunner, *chunks: SequenceChunk) -> np.ndarray:
    return runner.forward(ForwardBatch(list(chunks))).logits


def test_mixed_batch_equals_sequences_alone(folder):
    alone, mixed = make_runner(folder), make_runner(folder)
    a, b, c = tokens(11, 1), tokens(6, 2), tokens(13, 3)
    tables = {"a": [5, 2, 9, 0], "b": [7, 30], "c": [1, 3, 4, 8]}
    for runner in (alone, mixed):                  # both start with a and b prefilled
        run(runner, SequenceChunk(a[:10], 0, tables["a"]))
        run(runner, SequenceChunk(b[:5], 0, tables["b"]))
    step = [SequenceChunk(a[10:], 10, tables["a"]),                       # decode, page crossed
            SequenceChunk(c[:7], 0, tables["c"], want_logits=False),      # prefill chunk, no logits
            SequenceChunk(b[5:], 5, tables["b"])]                         # decode
    expected = [run(alone, chunk) for chunk in step]
    got = run(mixed, *step)
    assert got.shape == (2, VOCAB) and got.dtype == np.float32
    assert expected[1].shape == (0, VOCAB)
    np.testing.assert_allclose(got[0], expected[0][0], atol=1e-5)
    np.testing.assert_allclose(got[1], expected[2][0], atol=1e-5)
    # The prefill's K/V landed too: c's second chunk, batched with a decode, matches running it alone.
    step = [SequenceChunk(c[7:], 7, tables["c"]), SequenceChunk(tokens(1, 4), 11, tables["a"])]
    expected = [run(alone, chunk)[0] for chunk in step]
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
    assert runner.cache.kmin.shape == (2, 32, PAGE // 2, 2, 16)
    table = [6, 3, 11, 2]
    seq = tokens(14, 5)
    run(runner, SequenceChunk(seq[:5], 0, table))          # page 3 partly filled (1 of 4)
    assert_summaries_exact(runner, table, 5)
    run(runner, SequenceChunk(seq[5:7], 5, table))         # extend inside the partial page and block
    assert_summaries_exact(runner, table, 7)
    for pos in range(7, 14):                               # decode across two page boundaries
        run(runner, SequenceChunk([seq[pos]], pos, table))
        assert_summaries_exact(runner, table, pos + 1)
    # Reuse pages 11 and 3 (full of the old sequence's keys) for a short new sequence: the
    # summaries must cover only what the new owner wrote.
    reused = [11, 3]
    run(runner, SequenceChunk(tokens(5, 6), 0, reused))
    assert_summaries_exact(runner, reused, 5)
    k = runner.cache.k[0]
    assert torch.equal(runner.cache.kmax[0][3, 0], k[3, :1].amax(dim=0))
    assert not runner.cache.kmax[0][3, 1].any()            # the old owner's second block is gone
    # Decodes reuse page 2 (written at slots 0-1 by the first sequence) from slot 0, in place.
    other = [2]
    for pos, token in enumerate(tokens(3, 7)):
        run(runner, SequenceChunk([token], pos, other))
        assert_summaries_exact(runner, other, pos + 1)


def test_dense_runner_keeps_no_summaries(folder):
    runner = make_runner(folder)
    assert runner.cache.kmin is None and runner.cache.kmax is None
    seq, table = tokens(9, 8), [3, 1, 7]
    run(runner, SequenceChunk(seq[:6], 0, table))
    run(runner, SequenceChunk(seq[6:7], 6, table))
    assert runner.cache.kmin is None


def test_bfloat16_close_to_float32(folder):
    fp32, bf16 = make_runner(folder), make_runner(folder, dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16" and bf16.cache.k.dtype == torch.bfloat16
    seq, table = tokens(20, 7), [4, 9, 1, 0, 12, 6]
    for runner in (fp32, bf16):
        runner.out = [run(runner, SequenceChunk(seq[:15], 0, table))[0]]
        for pos in range(15, 20):
            runner.out.append(run(runner, SequenceChunk([seq[pos]], pos, table))[0])
    for a, b in zip(fp32.out, bf16.out, strict=True):
        assert b.dtype == np.float32
        cos = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
        assert cos > 0.999 and np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_info_and_pool_sizing(folder):
    runner = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 20)
    info = runner.info
    # 2 layers * 2 kv heads * 16 dims * 4 bytes * 2 (K, V) * 4 slots = 2048 bytes: no summaries
    assert info.num_pages == (1 << 20) // 2048 == runner.num_pages
    # Sparse on: 2 summary blocks of 2 tokens per page, a min and a max row each: 2560 + 512 bytes
    sparse = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 20, sparse=SPARSE)
    assert sparse.num_pages == (1 << 20) // 3072
    assert (info.page_size, info.context_length, info.vocab_size) == (PAGE, 128, VOCAB)
    assert info.backend == "cpu" and info.dtype == "float32" and info.device == "cpu (1 threads)"
    capped = make_runner(folder, num_pages=None, kv_memory_bytes=1 << 30, context_length=64)
    assert capped.num_pages == 64 // PAGE * 64 and capped.context_length == 64


def test_bad_batches_are_refused(folder):
    runner = make_runner(folder, context_length=16)
    with pytest.raises(AssertionError, match="page table"):
        run(runner, SequenceChunk(tokens(9, 8), 0, [1, 2]))
    with pytest.raises(AssertionError, match="exceed"):
        run(runner, SequenceChunk([1], 16, [1, 2, 3, 4, 5]))
    with pytest.raises(AssertionError, match="same KV slot"):
        run(runner, SequenceChunk([1, 2], 0, [1]), SequenceChunk([3], 1, [1]))
    assert run(runner).shape == (0, VOCAB)
