"""Optional API keys: `Authorization: Bearer <key>` on every route but the health probes.

Off unless `Settings.api_keys` (env ``UNFOLD_API_KEYS``, comma-separated) is non-empty. Then
every request except `PUBLIC_PATHS` (the health probes of both APIs) needs one of the keys,
else 401 `unauthorized` with ``WWW-Authenticate: Bearer``. The OpenAPI document and the
docs pages are protected too (they are routes like any other; a deployment that wants them
public can put them behind its own proxy). CORS preflight requests (OPTIONS with
`Access-Control-Request-Method`) never carry credentials: the CORS middleware, outside this
one, answers them first.

Keys are compared in constant time (`hmac.compare_digest` over each configured key).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from .errors import error_response
from .responses import JSONResponse

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def client_of(request: Request) -> str:
    """Who sent `request`, for fair shares: its API key (a digest) when keys are on, else its
    address."""
    if request.app.state.settings.api_keys:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


def unauthorized(path: str, message: str) -> JSONResponse:
    return error_response(
        path, "unauthorized", message, 401, headers={"WWW-Authenticate": "Bearer"}
    )


class APIKeyMiddleware:
    """Pure ASGI middleware requiring a bearer token among `keys` (a non-empty list)."""

    def __init__(self, app, keys: list[str]):
        if not keys:
            raise ValueError("APIKeyMiddleware needs at least one key")
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        token = _bearer_token(scope)
        if token is None:
            response = unauthorized(
                scope["path"],
                "this service needs an API key: send the header 'Authorization: Bearer <key>'",
            )
        elif not self.valid(token):
            response = unauthorized(scope["path"], "the API key is not valid")
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)

    def valid(self, token: bytes) -> bool:
        # Compare with every key (no early exit) so timing reveals neither which nor how much.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)


def _bearer_token(scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None
