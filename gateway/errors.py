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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.type, error.param, error.code),
                            status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal server error: {error}", "server_error"), status_code=500)


def engine_unavailable(what: str, error: Exception) -> APIError:
    """503 for a request whose engine process is gone (crashed or stopped)."""
    return APIError(503, f"{what} is unavailable: {error}.", type="server_error", code="engine_unavailable")
