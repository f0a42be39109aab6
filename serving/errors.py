"""Every failure becomes an OpenAI-style `{"error": {...}}` body with a 4xx/5xx status, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.policy import UnknownPolicy
from serving.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 429 or 503


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code="not_found")


def error_response(status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The message and param of the first of pydantic's validation errors."""
    first = errors[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(UnknownPolicy)
    async def _unknown_policy(request: Request, exc: UnknownPolicy) -> JSONResponse:
        return error_response(404, str(exc), "not_found_error", exc.param, "not_found")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_errors(exc.errors())
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; it has been logged", "server_error")
