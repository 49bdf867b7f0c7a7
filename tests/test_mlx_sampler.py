"""The MLX sampler against the NumPy reference, token for token (the torch sampler's test cases)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")
import mlx.core as mx  # noqa: E402

from backends.base import SampleSpec  # noqa: E402
from backends.mlx.sampler import MlxSampler  # noqa: E402
from backends.sampling_params import SamplingParams, draw_uniform  # noqa: E402
from tests.test_device_sampler import PARAMS, assert_same, random_logits, reference, specs_for  # noqa: E402


def mlx_sample(logits: np.ndarray, specs):
    return MlxSampler(logits.shape[1]).sample(mx.array(logits), specs)


@pytest.mark.parametrize("vocab, rounds", [(1000, 10), (49152, 2)])
def test_matches_reference_mixed_batch(vocab, rounds):
    for r in range(rounds):
        logits = random_logits(len(PARAMS), vocab, seed=r)
        specs = specs_for(PARAMS, vocab, seed=r, step=r)
        assert_same(mlx_sample(logits, specs), reference(logits, specs))


def test_many_draws_cover_the_distribution():
    vocab = 1000
    row = random_logits(1, vocab, seed=99)[0] / 3
    for p in [SamplingParams(temperature=1.0), SamplingParams(top_k=20), SamplingParams(top_p=0.7),
              SamplingParams(min_p=0.3), SamplingParams(top_k=30, top_p=0.9, min_p=0.1, temperature=0.5)]:
        specs = [SampleSpec(p, draw_uniform(5, i)) for i in range(100)]
        logits = np.repeat(row[None], len(specs), axis=0)
        got = mlx_sample(logits, specs)
        assert_same(got, reference(logits, specs))
        assert len({t.token_id for t in got}) > 3


def test_extreme_uniforms_and_degenerate_rows():
    logits = random_logits(4, 1000, seed=3)
    for u in (0.0, 1e-300, 0.5, 1.0 - 2.0 ** -53):
        specs = [SampleSpec(p, u) for p in (SamplingParams(), SamplingParams(top_k=7), SamplingParams(top_p=0.6),
                                            SamplingParams(min_p=0.5))]
        assert_same(mlx_sample(logits, specs), reference(logits, specs))
    bad = np.full((3, 64), -np.inf, np.float32)
    bad[1, 40] = np.inf
    bad[2, [7, 8]] = np.log([0.8, 0.2])
    specs = [SampleSpec(SamplingParams(top_p=0.5, min_p=0.1, top_k=3), 0.3)] * 2 + \
            [SampleSpec(SamplingParams(top_k=3), 0.9)]
    got = mlx_sample(bad, specs)
    assert [t.token_id for t in got] == [0, 40, 8]
    assert_same(got, reference(bad, specs))


def test_penalties_bias_and_greedy_fast_path():
    logits = np.zeros((3, 1000), np.float32)
    logits[:, :3] = [5.0, 4.9, 4.8]
    history = [0, 0, 1, 0]
    specs = [SampleSpec(SamplingParams(temperature=0, frequency_penalty=0.2), 0.0, history),
             SampleSpec(SamplingParams(temperature=0, presence_penalty=0.25), 0.0, history),
             SampleSpec(SamplingParams(temperature=0, logit_bias={999: 5.5}, frequency_penalty=0.1), 0.0, [])]
    got = mlx_sample(logits, specs)
    assert [t.token_id for t in got] == [2, 2, 999]
    assert_same(got, reference(logits, specs))
    plain = random_logits(2, 1000, seed=4)
    greedy = [SampleSpec(SamplingParams(temperature=0), 0.5), SampleSpec(SamplingParams(top_k=1, temperature=1.3), 0.1)]
    out = mlx_sample(plain, greedy)
    assert [t.token_id for t in out] == np.argmax(plain, axis=1).tolist()
    assert all(t.logprob is None for t in out)


@pytest.mark.skipif("allowed" not in {f.name for f in dataclasses.fields(SampleSpec)},
                    reason="this contract has no grammar bitmasks (SampleSpec.allowed)")
def test_grammar_bitmask_matches_reference():
    vocab = 1000
    rng = np.random.default_rng(7)
    logits = random_logits(3, vocab, seed=7)
    masks = [rng.integers(-2**31, 2**31, size=-(-vocab // 32), dtype=np.int64).astype(np.int32) for _ in range(2)]
    specs = [SampleSpec(SamplingParams(temperature=0), 0.5, (), masks[0]),
             SampleSpec(SamplingParams(temperature=1.0, top_p=0.9, logprobs=True), 0.3, (), masks[1]),
             SampleSpec(SamplingParams(temperature=0.7), 0.8)]
    got = mlx_sample(logits, specs)
    want = []
    from gateway.engine.sampling import Sampler
    for row, s in zip(logits, specs, strict=True):
        want.append(Sampler(s.params, vocab).sample(row, s.uniform, s.allowed).token_id)
    assert [t.token_id for t in got] == want
    for t, mask in zip(got[:2], masks, strict=True):
        assert (int(mask[t.token_id // 32]) >> (t.token_id % 32)) & 1
