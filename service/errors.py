"""One exception hierarchy, rendered by one handler as ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from starlette.convertors import PathConvertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

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


class MethodNotAllowed(UnfoldError):
    """The path exists, but not with this method; `Allow` lists the methods it has."""

    status_code = 405
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allow: list[str]):
        super().__init__(f"{method} is not allowed on {path}; use {', '.join(allow)}")
        self.headers = {"Allow": ", ".join(allow)}


class Forbidden(UnfoldError):
    """The request asks for something this server does not allow (a path outside its list)."""

    status_code = 403
    code = "forbidden"


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


def allowed_methods(routes, scope) -> list[str]:
    """Every method that one of the app's `routes` (those of included routers too) serves at the
    request's path, sorted. Catch-all routes (a ``{...:path}`` parameter: the OIP's 404 for
    unknown paths) do not count."""
    methods: set[str] = set()
    for route in iter_route_contexts(routes):
        convertors = getattr(route, "param_convertors", {}).values()
        if not getattr(route, "methods", None) or any(
            isinstance(convertor, PathConvertor) for convertor in convertors
        ):
            continue
        if route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
"""Codes of the framework's own errors (`StarletteHTTPException`); other statuses, should the
framework raise one, are named after their reason phrase (e.g. 415 `unsupported_media_type`)."""


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
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status, message, headers = error.status_code, str(error.detail), error.headers
        if status == 405:  # the router's Allow names one route's methods; list the path's
            allow = allowed_methods(request.app.routes, request.scope)
            if allow:
                error = MethodNotAllowed(request.method, request.url.path, allow)
                message, headers = error.message, error.headers
        code = HTTP_ERROR_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
        return error_response(request.url.path, code, message, status, headers)
