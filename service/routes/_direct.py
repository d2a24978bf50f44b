"""`DirectRoute`: a route documented like any other, served without FastAPI's per-request
machinery, for the hot path; `DirectRoutes` serves such routes ahead of the router.

FastAPI answers a request by resolving the endpoint's dependencies, reading and validating the
body against its signature and validating the response; Starlette then routes it through its
exception middleware, the router and two exit stacks. Measured on the unfold route of a 2-core
machine (single-vector requests), that machinery cost more CPU than reading the body, queueing
the rows and rendering the answer together.

A `DirectRoute` endpoint is called as ``await endpoint(request, **path_params)`` and returns a
`Response` itself: it reads the app's state from ``request.app.state``, parses its own body and
raises `UnfoldError`s. Its signature, `response_model`, `responses` and `openapi_extra` still
document it in the OpenAPI schema exactly as for an `APIRoute`.

`DirectRoutes`, the innermost middleware, answers the requests that fully match a direct route
itself (every outer middleware, metrics, API keys, body limit and CORS, still sees them) and
renders exceptions with the app's own exception handlers, as the router would; every other
request (including a wrong method on a direct route's path: 405) goes to the router.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match


class DirectRoute(APIRoute):
    """An `APIRoute` whose endpoint takes ``(request, **path_params)`` and returns a Response."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(request, **request.path_params)

        return handle


class DirectRoutes:
    """Pure ASGI middleware answering the requests of `routes` (`DirectRoute`s) directly."""

    def __init__(self, app, routes: list[DirectRoute], exception_handlers: dict):
        self.app = app
        self.routes = routes
        self.handlers = exception_handlers  # exception class -> handler(request, exc)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    return await self.serve(route, scope, receive, send)
        await self.app(scope, receive, send)

    async def serve(self, route: DirectRoute, scope, receive, send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request, **scope["path_params"])
        except Exception as error:
            handler = self.handler(error)
            if handler is None:
                raise  # as the router would: ServerErrorMiddleware answers 500
            response = await handler(request, error)
        await response(scope, receive, send)

    def handler(self, error: Exception):
        for cls in type(error).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
