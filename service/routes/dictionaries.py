"""Register, list, inspect, delete and unfold with dictionaries."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import unfolding
from ..batching import warmup
from ..dependencies import RegistryDep, SettingsDep
from ..errors import InvalidInput
from ..formats import (
    NPY,
    SAFETENSORS,
    SafetensorsFile,
    converted,
    dictionary_arrays,
    json_array,
    map_file,
    open_npy,
)
from ..parsing import parse_json
from ..registry import Entry
from ..schemas import (
    DictionaryAttributes,
    DictionaryCreate,
    DictionaryInfo,
    DictionaryList,
    Placement,
    UnfoldRequest,
    UnfoldResponse,
    openapi_body,
)
from ..uploads import check_disk, read_capped, spooled
from ._direct import DirectRoute

log = logging.getLogger(__name__)
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
            device_bytes=entry.prepared.device_bytes,
            devices=[str(device) for device in entry.prepared.devices],
            shard=entry.prepared.shard,
            scan="float32" if entry.prepared.scan_atoms is None else "bfloat16",
            reason=entry.path_choice.reason,
        ),
        warm=entry.warm.is_set(),
        labels=len(record.labels or ()),
        metadata=record.metadata,
        created_at=record.created_at,
        encoder=None if record.encoder is None else record.encoder.describe(),
    )


JSON_ADVICE = (
    "a JSON registration is limited to UNFOLD_MAX_BODY_BYTES; send a large dictionary as "
    f"{NPY} or safetensors (streamed to disk, up to UNFOLD_MAX_DICTIONARY_BYTES)"
)


async def read_registration(request: Request, settings) -> dict:
    """The registration in any accepted format, as keyword arguments of `Registry.register`.
    Binary uploads are streamed to disk and their arrays are memory-mapped views."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    staging = request.app.state.registry.store.staging
    if content_type == "application/json":
        body = await read_capped(request, settings.max_body_bytes, JSON_ADVICE)
        return await parse_json(request, len(body), _json_registration, body)
    if content_type in (NPY, SAFETENSORS):
        allowed = ("name",) if content_type == NPY else ("name", "tensor", "bias_tensor")
        query = unfolding.query_values(request, allowed)
        name = query.get("name")
        if not name:
            raise InvalidInput("give the dictionary a name: ?name=...", code="invalid_request")
        async with spooled(request, staging) as path:
            if content_type == NPY:
                return {"name": name, **converted(open_npy(path, "directions"), None, {})}
            file = SafetensorsFile(map_file(path), "body")
            arrays = dictionary_arrays(file, query.get("tensor"), query.get("bias_tensor"), None)
            return {"name": name, **arrays}
    if content_type == "multipart/form-data":
        check_disk(request, staging, Path(tempfile.gettempdir()))
        return await _read_multipart(request)
    raise InvalidInput(
        f"unsupported Content-Type {content_type!r}; send application/json, {NPY}, "
        f"{SAFETENSORS} or multipart/form-data (a safetensors file, optionally with a SAELens "
        "cfg.json)",
        code="unsupported_media_type",
    )


def _json_registration(body: bytes) -> dict:
    data = unfolding.parse_json_object(body)
    directions, bias = data.pop("directions", None), data.pop("bias", None)
    fields = unfolding.validate(DictionaryAttributes, data)
    if directions is None:
        raise InvalidInput(
            "directions: Field required (a list of rows, (n_features, d_model))",
            code="invalid_request",
        )
    return {
        "name": fields.name,
        "directions": json_array(directions, "directions", shape_code="invalid_dictionary"),
        "bias": None if bias is None else json_array(bias, "bias", shape_code="invalid_dictionary"),
        "labels": fields.labels,
        "metadata": fields.metadata,
    }


MULTIPART_TEXT = ("name", "tensor", "bias_tensor")
MULTIPART_FILES = ("file",)
MULTIPART_FIELDS = (*MULTIPART_TEXT, *MULTIPART_FILES, "cfg")


