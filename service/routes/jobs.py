"""`/v1/jobs`: unfold whole datasets in the background (`service.jobs`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from safetensors.numpy import load_file
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import unfolding
from ..datasets import SUFFIXES, Activations
from ..dependencies import RegistryDep, SettingsDep
from ..errors import Forbidden, InvalidInput, NotFound
from ..formats import SAFETENSORS
from ..responses import JSONResponse
from ..schemas import SOLVER_FIELDS, JobCreate, JobFeatures, JobInfo, JobList, openapi_body
from ..uploads import check_disk, read_capped

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND = {404: {"description": "No job with that id"}}
NOT_DONE = {409: {"description": "The job has not succeeded (yet)"}}
MAX_TOP = 1000
JOB_FIELDS = (*SOLVER_FIELDS, "certify", "compare_encoder")
"""A job's parameters: the solver's, and the per-row checks it adds to its result."""


@router.post(
    "",
    status_code=202,
    summary="Start a job: unfold a dataset of activations in the background",
    response_model=JobInfo,
    responses={
        403: {"description": "The input path is outside UNFOLD_JOB_INPUT_DIRS"},
        404: {"description": "No dictionary with that id or name"},
        422: {"description": "Invalid input file, shapes or parameters"},
    },
    openapi_extra=openapi_body(
        JobCreate,
        {
            "multipart/form-data": "Fields: file (.npy, .safetensors or .npz activations, "
            "streamed to disk), dictionary, method and the method's parameters (k, alpha, ...)"
        },
    ),
)
async def create_job(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    jobs = request.app.state.jobs
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    upload = None
    if content_type == "multipart/form-data":
        check_disk(request, jobs.root)
        fields, upload = await _read_multipart(request, jobs)
        path = upload / fields.pop("file_name")
    elif content_type == "application/json":
        body = await read_capped(request, settings.max_body_bytes, "send a smaller JSON object")
        fields = unfolding.validate(JobCreate, unfolding.parse_json_object(body)).model_dump()
        path = allowed_input(fields.pop("input"), settings.job_input_dirs)
    else:
        raise InvalidInput(
            f"unsupported Content-Type {content_type!r}; send application/json "
            '({"input": PATH, "dictionary": ...}) or multipart/form-data (a file)',
            code="unsupported_media_type",
        )
    try:
        entry = registry.get(fields.pop("dictionary"))
        unknown = sorted(set(fields) - set(JOB_FIELDS))
        if unknown:
            raise InvalidInput(
                f"unknown job parameter(s) {unknown}; a job takes {list(JOB_FIELDS)}",
                code="invalid_request",
            )
        params = unfolding.validate(unfolding.PARAMS_ADAPTER, fields)
        unfolding.solver_settings(entry, params)  # refused now (422), not when the job runs
        unfolding.check_encoder(entry, params)
        if jobs.ray_address and params.compare_encoder:
            raise InvalidInput(
                "this server solves jobs on Ray, where there is no encoder to compare with; "
                "ask for compare_encoder in unfold requests",
                code="no_encoder",
            )
        source = await run_in_threadpool(Activations, path)
        if source.d_model != entry.record.d_model:
            raise InvalidInput(
                f"the activations have d_model={source.d_model}; dictionary "
                f"{entry.record.name!r} needs {entry.record.d_model}",
                code="shape_mismatch",
            )
        given = {k: v for k, v in fields.items() if k != "method" and v is not None}
        job = jobs.submit(entry, params.method, given, source, path)
    except BaseException:
        if upload is not None:
            shutil.rmtree(upload, ignore_errors=True)
        raise
    return JSONResponse(job.describe(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def _read_multipart(request: Request, jobs) -> tuple[dict, Path]:
    """(fields, folder holding the uploaded file as ``fields["file_name"]``)."""
    try:
        form = await request.form(max_part_size=1 << 20)
    except StarletteHTTPException as error:
        raise InvalidInput(
            f"the multipart body cannot be read: {error.detail}", code="invalid_multipart"
        ) from None
    repeated = sorted(key for key in set(form) if len(form.getlist(key)) > 1)
    if repeated:
        raise InvalidInput(f"multipart field(s) {repeated} given more than once",
                           code="invalid_request")  # fmt: skip
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("send the activations as the multipart file field `file`",
                           code="invalid_request")  # fmt: skip
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidInput(
            f"the file {upload.filename!r} must be one of {', '.join(SUFFIXES)} (by its name)",
            code="invalid_input_file",
        )
    fields = {}
    for key, value in form.items():
        if key == "file":
            continue
        if isinstance(value, UploadFile):
            raise InvalidInput(f"multipart field {key!r} must be text", code="invalid_request")
        fields[key] = unfolding.json_scalar(value) if key != "dictionary" else value
    if "dictionary" not in fields:
        raise InvalidInput("name the dictionary: multipart field `dictionary`",
                           code="invalid_request")  # fmt: skip
    folder = jobs.new_folder()
    name = "input" + suffix
    await run_in_threadpool(_save, upload, folder / name)
    fields["file_name"] = name
    return fields, folder


def _save(upload: UploadFile, path: Path) -> None:
    with open(path, "wb") as file:
        shutil.copyfileobj(upload.file, file, 4 << 20)


def allowed_input(text: str, allowed: list[Path]) -> Path:
    """`text` as an existing file or folder under one of `allowed` (links resolved: a link or
    `..` that leads out is refused, and so is a folder holding one)."""
    if not allowed:
        raise Forbidden(
            "this server reads no job inputs from its disk (UNFOLD_JOB_INPUT_DIRS is empty); "
            "upload the file as multipart/form-data",
            code="input_not_allowed",
        )
    path = Path(text)
    if not path.is_absolute():
        raise InvalidInput(f"input {text!r}: give an absolute path", code="invalid_request")
    if not path.exists():
        raise InvalidInput(f"input {text!r}: no such file or folder", code="invalid_input_file")
    roots = [root.resolve() for root in allowed]
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in SUFFIXES]
    for candidate in {path, *files}:
        resolved = candidate.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise Forbidden(
                f"input {text!r} leads to {resolved}, outside the folders jobs may read "
                f"(UNFOLD_JOB_INPUT_DIRS: {', '.join(map(str, roots))})",
                code="input_not_allowed",
            )
    return path.resolve()


@router.get("", summary="List jobs", response_model=JobList)
async def list_jobs(request: Request) -> Response:
    jobs = await run_in_threadpool(request.app.state.jobs.store.all)
    return JSONResponse({"jobs": [job.describe() for job in jobs]})


@router.get("/{job_id}", summary="One job: state, progress, speed", response_model=JobInfo,
            responses=NOT_FOUND)  # fmt: skip
async def get_job(job_id: str, request: Request) -> Response:
    return JSONResponse(request.app.state.jobs.get(job_id).describe())


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running job; delete a finished one with its results",
    response_model=JobInfo,
    responses=NOT_FOUND,
)
async def delete_job(job_id: str, request: Request) -> Response:
    job = await run_in_threadpool(request.app.state.jobs.cancel, job_id)
    return JSONResponse(job.describe())


@router.get(
    "/{job_id}/result",
    summary="Every row's codes and diagnostics, in input order (one safetensors file)",
    response_class=FileResponse,
    responses={**NOT_FOUND, **NOT_DONE, 200: {"content": {SAFETENSORS: {}}}},
)
async def get_result(job_id: str, request: Request) -> Response:
    path = request.app.state.jobs.result_path(job_id, "result.safetensors")
    return FileResponse(path, media_type=SAFETENSORS, filename=f"{job_id}.safetensors")


@router.get(
    "/{job_id}/shards",
    summary="The result's shards (for large results): rows and where to get each",
    responses={**NOT_FOUND, **NOT_DONE},
)
async def list_shards(job_id: str, request: Request) -> Response:
    manifest = await run_in_threadpool(request.app.state.jobs.manifest, job_id)
    shards = [
        {"index": int(index), "start": shard["start"], "rows": shard["rows"],
         "url": f"/v1/jobs/{job_id}/shards/{index}"}
        for index, shard in sorted(manifest["shards"].items(), key=lambda item: int(item[0]))
    ]  # fmt: skip
    return JSONResponse({"shards": shards})


@router.get(
    "/{job_id}/shards/{index}",
    summary="One shard of the result: its rows' codes and diagnostics (safetensors)",
    response_class=FileResponse,
    responses={**NOT_FOUND, **NOT_DONE, 200: {"content": {SAFETENSORS: {}}}},
)
async def get_shard(job_id: str, index: int, request: Request) -> Response:
    manifest = await run_in_threadpool(request.app.state.jobs.manifest, job_id)
    shard = manifest["shards"].get(str(index))
    if shard is None:
        raise NotFound(f"job {job_id} has shards 0 to {len(manifest['shards']) - 1}, not {index}")
    path = request.app.state.jobs.folder(job_id) / "codes" / shard["file"]
    return FileResponse(path, media_type=SAFETENSORS, filename=f"{job_id}-{shard['file']}")


@router.get(
    "/{job_id}/features",
    summary="Per-feature statistics over the job's rows",
    response_model=JobFeatures,
    responses={
        **NOT_FOUND,
        **NOT_DONE,
        200: {"content": {SAFETENSORS: {"description": "Every feature (Accept: safetensors)"}}},
    },
)
async def get_features(
    job_id: str,
    request: Request,
    registry: RegistryDep,
    top: int = Query(20, ge=1, le=MAX_TOP, description="How many of the most frequent."),
) -> Response:
    """How often each feature fires (a fraction of rows), its mean code where it fires and its
    largest |code|: the `top` most frequent as JSON, or every feature as a safetensors file
    (`count`, `frequency`, `mean`, `max_abs`) with `Accept: application/vnd.safetensors`."""
    jobs = request.app.state.jobs
    path = jobs.result_path(job_id, "features.safetensors")
    if SAFETENSORS in request.headers.get("accept", ""):
        return FileResponse(path, media_type=SAFETENSORS, filename=f"{job_id}-features.safetensors")
    stats = await run_in_threadpool(load_file, path)
    job = jobs.get(job_id)
    try:
        labels = registry.get(job.dictionary).record.labels
    except Exception:  # noqa: BLE001 (the dictionary was deleted since: no labels)
        labels = None
    order = np.argsort(-stats["count"], kind="stable")[:top]
    rows = [
        {"feature": int(j), "label": labels[j] if labels else None,
         "count": int(stats["count"][j]), "frequency": float(stats["frequency"][j]),
         "mean": float(stats["mean"][j]), "max_abs": float(stats["max_abs"][j])}
        for j in order if stats["count"][j] > 0
    ]  # fmt: skip
    return JSONResponse({"rows": job.rows_total, "n_features": int(stats["count"].size),
                         "firing": int((stats["count"] > 0).sum()), "top": rows})  # fmt: skip
