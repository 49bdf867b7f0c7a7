"""/openapi.json as the server really answers: every status a route returns, each with its body.

FastAPI documents request bodies from their pydantic models but, left alone, promises a 422 for bad
input (we answer 400 with the API's own error object), no other error, JSON where a route streams SSE
or Prometheus text. The answers are built as plain dicts on the hot path (gateway/responses.py), so
the models below only describe them; tests/test_schema_fuzz.py checks real answers against them.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.errors import ANTHROPIC_PATHS

# ---- error bodies ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object; every 4xx and 5xx of the OpenAI surfaces and the admin routes."""

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error object (/v1/messages)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# ---- answers -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: dict[str, int]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[TextChoice]
    usage: CompletionUsage


class ResponseObject(BaseModel):
    """The Responses API's response (stateless: never stored)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: dict[str, int]


class InputTokens(BaseModel):
    """POST /v1/messages/count_tokens: the prompt's tokens as the model counts them."""
    input_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    model_info: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    """Per model: backend, device, KV page accounting (free + cached + held == total) and cache stats."""

    status: Literal["ok", "unavailable", "draining"]
    models: dict[str, dict[str, Any]]
    radix_cache_stats: dict[str, Any]
    attention_sparsity_ratio: float
    remote_models: dict[str, dict[str, Any]]


class CacheCleared(BaseModel):
    status: Literal["ok"]
    pages_freed: dict[str, int]


# ---- which route answers what --------------------------------------------------------------------

# With `stream: true`: server-sent events, each `data` a JSON chunk of the API's stream (`[DONE]` last for
# the OpenAI surfaces); the Responses and Anthropic streams name their events.
SSE = {"schema": {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}
TEXT = {"schema": {"type": "string"}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERRORS = {
    400: "Invalid request: a missing or bad field, a prompt longer than the context, bad JSON",
    401: "Missing or wrong API key (only when server.api_keys is set)",
    404: "No such model",
    413: "The request is larger than the server admits",
    429: "Too many requests waiting or sent (Retry-After when known)",
    502: "A remote model or worker failed",
    503: "An engine is unavailable, or the server is shutting down (Retry-After)",
    504: "A remote model or worker did not answer in time",
}
GENERATE = {"answer": {"application/json": None, "text/event-stream": SSE}, "errors": list(ERRORS)}
ROUTES: dict[tuple[str, str], dict] = {
    ("post", "/v1/chat/completions"): {**GENERATE, "model": ChatCompletion},
    ("post", "/v1/completions"): {**GENERATE, "model": TextCompletion},
    ("post", "/v1/responses"): {**GENERATE, "model": ResponseObject},
    ("post", "/v1/messages"): {**GENERATE, "model": AnthropicMessage},
    ("post", "/v1/messages/count_tokens"): {"model": InputTokens, "errors": [400, 401, 404, 413, 502, 503, 504]},
    ("get", "/v1/models"): {"model": ModelList, "errors": [401, 503]},
    ("get", "/v1/models/{name}"): {"model": ModelCard, "errors": [401, 404, 503]},
    ("post", "/clear_radix_cache"): {"model": CacheCleared, "errors": [401, 503]},
    ("get", "/debug/radix_stats"): {"answer": {"application/json": {"schema": {"type": "object"}}}, "errors": [503]},
    ("get", "/metrics"): {"answer": {"text/plain": TEXT}, "errors": []},
    ("get", "/health"): {"model": Health, "errors": []},
}


def _ref(model: type[BaseModel], schemas: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _responses(method: str, path: str, spec: dict, schemas: dict) -> dict:
    answer = {kind: (content if content is not None else {"schema": _ref(spec["model"], schemas)})
              for kind, content in spec.get("answer", {"application/json": None}).items()}
    out: dict[Any, dict] = {"200": {"description": "Success", "content": answer}}
    if path == "/health":       # unhealthy or draining: the same body, status 503
        out["503"] = {"description": "An engine is unavailable, or the server is draining", "content": answer}
    error_model = AnthropicErrorResponse if path in ANTHROPIC_PATHS else ErrorResponse
    for status in spec["errors"]:
        out[str(status)] = {"description": ERRORS[status], "content": {"application/json": {
            "schema": _ref(error_model, schemas)}}}
        if status in (429, 503):
            out[str(status)]["headers"] = RETRY_AFTER
    return out


def install(app: FastAPI) -> None:
    """Make app.openapi() describe every route as it answers (built once, on the first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, methods in doc["paths"].items():
                for method, operation in methods.items():
                    # a route missing from ROUTES keeps FastAPI's guess; tests/test_schema_fuzz.py fails on it
                    if (method, path) in ROUTES:
                        operation["responses"] = _responses(method, path, ROUTES[(method, path)], schemas)
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
