"""One exception hierarchy, rendered by one handler as ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .responses import JSONResponse


class UnfoldError(Exception):
    """An error a client can act on. `code` is machine-readable; `message` says what to change."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(UnfoldError):
    status_code = 404
    code = "not_found"


class Conflict(UnfoldError):
    status_code = 409
    code = "conflict"


class InvalidInput(UnfoldError):
    """Well-formed request whose content cannot be used (shapes, values, parameters)."""

    status_code = 422
    code = "invalid_input"


class TooLarge(UnfoldError):
    """What the request asks for is larger than a limit of the server (body, memory, answer)."""

    status_code = 413
    code = "too_large"


class InsufficientStorage(UnfoldError):
    """The data directory's disk cannot hold what the request uploads."""

    status_code = 507
    code = "insufficient_storage"


class NotReady(UnfoldError):
    status_code = 503
    code = "not_ready"


class Overloaded(UnfoldError):
    """Too much work is queued for this dictionary and settings: retry after `retry_after` s."""

    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None):
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after)}


class Timeout(UnfoldError):
    """The request's solve did not finish within the configured time."""

    status_code = 504
    code = "timeout"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


OIP_PREFIX = "/v2"


def error_response(
    path: str, code: str, message: str, status_code: int, headers: dict | None = None
) -> JSONResponse:
    """An error for a request to `path`, in that API's format: the Open Inference Protocol's
    ``{"error": "<message>"}`` under /v2 (its clients need it), ours everywhere else."""
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        body: dict = {"error": message}
    else:
        body = error_body(code, message)
    return JSONResponse(body, status_code=status_code, headers=headers)


def describe_validation_errors(errors: list[dict]) -> str:
    """One line naming each invalid field and why."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnfoldError)
    async def _unfold_error(_: Request, error: UnfoldError) -> JSONResponse:
        return JSONResponse(
            error_body(error.code, error.message),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body("invalid_request", describe_validation_errors(error.errors())),
            status_code=422,
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, error: ClientDisconnect) -> Response:
        # The client left mid-request: nobody reads an answer, and it is not a server error.
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(error.detail)),
            status_code=error.status_code,
            headers=error.headers,
        )
