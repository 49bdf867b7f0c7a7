"""The batched torch sampler (on CPU tensors) against the NumPy reference, token for token."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import SampleSpec
from backends.cuda.sampler import TorchSampler
from backends.sampling_params import SamplingParams, draw_uniform
from gateway.engine.sampling import Sampler

CPU = torch.device("cpu")

# One of each kind, and combinations; every batch below mixes them.
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.3),
    SamplingParams(temperature=1.7),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.8, top_k=40),
    SamplingParams(temperature=1.2, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.5, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.8, min_p=0.02),
    SamplingParams(temperature=2.0, top_k=200, top_p=0.95, min_p=0.1),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 10: -100.0, 7: 2.5}),
    SamplingParams(temperature=0, logit_bias={11: 100.0}),
    SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=0.7),
    SamplingParams(temperature=0.8, top_k=20, frequency_penalty=-0.4, logit_bias={5: 3.0}),
    SamplingParams(temperature=1.0, logprobs=True),
    SamplingParams(temperature=0.6, top_p=0.9, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=0, logprobs=True, top_logprobs=20),
    SamplingParams(temperature=1.1, top_k=30, min_p=0.05, presence_penalty=1.0, logprobs=True, top_logprobs=3,
                   logit_bias={0: 4.0}),
]


def specs_for(params, vocab, seed, step=0):
    """One SampleSpec per params, each with its own seed and a generated history."""
    rng = np.random.default_rng(seed)
    specs = []
    for i, p in enumerate(params):
        hot = rng.integers(0, vocab, 8)              # repeats, so frequency counts exceed 1
        generated = rng.choice(hot, int(rng.integers(0, 30))).tolist()
        specs.append(SampleSpec(p, draw_uniform(seed * 1000 + i, step), generated))
    return specs


def reference(logits: np.ndarray, specs):
    """The NumPy sampler's tokens, each with the log_softmax of its processed logits (float64)."""
    out = []
    for row, s in zip(logits, specs, strict=True):
        ref = Sampler(s.params, logits.shape[1])
        for t in s.generated:
            ref.observe(t)
        x = ref.process(row).astype(np.float64)
        with np.errstate(invalid="ignore"):
            lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        out.append((ref.sample(row, s.uniform), lp))
    return out


def device(logits: np.ndarray, specs):
    return TorchSampler(logits.shape[1], CPU).sample(torch.from_numpy(logits), specs)


def assert_same(got, want):
    assert [t.token_id for t in got] == [t.token_id for t, _ in want]
    for g, (w, lp) in zip(got, want, strict=True):
        if w.logprob is None:
            assert g.logprob is None and g.top_logprobs == []
            continue
        assert isinstance(g.logprob, float) and isinstance(g.token_id, int)
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert len(g.top_logprobs) == len(w.top_logprobs)
        for (gi, gv), (wi, wv) in zip(g.top_logprobs, w.top_logprobs, strict=True):
            assert isinstance(gi, int) and isinstance(gv, float)
            assert gv == pytest.approx(wv, abs=1e-4)
            assert gi == wi or gv == pytest.approx(lp[gi], abs=1e-4)      # ties may come in any order


