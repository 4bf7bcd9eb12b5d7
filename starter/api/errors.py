"""Every error the API answers is JSON `{"error": {"code", "message"}}` with the right status.

FastAPI's own errors (validation, 404, 405, body too large) are rewritten into that shape;
anything unexpected is logged here, server-side, and answered with a generic message:
no stack trace, no exception text, nothing from the settings ever reaches a client.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

log = logging.getLogger("atelier.api")

# A client's own error codes for the plain HTTP statuses.
CODE_OF_STATUS = {
    400: "BadRequest",
    401: "Unauthorized",
    402: "InsufficientCredits",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    413: "ContentTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidRequest",
    429: "TooManyRequests",
    500: "Internal",
    503: "Unavailable",
}

MAX_MESSAGE_CHARS = 2000
MAX_VALIDATION_ERRORS = 10
# Temporal answers that mean "try again shortly", not "the server is broken".
_UNAVAILABLE = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}


class ApiError(Exception):
    """An answer the API chose to give: status, a stable code, a message for people."""

    def __init__(self, http_status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = http_status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def not_found(what: str = "not found") -> ApiError:
    return ApiError(404, "NotFound", what)


def error_response(http_status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    body = {"code": code, "message": message[:MAX_MESSAGE_CHARS], **extra}
    return JSONResponse({"error": body}, status_code=http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:MAX_VALIDATION_ERRORS]:
        # The location and the rule broken, never the input itself: it may be anything.
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    extra = len(exc.errors()) - MAX_VALIDATION_ERRORS
    if extra > 0:
        parts.append(f"... and {extra} more")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "InvalidRequest", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODE_OF_STATUS.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route"
        return error_response(exc.status_code, code, detail, headers=dict(exc.headers or {}))

    @app.exception_handler(RPCError)
    async def _temporal_error(request: Request, exc: RPCError) -> JSONResponse:
        if exc.status in _UNAVAILABLE:
            log.warning("Temporal unavailable on %s %s: %s", request.method, request.url.path, exc.status.name)
            return error_response(503, "Unavailable", "the orchestration service is unavailable; retry shortly",
                                  headers={"Retry-After": "1"})
        return _internal(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)


def _internal(request: Request, exc: BaseException) -> JSONResponse:
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal", f"internal error (incident {incident}); it has been logged")
