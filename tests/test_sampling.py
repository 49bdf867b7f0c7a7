"""The NumPy reference sampler: greedy, seeds, filters, the canonical draw, penalties, logit_bias,
logprobs, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.engine.sampling import Sampler, SamplingParams, draw_uniform

V = 49152


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(1234)
    return [(rng.standard_normal(V) * 4).astype(np.float32) for _ in range(8)]


def run(params, rows, n=None):
    s = Sampler(params, V)
    return [s.sample(rows[i % len(rows)]).token_id for i in range(n or len(rows))]


def test_greedy_is_argmax(rows):
    s = Sampler(SamplingParams(temperature=0), V)
    for r in rows:
        assert s.sample(r).token_id == int(np.argmax(r))


def test_caller_logits_untouched(rows):
    r = rows[0].copy()
    Sampler(SamplingParams(temperature=0, logit_bias={5: 50.0}, presence_penalty=1.0), V).sample(r)
    assert np.array_equal(r, rows[0])


def test_same_seed_same_tokens(rows):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    assert run(p, rows, 40) == run(p, rows, 40)
    assert run(p, rows, 40) != run(SamplingParams(temperature=1.0, top_p=0.9, seed=8), rows, 40)


def test_no_seed_varies(rows):
    flat = [np.zeros(V, np.float32)]
    assert run(SamplingParams(), flat, 20) != run(SamplingParams(), flat, 20)
    a, b = Sampler(SamplingParams(), V), Sampler(SamplingParams(), V)
    assert isinstance(a.seed, int) and a.seed != b.seed        # drawn once, from OS entropy


def test_draws_are_counter_based(rows):
    """Token i of a seeded request uses draw_uniform(seed, i): no hidden generator state."""
    p = SamplingParams(temperature=1.0, top_k=50, seed=7)
    seeded = run(p, rows, 16)
    other = Sampler(SamplingParams(temperature=1.0, top_k=50, seed=123), V)
    assert [other.sample(rows[i % len(rows)], draw_uniform(7, i)).token_id for i in range(16)] == seeded
    s = Sampler(p, V)
    s.observe(42)                           # an observed token takes index 0 ...
    assert s.num_generated == 1
    assert s.sample(rows[1]).token_id == seeded[1]             # ... so this draw uses index 1
    assert s.num_generated == 2


def test_draw_is_inverse_cdf_in_id_order():
    logits = np.full(V, -np.inf, np.float32)
    logits[[3, 9, 20]] = np.log([0.2, 0.5, 0.3])
    s = Sampler(SamplingParams(temperature=1.0), V)
    got = [s.sample(logits, u).token_id for u in (0.0, 0.1, 0.25, 0.6, 0.75, 0.99, 1.0 - 2.0 ** -53)]
    assert got == [3, 3, 9, 9, 20, 20, 20]
    k2 = Sampler(SamplingParams(temperature=1.0, top_k=2), V)          # keeps 9 and 20: 0.625, 0.375
    assert [k2.sample(logits, u).token_id for u in (0.0, 0.6, 0.63, 0.99)] == [9, 9, 20, 20]


def test_top_k_keeps_ties_with_the_kth():
    logits = np.full(V, -30.0, np.float32)
    logits[[5, 6, 7]] = 10.0
    logits[8] = 9.0
    assert set(run(SamplingParams(temperature=1.0, top_k=2, seed=1), [logits], 300)) == {5, 6, 7}


def test_degenerate_row_falls_back_to_argmax():
    dead = np.full(V, -np.inf, np.float32)
    assert run(SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1, top_k=4, seed=1), [dead], 3) == [0, 0, 0]
    hot = dead.copy()
    hot[77] = np.inf
    assert run(SamplingParams(temperature=1.0, seed=1), [hot], 3) == [77, 77, 77]


def test_tiny_temperature_is_argmax(rows):
    assert run(SamplingParams(temperature=1e-45, seed=3), rows) == [int(np.argmax(r)) for r in rows]


def test_top_k_one_is_greedy(rows):
    assert run(SamplingParams(temperature=1.5, top_k=1, seed=1), rows) == [int(np.argmax(r)) for r in rows]


def test_top_k_limits_choices(rows):
    top5 = set(np.argsort(-rows[0])[:5].tolist())
    assert set(run(SamplingParams(temperature=2.0, top_k=5, seed=3), rows[:1], 200)) <= top5


def test_logit_bias_bans_and_forces(rows):
    best = int(np.argmax(rows[0]))
    banned = run(SamplingParams(temperature=0, logit_bias={best: -100.0}), rows[:1])[0]
    assert banned != best
    assert run(SamplingParams(temperature=1.0, logit_bias={123: 100.0}, seed=0), rows, 30) == [123] * 30
    assert best not in run(SamplingParams(temperature=1.0, top_k=2, logit_bias={best: -100.0}, seed=0),
                           rows[:1], 100)


def test_logit_bias_outside_vocab():
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias={V: 1.0}), V)


def test_penalties_lower_repeated_tokens():
    logits = np.zeros(V, np.float32)
    logits[:3] = [5.0, 4.9, 4.8]
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.25), V)
    assert [freq.sample(logits).token_id for _ in range(3)] == [0, 1, 2]   # each use costs 0.25
    pres = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), V)
    assert [pres.sample(logits).token_id for _ in range(3)] == [0, 1, 2]
    rep = Sampler(SamplingParams(temperature=0, frequency_penalty=0.1), V)
    for _ in range(3):
        rep.observe(0)                        # tokens not drawn by sample() count too
    assert rep.process(logits)[0] == pytest.approx(4.7) and rep.counts == {0: 3}
    # float32 count*frequency + presence, exactly as a device computes it
    both = Sampler(SamplingParams(temperature=0, frequency_penalty=0.1, presence_penalty=0.3), V)
    for _ in range(3):
        both.observe(2)
    assert both.process(logits)[2] == logits[2] - (np.float32(3) * np.float32(0.1) + np.float32(0.3))
    assert rep.sample(logits).token_id == 1


def test_top_p_tiny_picks_max(rows):
    assert run(SamplingParams(temperature=2.0, top_p=1e-6, seed=5), rows) == [int(np.argmax(r)) for r in rows]


def test_top_p_keeps_the_nucleus():
    logits = np.full(V, -30.0, np.float32)
    logits[[10, 11, 12]] = np.log([0.5, 0.3, 0.2])
    got = set(run(SamplingParams(temperature=1.0, top_p=0.75, seed=2), [logits], 300))
    assert got == {10, 11}                   # 0.5 + 0.3 reaches 0.75; 0.2 is cut


def test_min_p():
    logits = np.full(V, -30.0, np.float32)
    logits[[1, 2, 3]] = np.log([0.6, 0.3, 0.05])
    got = set(run(SamplingParams(temperature=1.0, min_p=0.1, seed=4), [logits], 300))
    assert got == {1, 2}                     # 0.05 < 0.1 * 0.6


def test_sampling_follows_distribution():
    logits = np.full(V, -np.inf, np.float32)
    logits[[7, 8]] = np.log([0.8, 0.2])
    ids = run(SamplingParams(temperature=1.0, seed=9), [logits], 2000)
    assert 0.75 < ids.count(7) / 2000 < 0.85


def test_logprobs(rows):
    s = Sampler(SamplingParams(temperature=0.7, seed=1, logprobs=True, top_logprobs=20), V)
    out = s.sample(rows[0])
    lp = rows[0].astype(np.float64)
    lp -= np.log(np.exp(lp - lp.max()).sum()) + lp.max()       # reference log_softmax
    assert out.logprob == pytest.approx(lp[out.token_id], abs=1e-4)
    assert len(out.top_logprobs) == 20
    values = [v for _, v in out.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert [t for t, _ in out.top_logprobs] == np.argsort(-lp)[:20].tolist()
    assert math.fsum(math.exp(v) for v in lp) == pytest.approx(1.0)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    greedy = Sampler(SamplingParams(temperature=0, logprobs=True), V).sample(rows[0])
    assert greedy.top_logprobs == [] and greedy.logprob == pytest.approx(lp.max(), abs=1e-4)
    assert Sampler(SamplingParams(temperature=0), V).sample(rows[0]).logprob is None


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.1}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {1: 101.0}}, "logit_bias"), ({"logit_bias": {"1": 1.0}}, "logit_bias"),
    ({"seed": "x"}, "seed"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
])
def test_invalid_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_wrong_logits_shape():
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(), V).sample(np.zeros(V + 1, np.float32))
