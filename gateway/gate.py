"""The plain-ASGI gate in front of the routes: who may call (auth.py), how often (rate_limits.py) and
how much (input_limits.py), decided from the headers and the raw body before FastAPI parses anything.

Order: the key (401/403) -> the key's limits (429) -> the body, read here up to
server.limits.max_body_bytes (413; a Content-Length over it is refused before a byte is read) with
its JSON shape measured as it arrives -> the JSON parsed once (in a worker thread when large) and
the per-field limits checked (400). The parsed body travels to the route in the scope
(ParsedBodyRoute), and the body bytes are replayed to the app as they were received.

A generation request carries a Ticket: the route hands it its delta stream (`track`), which gets
the idle timeout, and once the response has ended, however it ended, the key's stream slot is
given back and the tokens the stream used are charged.
"""
from __future__ import annotations

import asyncio
import inspect
import typing

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import Access, KeyRing, access_of
from gateway.config import RequestLimits
from gateway.errors import APIError, error_response
from gateway.idle_timeout import IdleTimeoutStream
from gateway.input_limits import GENERATION_PATHS, PARSED_PATHS, JsonShape, body_too_large, check_fields, parse_body
from gateway.rate_limits import RateLimited, budgets_of
from gateway.services.base import DeltaStream

TICKET_KEY = "radixgate.ticket"
PARSED_KEY = "radixgate.parsed_body"
SCAN_PIECE_BYTES = 64 << 10       # numpy's per-call cost is paid per piece this large, not per receive
INLINE_PARSE_BYTES = 256 << 10    # parsing a body this small costs less than the hop to a worker thread


class Ticket:
    """One admitted generation request: its idle timeout and, once the route has one, its delta stream."""

    def __init__(self, idle_timeout_s: float):
        self.idle_timeout_s = idle_timeout_s
        self.stream: DeltaStream | None = None

    def tokens_used(self) -> int:
        """Prompt + completion tokens as the stream's usage says; a stream cut short is charged at least
        its prompt where the model counted it up front (local models)."""
        if self.stream is None:
            return 0
        usage = self.stream.usage
        return max(usage.prompt_tokens, self.stream.prompt_tokens or 0) + usage.completion_tokens


def track(request: Request, stream: DeltaStream) -> DeltaStream:
    """The stream a generation route should read: `stream` with the idle timeout, known to the gate."""
    ticket: Ticket = request.scope[TICKET_KEY]
    ticket.stream = IdleTimeoutStream(stream, ticket.idle_timeout_s)
    return ticket.stream


class Gate:
    """Plain ASGI (no re-streaming of responses); open paths pass untouched."""

    def __init__(self, app, keys: KeyRing, limits: RequestLimits):
        self.app, self.keys, self.limits = app, keys, limits
        self.budgets = budgets_of(caller for _, caller in keys.entries)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or access_of(scope["path"]) is Access.OPEN:
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        parsed = scope["method"] == "POST" and path in PARSED_PATHS
        generation = parsed and path in GENERATION_PATHS
        budget = None
        try:
            caller = self.keys.authorize(path, headers)
            budget = self.budgets.get(caller.name) if generation else None
            if budget is not None:
                budget.admit()
        except RateLimited as limited:
            return await _refuse(scope, receive, send, APIError(
                429, str(limited), type="rate_limit_error", code="rate_limit_exceeded",
                headers={"Retry-After": limited.retry_after_header}))
        except APIError as error:
            return await _refuse(scope, receive, send, error)
        ticket = Ticket(self.limits.stream_idle_timeout_s)
        try:
            try:
                shape = JsonShape() if parsed else None
                body = await self._read_body(receive, headers.get("content-length"), shape)
                if body is None:
                    return                                     # the client left before sending it all
                if parsed and body:
                    scope[PARSED_KEY] = await self._examine(path, body)
            except APIError as error:
                return await _refuse(scope, receive, send, error)
            if generation:
                scope[TICKET_KEY] = ticket
            await self.app(scope, _replay(body, receive), send)
        finally:
            if budget is not None:
                budget.finish(ticket.tokens_used())

    async def _read_body(self, receive, declared: str | None, shape: JsonShape | None) -> bytes | None:
        limit = self.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit, int(declared))
        chunks, size = [], 0
        unscanned, unscanned_bytes = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                chunks.append(chunk)
                unscanned.append(chunk)
                unscanned_bytes += len(chunk)
            more = message.get("more_body", False)
            if shape is not None and unscanned and (unscanned_bytes >= SCAN_PIECE_BYTES or not more):
                shape.feed(b"".join(unscanned))
                shape.check(self.limits)                   # a body too deep or too big is refused mid-upload
                unscanned, unscanned_bytes = [], 0
            if not more:
                return b"".join(chunks)

    async def _examine(self, path: str, body: bytes):
        if len(body) <= INLINE_PARSE_BYTES:
            return _parse_and_check(path, body, self.limits)
        return await asyncio.to_thread(_parse_and_check, path, body, self.limits)


def _parse_and_check(path: str, body: bytes, limits: RequestLimits):
    data = parse_body(body)
    check_fields(path, data, limits)
    return data


def _replay(body: bytes, receive):
    """The app's receive: the body as one message, then the client's own messages (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _refuse(scope, receive, send, error: APIError) -> None:
    response = error_response(Request(scope), error.status, error.message, error.type, error.param, error.code,
                              error.headers)
    await response(scope, receive, send)


class _ParsedBodyRequest(Request):
    async def json(self):
        if PARSED_KEY in self.scope:
            return self.scope[PARSED_KEY]
        return await super().json()


class ParsedBodyRoute(APIRoute):
    """A route whose handler reads the JSON the gate parsed instead of parsing the body again.

    An endpoint of the shape `(body: SomeModel, request: Request)` given a parsed body is called
    directly: the model validates the body (its errors worded as FastAPI words them, so the same 400
    comes back) and a dict it returns goes out as JSON. FastAPI's generic handler (dependency
    solving, per-request telemetry, response serialisation) was about a tenth of the gateway's own
    CPU per relayed 1-token request (docs/routing.md). Anything else takes FastAPI's handler."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        direct = _direct_call(self.endpoint)

        async def reuse_parsed_body(request: Request):
            if direct is not None and PARSED_KEY in request.scope:
                return await direct(request)
            return await handler(_ParsedBodyRequest(request.scope, request.receive))
        return reuse_parsed_body


def _direct_call(endpoint):
    """For `async def endpoint(body: SomeModel, request: Request)` (either order): a call of it on a
    request whose parsed body is in the scope; None for any other shape."""
    if not inspect.iscoroutinefunction(endpoint):
        return None
    try:
        hints = typing.get_type_hints(endpoint)
    except (NameError, TypeError):          # annotations it cannot resolve: FastAPI's handler copes
        return None
    names = list(inspect.signature(endpoint).parameters)
    models = [n for n in names if isinstance(hints.get(n), type) and issubclass(hints[n], BaseModel)]
    requests = [n for n in names if hints.get(n) is Request]
    if len(models) != 1 or len(models) + len(requests) != len(names):
        return None
    model, body_name = hints[models[0]], models[0]

    async def call(request: Request) -> Response:
        try:
            body = model.model_validate(request.scope[PARSED_KEY])
        except ValidationError as error:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                          for e in error.errors(include_url=False)]) from None
        result = await endpoint(**{body_name: body}, **{name: request for name in requests})
        return result if isinstance(result, Response) else JSONResponse(result)
    return call
