"""Every route fuzzed against the schema the server publishes (/openapi.json), with schemathesis.

A real server with the embedded model; its context is short (64 tokens) and its input limits small
(4 prompts or messages, n <= 2, max_tokens <= 16), so that any request the fuzzer makes valid finishes
in about a second. Checked on every answer: no 5xx, a status the schema
lists, a body and content type that match it, and bodies that break the schema refused with a 4xx.
Afterwards the server still answers a normal chat correctly, and no KV page is left held.
"""
from __future__ import annotations

import os

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.gate import ParsedBodyRoute, _direct_call
from gateway.input_limits import GENERATION_PATHS, PARSED_PATHS
from gateway.openapi import ROUTES
from tests.conftest import MODEL, model_config, start_server

# The same examples on every run (a verdict belongs to the code, not to the draw). To explore, draw
# fresh ones: FUZZ_RANDOM=1 FUZZ_EXAMPLES=300 pytest tests/test_schema_fuzz.py
EXAMPLES_PER_ROUTE = int(os.environ.get("FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("FUZZ_RANDOM", "") != "1"
REQUEST_TIMEOUT_S = 60          # a hang fails the run instead of stalling it
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzzed_server():
    config = model_config(context_length=64, kv_cache={"page_size": 16, "num_pages": 128})
    # small requests only (past these limits: a 400 naming the limit), so each valid one is quick
    config["server"] = {"limits": {"max_messages": 4, "max_n": 2, "max_tokens": 16}}
    server = start_server(config)
    yield server
    assert server.engine.fatal_error is None, server.engine.fatal_error
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")

    @schema.hook
    def map_body(context, body):
        # A random model name is a 404 before anything else is read: name the served model, so the
        # fuzz reaches validation, templating and the engine. (Only a non-empty string is replaced:
        # an invalid `model` stays invalid.)
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
            body["model"] = MODEL
        return body

    return schema


# One test per route and mode (schemathesis's own pytest plugin does not run under pytest 9: it sets
# Function._nodeid, which pytest 9 removed). Positive: bodies the schema allows; negative: bodies it forbids.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), sorted(ROUTES), ids=lambda v: v)
def test_every_route_answers_as_its_schema_says(api_schema, method, path, mode):
    operation = api_schema[path][method.upper()]
    if mode is GenerationMode.NEGATIVE and not operation.body:
        pytest.skip("no body: nothing in this request can break its schema (a path name is any string)")

    @given(case=operation.as_strategy(generation_mode=mode, hooks=api_schema.hooks))
    # no shrinking: a failure is reported as found (shrinking past timeouts would take many minutes)
    @settings(max_examples=EXAMPLES_PER_ROUTE, derandomize=DERANDOMIZE, database=None, deadline=None,
              suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    def fuzz(case):
        case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    fuzz()


def test_every_route_is_described(fuzzed_server):
    doc = httpx.get(f"{fuzzed_server.url}/openapi.json").json()
    operations = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert operations == set(ROUTES), operations ^ set(ROUTES)
    for (method, path), operation in ((k, doc["paths"][k[1]][k[0]]) for k in operations):
        assert "422" not in operation["responses"], f"{method} {path}: validation errors answer 400"
        if method == "post" and path.startswith("/v1/") and path != "/v1/models":
            assert "400" in operation["responses"] and "requestBody" in operation, (method, path)
            if path in GENERATION_PATHS:            # (a token count answers JSON only)
                assert "text/event-stream" in operation["responses"]["200"]["content"], (method, path)


def test_generation_routes_take_the_direct_call(fuzzed_server):
    """The fuzz above went through ParsedBodyRoute's direct call on these routes, not FastAPI's handler."""
    routes = [r for r in fuzzed_server.server.config.app.routes if isinstance(r, ParsedBodyRoute)]
    assert {r.path for r in routes if _direct_call(r.endpoint) is not None} >= set(PARSED_PATHS)


def test_the_server_answers_normally_after_the_fuzz(fuzzed_server):
    fuzzed_server.wait_idle()
    client = openai.OpenAI(base_url=fuzzed_server.base_url, api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0
    snap = fuzzed_server.engine.call_sync("snapshot")
    assert snap["kv_pages_held_by_requests"] == 0 and snap["radix_cache_stats"]["protected_pages"] == 0
    fuzzed_server.engine.call_sync("check")
