"""xgrammar vs llguidance on the embedded model's vocabulary: grammar compile time per JSON schema
and the per-token mask time along a valid document (fill the mask, accept the token).

    python -m bench.grammar_libs [--repeat 3]      # needs llguidance too (pip install llguidance==1.9.1)

Prints one table; the choice between the two libraries in docs/structured.md rests on it.
"""
from __future__ import annotations

import argparse
import json
import time

from backends.source import resolve_source
from gateway.templating import load_tokenizer

SCHEMAS = {
    "person": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": False},
               {"name": "Ada Lovelace", "age": 36}),
    "order": ({"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
            "price": {"type": "number"}}, "required": ["sku", "qty", "price"], "additionalProperties": False},
            "minItems": 1},
        "status": {"enum": ["new", "paid", "shipped"]}, "note": {"type": ["string", "null"]}},
        "required": ["id", "items", "status", "note"], "additionalProperties": False},
        {"id": "ABC-1234", "items": [{"sku": "pen", "qty": 2, "price": 1.5},
                                      {"sku": "ink", "qty": 1, "price": 7.25}], "status": "paid", "note": None}),
    "weather_tool": ({"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit", "days"], "additionalProperties": False},
        {"city": "Paris", "unit": "celsius", "days": 3}),
    # response_format json_object: any JSON object (None: the library's generic JSON grammar)
    "json_object": (None, {"title": "Notes", "tags": ["a", "b"], "done": False, "n": 3.5}),
}

TOKENIZER_S: dict[str, float] = {}      # one-off: the vocabulary's preparation per library


def bench_xgrammar(hf, vocab_size: int, schema: dict, doc_ids: list[int]) -> tuple[float, float]:
    import xgrammar as xgr
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
    TOKENIZER_S["xgrammar"] = time.perf_counter() - start
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = (compiler.compile_builtin_json_grammar() if schema is None else
                compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True))
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab_size)
    start = time.perf_counter()
    for token in doc_ids:
        matcher.fill_next_token_bitmask(mask, 0)
        assert matcher.accept_token(token), token
    return compile_s, (time.perf_counter() - start) / len(doc_ids)


def bench_llguidance(hf, vocab_size: int, schema: dict, doc_ids: list[int]) -> tuple[float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lln
    start = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    TOKENIZER_S["llguidance"] = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        {"type": "object"} if schema is None else schema,
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    matcher = llguidance.LLMatcher(tok, grammar)
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)
    lln.fill_next_token_bitmask(matcher, mask, 0)        # llguidance builds lazily: first mask counts
    compile_s = time.perf_counter() - start
    matcher.reset()
    start = time.perf_counter()
    for token in doc_ids:
        lln.fill_next_token_bitmask(matcher, mask, 0)
        assert matcher.consume_token(token), (token, matcher.get_error())
    return compile_s, (time.perf_counter() - start) / len(doc_ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct"))
    vocab = tokenizer.vocab_size
    print(f"vocabulary {vocab} tokens; best of {args.repeat}")
    print(f"{'schema':<14} {'xgr compile ms':>15} {'llg compile ms':>15} {'xgr mask us/tok':>16} "
          f"{'llg mask us/tok':>16}")
    for name, (schema, doc) in SCHEMAS.items():
        ids = tokenizer.encode(json.dumps(doc))
        ids = [t for t in ids if t != tokenizer.bos_token_id]
        xs = [bench_xgrammar(tokenizer.hf, vocab, schema, ids) for _ in range(args.repeat)]
        ls = [bench_llguidance(tokenizer.hf, vocab, schema, ids) for _ in range(args.repeat)]
        print(f"{name:<14} {min(x[0] for x in xs) * 1e3:>15.1f} {min(x[0] for x in ls) * 1e3:>15.1f} "
              f"{min(x[1] for x in xs) * 1e6:>16.1f} {min(x[1] for x in ls) * 1e6:>16.1f}")
    lengths = [len(tokenizer.encode(json.dumps(d[1]))) for d in SCHEMAS.values()]
    print(f"document lengths (tokens): {lengths}; vocabulary preparation (once per model): "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in TOKENIZER_S.items()))


if __name__ == "__main__":
    main()
