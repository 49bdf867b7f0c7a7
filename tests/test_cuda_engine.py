"""The CUDA engine on a GPU (skipped without one): the Triton attention backend with CUDA graphs
against the CPU reference path on the same random weights, and graphs against eager steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings
from backends.cuda.layout import table_width
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
PAGE = 16


def make_runner(arch: str, device: str, dtype: str, attention: str, graphs: bool, sparse: SparseSettings | None = None,
                **sizes):
    """sizes: num_pages, max_sequences, context_length instead of the small defaults."""
    sizes = dict(num_pages=512, max_sequences=8, context_length=2048) | sizes
    return TorchRunner(RunnerSettings("random", arch, arch, dtype=dtype, device=device, attention=attention,
                                      cuda_graphs=graphs, page_size=PAGE, sparse=sparse or SparseSettings(),
                                      validate_batches=True, **sizes))


def prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def tables(lengths: list[int], new_tokens: int) -> list[list[int]]:
    out, at = [], 1
    for n in lengths:
        pages = -(-(n + new_tokens) // PAGE)
        out.append(list(range(at + pages - 1, at - 1, -1)))   # descending: tables are not identity
        at += pages
    return out


def generate(runner: TorchRunner, ids: list[list[int]], steps: int, forced: list[list[int]] | None = None):
    """Prefill every prompt in one batch, then `steps` decode steps of all rows; returns the greedy
    tokens [steps + 1][rows] and the logits of each step. forced: feed these tokens instead."""
    lengths = [len(p) for p in ids]
    pages = tables(lengths, steps + 1)
    chunks = [SequenceChunk(p, 0, t, i, 1, GREEDY) for i, (p, t) in enumerate(zip(ids, pages, strict=True))]
    result = runner.forward(ForwardBatch(chunks, return_logits=True))
    tokens, logits = [[t.token_id for t in result.tokens]], [result.logits]
    for step in range(steps):
        feed = forced[step] if forced else tokens[-1]
        chunks = [SequenceChunk([feed[i]], lengths[i] + step, pages[i], i, 1, GREEDY) for i in range(len(ids))]
        result = runner.forward(ForwardBatch(chunks, return_logits=True))
        tokens.append([t.token_id for t in result.tokens])
        logits.append(result.logits)
    return tokens, logits


@pytest.mark.parametrize("arch, attention, graphs", [("tiny", "triton", True), ("llama-3.2-1b", "triton", True),
                                                    ("llama-3.2-1b", "torch", False)])
def test_cuda_matches_cpu_reference(arch, attention, graphs):
    """bf16 on the GPU vs float32 torch ops on the CPU (the reference path), same weights and the
    same fed tokens: logits within bf16 tolerance at every step. The Triton backend with graphs,
    and the plain torch backend run eagerly on the GPU."""
    gpu = make_runner(arch, "cuda", "bfloat16", attention, graphs)
    cpu = make_runner(arch, "cpu", "float32", "torch", False)
    ids = prompts([37, 100, 5, 64], gpu.config.vocab_size, 1)
    ref_tokens, ref_logits = generate(cpu, ids, 8)
    _, logits = generate(gpu, ids, 8, forced=ref_tokens)
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 3e-2, f"step {step}: relative error {err:.3g}"


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_graphs_equal_eager(batch, sparse):
    """64 greedy tokens identical with CUDA graphs and without (batch sizes that are buckets)."""
    settings = SparseSettings(True, token_budget=128, dense_layers=2, sink_tokens=16, recent_tokens=32,
                              summary_tokens=4, shortlist_tokens=256) if sparse else SparseSettings()
    # (a shortlist of 16 pages: the 411-token prompt is scored coarse to fine, the others in one stage)
    with_graphs, eager = graphs_and_eager(settings, [300, 57, 190, 411][:batch], 64, seed=2)
    assert with_graphs == eager


def graphs_and_eager(sparse: SparseSettings, lengths: list[int], steps: int, seed: int, **sizes):
    """The greedy tokens of random prompts of these lengths on Llama-3.2-1B shapes, with CUDA
    graphs and without."""
    runs = []
    for graphs in (True, False):
        runner = make_runner("llama-3.2-1b", "cuda", "bfloat16", "triton", graphs, sparse, **sizes)
        assert (runner.graphs is not None) == graphs
        runs.append(generate(runner, prompts(lengths, runner.config.vocab_size, seed), steps)[0])
        del runner
        torch.cuda.empty_cache()
    return runs


@pytest.mark.parametrize("selector", [None, "quest", "centroids"])
def test_graphs_equal_eager_at_long_widths(selector):
    """Rows of 30000 and 5000 tokens run at the 2048-page width class (of 256, 512, ... up to a
    131072-token context's 8192): 16 greedy tokens identical with CUDA graphs and without, dense and
    with either sparse selector at the engine's default budget."""
    assert table_width(-(-(30000 + 17) // PAGE), 131072 // PAGE) == 2048
    sparse = SparseSettings(True, selector=selector) if selector else SparseSettings()
    with_graphs, eager = graphs_and_eager(sparse, [30000, 5000], 16, seed=3, num_pages=2560, max_sequences=4,
                                          context_length=131072)
    assert with_graphs == eager
