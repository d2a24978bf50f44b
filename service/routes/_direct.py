"""`DirectRoute`: a route documented like any other, served without FastAPI's per-request
machinery, for the hot path.

FastAPI answers a request by resolving the endpoint's dependencies, reading and validating the
body against its signature and validating the response; measured on the unfold route of a
2-core machine that machinery cost more CPU per single-vector request than reading the body,
queueing the rows and rendering the answer together. A `DirectRoute` endpoint is called as
``await endpoint(request, **path_params)`` and returns a `Response` itself: it reads the app's
state from ``request.app.state``, parses its own body and raises `UnfoldError`s (rendered by
the app's handler as usual). Its signature, `response_model`, `responses` and `openapi_extra`
still document it in the OpenAPI schema exactly as for an `APIRoute`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    """An `APIRoute` whose endpoint takes ``(request, **path_params)`` and returns a Response."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(request, **request.path_params)

        return handle
