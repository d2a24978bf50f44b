"""Request body size limits, as a pure ASGI middleware: unlike Starlette's own
(`RequestBodyLimitMiddleware`, whose 413 says "Content Too Large"), it answers in the service's
error format, with a message that says what to change. Dictionary uploads have their own limit
(`UNFOLD_MAX_DICTIONARY_BYTES`), every other body `UNFOLD_MAX_BODY_BYTES`.

A request whose `Content-Length` exceeds the limit is refused with 413 before its body is read.
A body without a length (chunked) is counted while it streams in: once it passes the limit the
application's reads fail and, whatever the application then does, the client gets the 413.
"""

from __future__ import annotations

from .errors import error_response
from .responses import JSONResponse


class BodyTooLarge(Exception):
    """Raised into the application's body reads once the streamed body passes the limit."""


REGISTRATION = ("POST", "/v1/dictionaries")
JOB = ("POST", "/v1/jobs")
BODY_ADVICE = (
    "send fewer rows per request, or a binary format (application/x-npy) instead of JSON; "
    "the limit is UNFOLD_MAX_BODY_BYTES"
)
JOB_ADVICE = (
    'split the activations into several jobs, give a server-side path ({"input": PATH} '
    "under UNFOLD_JOB_INPUT_DIRS), or raise the server's UNFOLD_MAX_JOB_INPUT_BYTES"
)
UPLOAD_ADVICE = (
    "send only the decoder (W_dec, b_dec: the client and `unfold dict add` do), or raise the "
    "server's UNFOLD_MAX_DICTIONARY_BYTES"
)


def too_large(path: str, limit: int, advice: str) -> JSONResponse:
    return error_response(
        path,
        "body_too_large",
        f"the request body exceeds the limit of {limit} bytes; {advice}",
        413,
        headers={"Connection": "close"},
    )


class BodyLimitMiddleware:
    """Refuse request bodies larger than `max_body_bytes` (dictionary registrations:
    `max_dictionary_bytes`) with 413 `body_too_large`."""

    def __init__(
        self, app, max_body_bytes: int, max_dictionary_bytes: int, max_job_input_bytes: int
    ):
        self.app = app
        self.body_limit = max_body_bytes
        self.upload_limit = max_dictionary_bytes
        self.job_limit = max_job_input_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = (scope["method"], scope["path"].rstrip("/"))
        if route == REGISTRATION:
            limit, advice = self.upload_limit, UPLOAD_ADVICE
        elif route == JOB:
            limit, advice = self.job_limit, JOB_ADVICE
        else:
            limit, advice = self.body_limit, BODY_ADVICE
        length = _content_length(scope)
        if length is not None and length > limit:
            return await too_large(scope["path"], limit, advice)(scope, receive, send)

        received = 0
        exceeded = False
        started = False

        async def counting_receive():
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:  # the app answered its failed read somehow: the 413 replaces it
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await too_large(scope["path"], limit, advice)(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