def random_logits(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 3
    return x.numpy()


@pytest.mark.parametrize("vocab, rounds", [(1000, 25), (49152, 3)])
def test_matches_reference_mixed_batch(vocab, rounds):
    for r in range(rounds):
        logits = random_logits(len(PARAMS), vocab, seed=r)
        specs = specs_for(PARAMS, vocab, seed=r, step=r)
        assert_same(device(logits, specs), reference(logits, specs))


def test_many_draws_cover_the_distribution():
    """The same row drawn with many uniforms: every draw agrees, and the draws spread out."""
    vocab = 1000
    row = random_logits(1, vocab, seed=99)[0] / 3        # flatter: many candidates
    for p in [SamplingParams(temperature=1.0), SamplingParams(top_k=20), SamplingParams(top_p=0.7),
              SamplingParams(min_p=0.3), SamplingParams(top_k=30, top_p=0.9, min_p=0.1, temperature=0.5)]:
        specs = [SampleSpec(p, draw_uniform(5, i)) for i in range(200)]
        logits = np.repeat(row[None], len(specs), axis=0)
        got = device(logits, specs)
        assert_same(got, reference(logits, specs))
        assert len({t.token_id for t in got}) > 3


def test_extreme_uniforms():
    logits = random_logits(4, 1000, seed=3)
    for u in (0.0, 1e-300, 0.5, 1.0 - 2.0 ** -53):
        specs = [SampleSpec(p, u) for p in (SamplingParams(), SamplingParams(top_k=7), SamplingParams(top_p=0.6),
                                            SamplingParams(min_p=0.5))]
        assert_same(device(logits, specs), reference(logits, specs))


def test_row_gets_the_same_token_alone_or_batched():
    vocab = 4096
    logits = random_logits(len(PARAMS), vocab, seed=11)
    specs = specs_for(PARAMS, vocab, seed=11)
    batched = device(logits, specs)
    for i, s in enumerate(specs):
        alone = device(logits[i:i + 1], [s])[0]
        assert alone.token_id == batched[i].token_id and alone.logprob == batched[i].logprob
    # a greedy row among sampled ones, and the reverse
    for order in ([0, 1, 7], [1, 0], [7, 1, 13, 0]):
        sub = device(logits[order], [specs[i] for i in order])
        assert [t.token_id for t in sub] == [batched[i].token_id for i in order]


def test_all_greedy_fast_path():
    logits = random_logits(6, 1000, seed=4)
    specs = [SampleSpec(SamplingParams(temperature=0), 0.5), SampleSpec(SamplingParams(top_k=1, temperature=1.3), 0.1)]
    got = device(logits[:2], specs)
    assert [t.token_id for t in got] == np.argmax(logits[:2], axis=1).tolist()
    assert all(t.logprob is None and t.top_logprobs == [] for t in got)


def test_penalties_and_bias_match_reference():
    vocab = 1000
    logits = np.zeros((3, vocab), np.float32)
    logits[:, :3] = [5.0, 4.9, 4.8]
    history = [0, 0, 1, 0]
    specs = [SampleSpec(SamplingParams(temperature=0, frequency_penalty=0.2), 0.0, history),
             SampleSpec(SamplingParams(temperature=0, presence_penalty=0.25), 0.0, history),
             SampleSpec(SamplingParams(temperature=0, logit_bias={999: 5.5}, frequency_penalty=0.1), 0.0, [])]
    got = device(logits, specs)
    assert [t.token_id for t in got] == [2, 2, 999]
    assert_same(got, reference(logits, specs))


def test_degenerate_rows_fall_back_to_argmax():
    vocab = 64
    logits = np.full((3, vocab), -np.inf, np.float32)
    logits[1, 40] = np.inf
    logits[2, [7, 8]] = np.log([0.8, 0.2])          # mostly -inf but fine: a real draw
    specs = [SampleSpec(SamplingParams(top_p=0.5, min_p=0.1, top_k=3), 0.3)] * 2 + \
            [SampleSpec(SamplingParams(top_k=3), 0.9)]
    got = device(logits, specs)
    assert [t.token_id for t in got] == [0, 40, 8]
    assert_same(got, reference(logits, specs))


def test_tiny_temperature_is_not_nan():
    logits = random_logits(2, 1000, seed=8)
    specs = [SampleSpec(SamplingParams(temperature=1e-45), 0.7), SampleSpec(SamplingParams(temperature=1e-30), 0.99)]
    got = device(logits, specs)
    assert [t.token_id for t in got] == np.argmax(logits, axis=1).tolist()
    assert_same(got, reference(logits, specs))


def test_caller_logits_untouched():
    logits = torch.from_numpy(random_logits(2, 100, seed=1))
    before = logits.clone()
    specs = [SampleSpec(SamplingParams(logit_bias={5: 50.0}, presence_penalty=1.0), 0.2, [1, 2]),
             SampleSpec(SamplingParams(temperature=0, frequency_penalty=1.0, logprobs=True), 0.2, [3])]
    TorchSampler(100, CPU).sample(logits, specs)
    assert torch.equal(logits, before)


def test_validation():
    s = TorchSampler(100, CPU)
    with pytest.raises(ValueError, match=r"logit_bias token ids \[100, 150\]"):
        s.sample(torch.zeros(1, 100), [SampleSpec(SamplingParams(logit_bias={150: 1.0, 100: 2.0, 3: 1.0}), 0.5)])
    with pytest.raises(ValueError, match="shape"):
        s.sample(torch.zeros(2, 100), [SampleSpec(SamplingParams(), 0.5)])
    with pytest.raises(ValueError, match="shape"):
        s.sample(torch.zeros(1, 101), [SampleSpec(SamplingParams(), 0.5)])
    assert s.sample(torch.zeros(0, 100), []) == []


# Small vocabularies of small-integer logits: ties everywhere (top_k and nucleus cut-offs, argmax).
@st.composite
def params_strategy(draw):
    top_logprobs = draw(st.integers(-1, 4))               # -1: no logprobs
    return SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.25, 1.0, 2.0])),
        top_p=draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.1])),
        top_k=draw(st.sampled_from([-1, 0, 1, 2, 5, 31, 32, 100])),
        min_p=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        presence_penalty=draw(st.sampled_from([0.0, 0.5, -1.5])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.25, 2.0])),
        logit_bias=draw(st.dictionaries(st.integers(0, 31), st.sampled_from([-100.0, -1.0, 0.5, 3.0]), max_size=3)),
        logprobs=top_logprobs >= 0,
        top_logprobs=max(top_logprobs, 0),
    )


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(params_strategy(), st.floats(0.0, 1.0, exclude_max=True),
                               st.lists(st.integers(0, 31), max_size=6),
                               st.lists(st.integers(-3, 3), min_size=32, max_size=32)),
                     min_size=1, max_size=6))
def test_matches_reference_with_ties(rows):
    logits = np.array([r[3] for r in rows], np.float32)
    specs = [SampleSpec(p, u, gen) for p, u, gen, _ in rows]
    assert_same(device(logits, specs), reference(logits, specs))
