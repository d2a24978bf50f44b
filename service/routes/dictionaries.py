"""Register, list, inspect, delete and unfold with dictionaries."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from .. import unfolding
from ..dependencies import RegistryDep, SettingsDep
from ..errors import InvalidInput
from ..registry import Entry
from ..responses import JSONResponse
from ..schemas import (
    DictionaryCreate,
    DictionaryInfo,
    DictionaryList,
    UnfoldRequest,
    UnfoldResponse,
)

router = APIRouter(prefix="/v1/dictionaries", tags=["dictionaries"])

ERRORS = {
    404: {"description": "No dictionary with that id or name"},
    422: {"description": "Invalid shapes, values or parameters"},
}


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
        path="gram" if entry.prepared.gram is not None else "matrix-free",
        labels=len(record.labels or ()),
        metadata=record.metadata,
        created_at=record.created_at,
    )


@router.post(
    "",
    status_code=201,
    summary="Register a dictionary (idempotent for identical content and name)",
    responses={
        200: {
            "description": "Already registered: the existing dictionary",
            "model": DictionaryInfo,
        },
        409: {"description": "Name taken, or content registered under another name"},
        422: ERRORS[422],
    },
)
async def create_dictionary(
    body: DictionaryCreate, registry: RegistryDep, response: Response
) -> DictionaryInfo:
    def register():
        try:
            directions = np.asarray(body.directions, dtype=np.float32)
        except ValueError:
            raise InvalidInput(
                "directions must be a list of equally long lists of numbers",
                code="invalid_dictionary",
            ) from None
        return registry.register(
            body.name, directions, body.bias, labels=body.labels, metadata=body.metadata
        )

    entry, created = await run_in_threadpool(register)
    if not created:
        response.status_code = 200
    return describe(entry)


@router.get("", summary="List dictionaries")
async def list_dictionaries(registry: RegistryDep) -> DictionaryList:
    return DictionaryList(dictionaries=[describe(e) for e in registry.entries()])


@router.get("/{ref}", summary="One dictionary, by id or name", responses={404: ERRORS[404]})
async def get_dictionary(ref: str, registry: RegistryDep) -> DictionaryInfo:
    return describe(registry.get(ref))


@router.delete(
    "/{ref}", status_code=204, summary="Delete a dictionary", responses={404: ERRORS[404]}
)
async def delete_dictionary(ref: str, registry: RegistryDep) -> Response:
    await run_in_threadpool(registry.delete, ref)
    return Response(status_code=204)


@router.post(
    "/{ref}/unfold",
    summary="Sparse codes of activations over the dictionary",
    response_model=UnfoldResponse,
    responses=ERRORS,
)
async def unfold(ref: str, body: UnfoldRequest, registry: RegistryDep, settings: SettingsDep):
    entry = registry.get(ref)
    activations, _ = unfolding.activations_array(body.activations, entry.record.d_model)
    if activations.shape[0] > settings.max_rows:
        raise InvalidInput(
            f"{activations.shape[0]} rows exceed the limit of {settings.max_rows} per request; "
            "split the batch",
            code="too_many_rows",
        )
    params = body.model_dump(exclude={"activations", "method"}, exclude_none=True)
    result = await run_in_threadpool(unfolding.run, entry, activations, body.method, params)
    # Built by us from the solver's arrays: skip re-validating large bodies.
    return JSONResponse(unfolding.response_body(result))
