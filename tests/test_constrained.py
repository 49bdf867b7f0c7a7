"""Constrained decoding below HTTP: grammar compile and masks on the real vocabulary, the bitmask in
the NumPy reference and the torch sampler (token for token), and the scheduler keeping a grammar's
state exact under continuous batching, overlap, preemption and the radix cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backends.base import SampleSpec
from backends.cuda.sampler import TorchSampler
from backends.sampling_params import SamplingParams, draw_uniform, unpack_bitmask
from backends.source import resolve_source
from gateway.engine.sampling import Sampler
from gateway.grammar import GrammarError, GrammarSpec, compiler_for, json_schema_spec
from gateway.templating import load_tokenizer
from tests.test_scheduler_fake import GREEDY, VOCAB, Run, tokens

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_source("packaged:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return compiler_for(tokenizer, tokenizer.vocab_size)


# ---- grammars on the embedded model's vocabulary -----------------------------------------------

def test_schema_mask_walks_a_valid_document(tokenizer, compiler):
    constraint = compiler.constraint(json_schema_spec(PERSON))
    ids = tokenizer.encode(json.dumps({"name": "Ada", "age": 36}))
    for token in ids:
        allowed = unpack_bitmask(constraint.next_mask(), tokenizer.vocab_size)
        assert allowed[token], tokenizer.decode([token])
        assert 0 < allowed.sum() < tokenizer.vocab_size
        assert constraint.accept(token)
    assert constraint.num_accepted == len(ids)
    end = unpack_bitmask(constraint.next_mask(), tokenizer.vocab_size)
    assert np.flatnonzero(end).tolist() == sorted(tokenizer.eos_token_ids)   # only the end of turn
    assert constraint.accept(min(tokenizer.eos_token_ids)) and constraint.finished


def test_rejected_token_leaves_the_state(tokenizer, compiler):
    constraint = compiler.constraint(GrammarSpec("json_object"))
    brace = tokenizer.encode("{")[0]
    word = tokenizer.encode("hello")[0]
    assert not unpack_bitmask(constraint.next_mask(), tokenizer.vocab_size)[word]
    assert not constraint.accept(word) and constraint.num_accepted == 0
    assert constraint.accept(brace) and constraint.num_accepted == 1


def test_compiled_once_per_schema(compiler):
    spec = json_schema_spec({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert compiler.compile(spec) is compiler.compile(GrammarSpec(spec.kind, spec.source))


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "object", "properties": 5},
                                    {"type": "string", "pattern": "(("},
                                    {"type": "integer", "minimum": 5, "maximum": 1}])
def test_invalid_schema_is_a_grammar_error(compiler, schema):
    with pytest.raises(GrammarError) as info:
        compiler.compile(json_schema_spec(schema))
    assert "/" not in str(info.value).split(":")[0]     # the library's source path is stripped


# ---- the bitmask in both samplers ---------------------------------------------------------------

def random_bitmask(rng, vocab: int, density: float) -> np.ndarray:
    allowed = rng.random(vocab) < density
    allowed[rng.integers(vocab)] = True
    words = np.zeros((vocab + 31) // 32 * 32, dtype=bool)
    words[:vocab] = allowed
    return np.packbits(words, bitorder="little").view("<i4").copy()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(temperature=0.7, top_p=0.9, top_k=20),
                                    SamplingParams(temperature=0, logprobs=True, top_logprobs=3),
                                    SamplingParams(temperature=1.0, presence_penalty=0.5, logit_bias={3: 9.0})])
def test_masked_draw_matches_the_reference(params):
    vocab, rows = 1000, 6
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    masks = [random_bitmask(rng, vocab, d) if i % 3 else None
             for i, d in enumerate([0.01, 0.3, 0.9, 0.05, 0.5, 0.002])]
    specs = [SampleSpec(params, draw_uniform(5, i), (1, 2, 3), m) for i, m in enumerate(masks)]
    got = TorchSampler(vocab, torch.device("cpu")).sample(torch.from_numpy(logits), specs)
    for i, spec in enumerate(specs):
        ref = Sampler(params, vocab)
        for token in (1, 2, 3):
            ref.observe(token)
        want = ref.sample(logits[i], spec.uniform, spec.allowed)
        assert got[i].token_id == want.token_id
        if spec.allowed is not None:
            assert unpack_bitmask(spec.allowed, vocab)[got[i].token_id]
        if params.logprobs:
            assert got[i].logprob == pytest.approx(want.logprob, abs=1e-4)
            # (tokens the mask removed all have logprob -inf: their order among themselves is free)
            assert [t for t, lp in got[i].top_logprobs if lp > -np.inf] == \
                [t for t, lp in want.top_logprobs if lp > -np.inf]


# ---- the scheduler keeps a grammar's state exact -----------------------------------------------

class StepGrammar:
    """A toy grammar over the fake vocabulary: the next token must be in the residue class
    (last + 1) mod 4. Same interface as gateway.grammar.Constraint."""

    def __init__(self):
        self.kept: list[int] = []

    @property
    def num_accepted(self) -> int:
        return len(self.kept)

    def _allowed(self) -> np.ndarray:
        want = (self.kept[-1] + 1) % 4 if self.kept else 0
        return np.arange(VOCAB) % 4 == want

    def next_mask(self) -> np.ndarray:
        return np.packbits(self._allowed(), bitorder="little").view("<i4").copy()

    def accept(self, token: int) -> bool:
        if not self._allowed()[token]:
            return False
        self.kept.append(token)
        return True

    finished = False


def obeys(output: list[int]) -> bool:
    return all(t % 4 == (output[i - 1] + 1) % 4 if i else t % 4 == 0 for i, t in enumerate(output))


def constrained_alone(prompt, max_new, params):
    run = Run(chunk=4096)
    request = run.request(prompt, max_new=max_new, params=params)
    request.constraint = StepGrammar()
    run.run({0: [request]})
    return run.result(request)


@pytest.mark.parametrize("radix", [True, False])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_constrained_requests_under_batching_and_preemption(radix, overlap, monkeypatch):
    monkeypatch.setattr("tests.test_scheduler_fake.OVERLAP", [overlap])  # overlap steps as a GPU does
    shared = tokens(40, 8)
    specs = [(shared + tokens(41, 4), 24, GREEDY, True), (shared + tokens(42, 8), 20, SamplingParams(seed=5), True),
             (tokens(43, 9), 30, GREEDY, False), (shared + tokens(44, 12), 16, SamplingParams(seed=9), True),
             (tokens(45, 20), 14, SamplingParams(temperature=0.7, seed=2), True)]
    run = Run(num_pages=20, context=80, max_running=4, chunk=32, radix=radix)
    assert run.backend.overlap == overlap
    requests = []
    for prompt, max_new, params, constrained in specs:
        request = run.request(prompt, max_new=max_new, params=params)
        request.constraint = StepGrammar() if constrained else None
        requests.append(request)
    run.run({0: requests[:3], 2: requests[3:]})
    assert run.sched.stats.preemptions > 0
    for request, (prompt, max_new, params, constrained) in zip(requests, specs, strict=True):
        output, reason = run.result(request)
        assert reason == "length" and len(output) == max_new
        if constrained:
            assert obeys(output), output
            assert request.constraint.kept == output      # advanced on exactly the kept tokens
            assert (output, reason) == constrained_alone(prompt, max_new, params)
