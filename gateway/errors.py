"""OpenAI error objects: every 4xx and 5xx leaves the server as {"error": {message, type, param, code}}."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error the client should see, with the HTTP status and OpenAI fields to report."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem in a request body, phrased for a person, and the param it concerns."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {first.get('msg')}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic reports union members as extra path parts (e.g. "str", "list[...]"): keep real keys
    loc = [part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return message, param


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 501: "api_error", 503: "overloaded_error"}
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def _respond(request: Request, status: int, message: str, type: str, param: str | None = None,
             code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The error object of the API the request was sent to: Anthropic's for /v1/messages, else OpenAI's."""
    if request.url.path in ANTHROPIC_PATHS:
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = error_body(message, type, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


error_response = _respond        # for ASGI middleware outside the handlers (gateway/shutdown.py)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return _respond(request, error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return _respond(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _respond(request, error.status_code, str(error.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return _respond(request, 500, f"internal server error: {error}", "server_error")


def engine_unavailable(what: str, error: Exception) -> APIError:
    """503 for a request whose engine process is gone (crashed or stopped)."""
    return APIError(503, f"{what} is unavailable: {error}.", type="server_error", code="engine_unavailable")
