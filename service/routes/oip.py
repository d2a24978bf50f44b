"""The Open Inference Protocol (KServe v2 / Triton REST): health, metadata and inference.

Errors on these routes are this protocol's own JSON, ``{"error": "<message>"}``, not the v1
``{"error": {"code", "message"}}``: `OIPRoute` renders every `UnfoldError` raised under it
(422s of the v1 API become the protocol's 400), and a catch-all route answers unknown `/v2`
paths with a 404 in the same format. The wire format itself lives in `service/oip.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import oip, unfolding
from ..dependencies import RegistryDep, SettingsDep
from ..errors import (
    MethodNotAllowed,
    NotFound,
    NotReady,
    UnfoldError,
    allowed_methods,
    describe_validation_errors,
)
from ..parsing import OFFLOAD_BYTES, off_loop, parse_json
from ..responses import JSONResponse


def protocol_error(message: str, status_code: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


class OIPRoute(APIRoute):
    """A route whose errors are rendered as ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except UnfoldError as error:
                status = 400 if error.status_code == 422 else error.status_code
                return protocol_error(error.message, status, getattr(error, "headers", None))
            except RequestValidationError as error:
                return protocol_error(describe_validation_errors(error.errors()), 400)
            except StarletteHTTPException as error:
                return protocol_error(str(error.detail), error.status_code, error.headers)

        return handle


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=OIPRoute)

ERRORS = {
    400: {"description": 'Bad request: `{"error": "..."}`'},
    404: {"description": 'No such model (dictionary) or version: `{"error": "..."}`'},
}


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata() -> dict:
    return oip.server_metadata()


@router.get("/health/live", summary="Liveness (200 while the process answers)")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness: 200 once every stored dictionary is loaded, 503 before",
    responses={503: {"description": "Still loading dictionaries"}},
)
async def ready(registry: RegistryDep) -> dict:
    if not registry.ready.is_set():
        raise NotReady("dictionaries are still loading")
    return {"ready": True}


@router.get(
    "/models/{model}", summary="Model metadata: a dictionary's input and outputs", responses=ERRORS
)
@router.get(
    "/models/{model}/versions/{version}",
    summary="Model metadata of one version (the dictionary's content id)",
    responses=ERRORS,
)
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> dict:
    entry = registry.get(model)
    oip.check_version(entry, version)
    return oip.model_metadata(entry)


@router.get("/models/{model}/ready", summary="Model readiness", responses=ERRORS)
@router.get("/models/{model}/versions/{version}/ready", summary="Model readiness", responses=ERRORS)
async def model_ready(model: str, registry: RegistryDep, version: str | None = None) -> dict:
    entry = registry.get(model)  # registered dictionaries are prepared, hence ready
    oip.check_version(entry, version)
    return {"name": entry.record.name, "ready": True}


INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "42",
                    "parameters": {"method": "omp", "k": 2},
                    "inputs": [  # the demo dictionary's width: 0.6 basis_0 + 0.8 basis_1
                        {
                            "name": "activations",
                            "shape": [1, 16],
                            "datatype": "FP32",
                            "data": [0.6, 0.8] + [0.0] * 14,
                        }
                    ],
                    "outputs": [{"name": "indices"}, {"name": "values"}],
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: JSON header of "
                "`Inference-Header-Content-Length` bytes, then the tensors' bytes.",
            },
        },
    }
}


@router.post(
    "/models/{model}/infer",
    summary="Unfold activations (Open Inference Protocol inference)",
    responses=ERRORS,
    openapi_extra=INFER_DOC,
)
@router.post(
    "/models/{model}/versions/{version}/infer",
    summary="Unfold activations with one version (content id) of the dictionary",
    responses=ERRORS,
    openapi_extra=INFER_DOC,
)
async def infer(
    model: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    version: str | None = None,
) -> Response:
    entry = registry.get(model)
    oip.check_version(entry, version)
    body = await request.body()
    encoding = oip.content_encoding(request.headers.get("content-encoding"))
    header_length = request.headers.get(oip.HEADER_LENGTH)

    # A compressed body's expanded size is unknown until it is expanded: off the loop too.
    if encoding != "identity":
        body = await off_loop(math.inf, oip.decompress, body, encoding, settings.max_body_bytes)
    args = (body, header_length, settings.max_rows, entry.record.d_model)
    json_bytes = oip.json_length(body, header_length)
    if json_bytes > OFFLOAD_BYTES:
        decoded, activations = await parse_json(request, json_bytes, oip.parse_infer_request, *args)
    else:  # a small JSON header, maybe with large binary tensor data
        decoded, activations = await off_loop(len(body), oip.parse_infer_request, *args)
    return await unfolding.unfold(
        request,
        entry,
        activations,
        decoded.params,
        lambda answer: infer_response(request, entry, decoded, answer),
        dense=any(output.name == "codes" for output in decoded.outputs),
        advice="request the outputs indices and values instead of codes",
    )


def infer_response(request: Request, entry, decoded, answer) -> Response:
    content, header_length = oip.encode_infer_response(entry, decoded, answer)
    content, encoding = oip.compress(content, request.headers.get("accept-encoding"))
    headers = {}
    if header_length is not None:
        headers[oip.HEADER_LENGTH] = str(header_length)
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    media_type = "application/json" if header_length is None else "application/octet-stream"
    return Response(content, media_type=media_type, headers=headers)


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def unknown(path: str, request: Request) -> Response:
    """A path of this protocol with another method: 405 with the methods it has in `Allow`;
    anything else under /v2 (model repository, config, statistics, ...): a protocol 404."""
    allow = allowed_methods(request.app.routes, request.scope)
    if allow:
        raise MethodNotAllowed(request.method, request.url.path, allow)
    raise NotFound(
        f"no route {request.method} /v2/{path}; this server implements /v2, /v2/health/live, "
        "/v2/health/ready, /v2/models/{model}[/versions/{version}][/ready|/infer]"
    )
