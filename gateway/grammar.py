"""Constrained decoding: grammars (JSON schema, any JSON, tool-call tags) compiled with xgrammar, and
the per-request matcher that turns a grammar's state into a bitmask of allowed next tokens.

Why xgrammar: on this vocabulary its mask costs 3-7 us per token against llguidance's 18-30 us
(docs/structured.md, bench/grammar_libs.py); the mask is paid every step, the compile once per schema.

The gateway compiles a request's grammar in a worker thread to validate it (an invalid schema is a
400); the engine process compiles it again from the same `GrammarSpec` (a compiled grammar is not
sent down the pipe). Both keep compiled grammars in an LRU, so a schema compiles once per process.
Nothing here imports torch: the bitmask is plain NumPy (int32 words, token t is bit t % 32 of word
t // 32), built on the host and applied on the sampler's device.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass

import numpy as np

GRAMMAR_CACHE_SIZE = 256        # compiled grammars kept per process


class GrammarError(ValueError):
    """A schema or grammar the library rejects (a client error: 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; plain data, it crosses to the engine process.

    kind: "json_object" (any JSON object), "json_schema" (source: the schema as JSON text) or
    "structural_tag" (source: an xgrammar structural tag as JSON text, used for tool calls).
    """

    kind: str
    source: str = ""

    def __post_init__(self):
        assert self.kind in ("json_object", "json_schema", "structural_tag"), self.kind


def _clean(error: Exception) -> str:
    # xgrammar's messages start with "[hh:mm:ss] /path/file.cc:line: "; the client needs the rest
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and keeps them (thread-safe: xgrammar's compiler is)."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        # The stop ids are the engine's (end of turn), so a finished grammar ends the request.
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.compile = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    def _compile(self, spec: GrammarSpec):
        try:
            if spec.kind == "json_object":
                # a JSON object (not any JSON value): what response_format json_object promises
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "json_schema":
                # compact separators (", " and ": "), no free whitespace: a small model cannot
                # wander into endless newlines, and the output stays valid JSON
                return self._compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
            return self._compiler.compile_structural_tag(spec.source)
        except Exception as error:   # the library raises RuntimeError / its own types on a bad schema
            raise GrammarError(_clean(error)) from None

    def constraint(self, spec: GrammarSpec) -> Constraint:
        return Constraint(self._xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)


_compilers: dict[int, GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, vocab_size: int) -> GrammarCompiler:
    """The process's compiler for a ChatTokenizer (built once: preparing the vocabulary takes ~0.1 s)."""
    key = id(tokenizer)
    with _compilers_lock:
        if key not in _compilers:
            _compilers[key] = GrammarCompiler(tokenizer.hf, vocab_size, sorted(tokenizer.eos_token_ids))
        return _compilers[key]


class Constraint:
    """One request's position in its grammar. It advances only on tokens the request keeps, so its
    state always equals the request's output ids (preemption and the radix cache keep those)."""

    def __init__(self, matcher, vocab_size: int):
        import torch  # xgrammar fills torch tensors; the CPU tensor is viewed as NumPy, no copy
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._buffer = torch.empty((1, self._words), dtype=torch.int32)
        self.num_accepted = 0

    def next_mask(self) -> np.ndarray:
        """A fresh int32 bitmask [ceil(vocab / 32)] of the tokens the grammar allows next."""
        self._matcher.fill_next_token_bitmask(self._buffer, 0)
        return self._buffer.numpy()[0].copy()

    def accept(self, token_id: int) -> bool:
        """Advance by one kept token; False if the grammar does not allow it (the state is unchanged)."""
        ok = bool(self._matcher.accept_token(token_id))
        self.num_accepted += ok
        return ok

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: nothing may follow."""
        return bool(self._matcher.is_terminated())


def json_schema_spec(schema: dict) -> GrammarSpec:
    """The spec for a JSON schema given as an object (keys kept in the client's order)."""
    if not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    return GrammarSpec("json_schema", json.dumps(schema))