async def _read_multipart(request: Request) -> dict:
    try:
        form = await request.form()
    except StarletteHTTPException as error:  # the multipart parser's refusals (400)
        raise InvalidInput(
            f"the multipart body cannot be read: {error.detail}", code="invalid_multipart"
        ) from None
    unknown = sorted(set(form) - set(MULTIPART_FIELDS))
    repeated = sorted(key for key in set(form) if len(form.getlist(key)) > 1)
    if unknown or repeated:
        raise InvalidInput(
            f"multipart field(s) {unknown or repeated} "
            + ("unknown" if unknown else "given more than once")
            + f"; send each of {list(MULTIPART_FIELDS)} at most once",
            code="invalid_request",
        )
    for key in MULTIPART_TEXT:
        if isinstance(form.get(key), UploadFile):
            raise InvalidInput(f"`{key}` must be a text field, not a file", code="invalid_request")
    upload = form.get("file")
    name = form.get("name")
    if not isinstance(upload, UploadFile) or not name:
        raise InvalidInput(
            "multipart registration needs a `file` part (safetensors) and a `name` field",
            code="invalid_request",
        )
    file = SafetensorsFile(await run_in_threadpool(map_file, upload.file), "file")
    # cfg.json as a file part or as a text field: either is read and checked the same way.
    config = form.get("cfg")
    if isinstance(config, UploadFile):
        config = await config.read()
    elif isinstance(config, str):
        config = config.encode()
    arrays = dictionary_arrays(file, form.get("tensor"), form.get("bias_tensor"), config)
    return {"name": name, **arrays}


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
            SAFETENSORS: "A safetensors file (W_dec/b_dec or the only 2-D tensor, or name them "
            "with ?tensor=&bias_tensor=); the name in the query: ?name=...",
            "multipart/form-data": "Fields: name, file (safetensors; W_dec/b_dec or the only "
            "2-D tensor, or name it with `tensor` and `bias_tensor`), cfg (SAELens cfg.json)",
        },
    ),
)
async def create_dictionary(request: Request, registry: RegistryDep, settings: SettingsDep):
    registration = await read_registration(request, settings)
    entry, created = await run_in_threadpool(lambda: registry.register(**registration))
    if created and settings.reports:
        request.app.state.reports.schedule(entry)
    if created and settings.warmup:  # compile its default programs before the first request
        background = request.app.state.background
        background.start(
            "unfold-warmup",
            warmup,
            entry,
            settings.max_batch_size,
            stop=background.stopping,
            programs=request.app.state.batcher.programs,
        )
    return unfolding.JSONResponse(
        describe(entry).model_dump(mode="json"), status_code=201 if created else 200
    )


@router.get("", summary="List dictionaries", response_model=DictionaryList)
async def list_dictionaries(registry: RegistryDep) -> Response:
    # Each entry is rendered on its own: one that cannot be (a stored manifest written before
    # metadata was limited) is logged and left out, instead of failing the list for everyone.
    rendered = []
    for entry in registry.entries():
        try:
            rendered.append(orjson.dumps(describe(entry).model_dump(mode="json")))
        except Exception:
            log.exception("dictionary %s cannot be rendered; left out of the list", entry.record.id)
    body = b'{"dictionaries":[' + b",".join(rendered) + b"]}"
    return Response(body, media_type="application/json")


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
    activations, params = await unfolding.parse_request(
        request, entry.record.d_model, state.settings.max_rows
    )
    return await unfolding.unfold(
        request,
        entry,
        activations,
        params,
        lambda answer: unfolding.render(request, entry, answer, params),
        dense=params.output == "dense" or NPY in request.headers.get("accept", ""),
        advice=f"ask for sparse codes (JSON output=sparse, or Accept: {SAFETENSORS})",
    )


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
        UnfoldRequest,
        {NPY: "Activations (batch, d_model) float32; the parameters in the query string"},
    ),
)
