"""Register, list, inspect, delete and unfold with dictionaries."""

from __future__ import annotations

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import unfolding
from ..batching import warmup
from ..dependencies import RegistryDep, SettingsDep
from ..errors import InvalidInput
from ..formats import (
    NPY,
    SAFETENSORS,
    pick_dictionary_tensors,
    read_npy,
    read_sae_config,
    read_safetensors,
)
from ..registry import Entry
from ..schemas import (
    DictionaryCreate,
    DictionaryInfo,
    DictionaryList,
    Placement,
    UnfoldResponse,
    openapi_body,
)
from ._direct import DirectRoute

router = APIRouter(prefix="/v1/dictionaries", tags=["dictionaries"])

NOT_FOUND = {404: {"description": "No dictionary with that id or name"}}
INVALID = {422: {"description": "Invalid shapes, values or parameters"}}


def describe(entry: Entry) -> DictionaryInfo:
    record, norms = entry.record, entry.norms
    return DictionaryInfo(
        id=record.id,
        name=record.name,
        n_features=record.n_features,
        d_model=record.d_model,
        dtype="float32",
        has_bias=record.bias is not None,
        norms={"min": norms.min(), "max": norms.max(), "mean": norms.mean()},
        path=entry.prepared.path,
        placement=Placement(
            gram_bytes=entry.path_choice.gram_bytes,
            gram_budget_bytes=entry.path_choice.budget_bytes,
            device_bytes=entry.prepared.nbytes,
            scan="float32" if entry.prepared.scan_atoms is None else "bfloat16",
            reason=entry.path_choice.reason,
        ),
        warm=entry.warm.is_set(),
        labels=len(record.labels or ()),
        metadata=record.metadata,
        created_at=record.created_at,
    )


async def read_registration(request: Request) -> DictionaryCreate | dict:
    """The registration in any accepted format, as keyword arguments of `Registry.register`."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type == "application/json":
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"body is not valid JSON: {error}", code="invalid_request") from None
        body = unfolding.validate(DictionaryCreate, data)
        return {
            "name": body.name,
            "directions": _matrix(body.directions),
            "bias": body.bias,
            "labels": body.labels,
            "metadata": body.metadata,
        }
    if content_type == NPY:
        name = request.query_params.get("name")
        if not name:
            raise InvalidInput("give the dictionary a name: ?name=...", code="invalid_request")
        return {"name": name, "directions": read_npy(await request.body(), "directions")}
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    raise InvalidInput(
        f"unsupported Content-Type {content_type!r}; send application/json, {NPY} or "
        "multipart/form-data (a safetensors file, optionally with a SAELens cfg.json)",
        code="unsupported_media_type",
    )


async def _read_multipart(request: Request) -> dict:
    form = await request.form()
    upload = form.get("file")
    name = form.get("name")
    if not isinstance(upload, UploadFile) or not isinstance(name, str) or not name:
        raise InvalidInput(
            "multipart registration needs a `file` part (safetensors) and a `name` field",
            code="invalid_request",
        )
    tensors = read_safetensors(await upload.read(), "file")
    directions, bias = pick_dictionary_tensors(tensors, form.get("tensor"), form.get("bias_tensor"))
    metadata = {}
    config = form.get("cfg")
    if isinstance(config, UploadFile):
        metadata = read_sae_config(await config.read(), directions)
    return {"name": name, "directions": directions, "bias": bias, "metadata": metadata}


def _matrix(rows: list[list[float]]) -> np.ndarray:
    try:
        return np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise InvalidInput(
            "directions must be a list of equally long lists of numbers",
            code="invalid_dictionary",
        ) from None


@router.post(
    "",
    status_code=201,
    summary="Register a dictionary (idempotent for identical content and name)",
    response_model=DictionaryInfo,
    responses={
        200: {"description": "Already registered under this name", "model": DictionaryInfo},
        409: {"description": "Name taken, or content registered under another name"},
        **INVALID,
    },
    openapi_extra=openapi_body(
        DictionaryCreate,
        {
            NPY: "Directions (n_features, d_model); the name in the query: ?name=...",
            "multipart/form-data": "Fields: name, file (safetensors; W_dec/b_dec or the only "
            "2-D tensor, or name it with `tensor` and `bias_tensor`), cfg (SAELens cfg.json)",
        },
    ),
)
async def create_dictionary(request: Request, registry: RegistryDep, settings: SettingsDep):
    registration = await read_registration(request)
    entry, created = await run_in_threadpool(lambda: registry.register(**registration))
    if created and settings.warmup:  # compile its default programs before the first request
        background = request.app.state.background
        background.start(
            "unfold-warmup", warmup, entry, settings.max_batch_size, stop=background.stopping
        )
    return unfolding.JSONResponse(
        describe(entry).model_dump(mode="json"), status_code=201 if created else 200
    )


@router.get("", summary="List dictionaries")
async def list_dictionaries(registry: RegistryDep) -> DictionaryList:
    return DictionaryList(dictionaries=[describe(e) for e in registry.entries()])


@router.get("/{ref}", summary="One dictionary, by id or name", responses=NOT_FOUND)
async def get_dictionary(ref: str, registry: RegistryDep) -> DictionaryInfo:
    return describe(registry.get(ref))


@router.delete("/{ref}", status_code=204, summary="Delete a dictionary", responses=NOT_FOUND)
async def delete_dictionary(ref: str, registry: RegistryDep) -> Response:
    await run_in_threadpool(registry.delete, ref)
    return Response(status_code=204)


# The hot path: a `DirectRoute` (no dependency injection; the app's state is read from the
# request, the body by `unfolding`). No docstring: it would become the operation's description.
async def unfold(request: Request, ref: str) -> Response:
    state = request.app.state
    entry = state.registry.get(ref)
    activations, params = await unfolding.parse_request(request, entry.record.d_model)
    max_rows = state.settings.max_rows
    if activations.shape[0] > max_rows:
        raise InvalidInput(
            f"{activations.shape[0]} rows exceed the limit of {max_rows} per request; "
            "split the batch",
            code="too_many_rows",
        )
    result = await unfolding.solve(entry, activations, params, state.batcher)
    return unfolding.render(request, entry, result, params)


router.add_api_route(
    "/{ref}/unfold",
    unfold,
    methods=["POST"],
    route_class_override=DirectRoute,
    summary="Sparse codes of activations over the dictionary",
    response_model=UnfoldResponse,
    responses={
        **NOT_FOUND,
        **INVALID,
        200: {
            "description": "Codes and per-row diagnostics. `Accept: application/x-npy` gives "
            "dense codes (batch, n_features) float32; `Accept: application/vnd.safetensors` "
            "gives tensors indices, values and the diagnostics.",
            "content": {NPY: {}, SAFETENSORS: {}},
        },
    },
    openapi_extra=openapi_body(
        unfolding.UnfoldRequest,
        {NPY: "Activations (batch, d_model) float32; the parameters in the query string"},
    ),
)
