"""The one unfold pipeline: parameters validated against one table (`schemas.PARAMS`), solver
settings, solving, certificates and the encoder comparison, answers rendered.

- Requests: each entry point parses its own format (`parse_request` here for v1 JSON and
  `.npy` bodies, `oip` for the Open Inference Protocol), then calls `unfold`, which holds the
  memory, solves through the batcher (`solve`) and renders (`render`, `oip`'s encoder).
- Datasets (`unfold run`, jobs, Ray): `datasets.unfold_shards` solves each batch of rows with
  `RowSolver` in-process, or through the server's `Programs` in a job, into `answer_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import orjson
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError

import solvers

from . import encoder, memory
from .auth import client_of
from .batching import Batcher
from .errors import InvalidInput, describe_validation_errors
from .formats import (
    NPY,
    SAFETENSORS,
    json_array,
    read_npy,
    too_many_rows,
    write_npy,
    write_safetensors,
)
from .parsing import off_loop, parse_json
from .registry import Entry
from .responses import JSONResponse
from .schemas import OUTPUT_FIELDS, SOLVER_FIELDS, UnfoldParams

PARAMS_ADAPTER = TypeAdapter(UnfoldParams)
QUERY_PARAMS = (*SOLVER_FIELDS, *OUTPUT_FIELDS)


def validate(schema, data: Any):
    """`data` validated against a model or annotated type; errors become 422s."""
    adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        raise InvalidInput(
            describe_validation_errors(error.errors()), code="invalid_request"
        ) from None


async def parse_request(request: Request, d_model: int, max_rows: int) -> tuple[np.ndarray, Any]:
    """Activations (batch, d_model) float32 and the validated params, from a JSON body or
    an `.npy` body with the params in the query string.

    More than `max_rows` rows is a 422 `too_many_rows`, found before the rows are converted
    (from the `.npy` header; from the JSON list's length). Large bodies are parsed off the
    event loop (`parsing`): it serves other requests meanwhile.
    """
    body = await request.body()
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type == NPY:
        query = query_values(request, QUERY_PARAMS)
        params = validate(PARAMS_ADAPTER, {key: json_scalar(v) for key, v in query.items()})
        activations = await off_loop(len(body), _npy_activations, body, d_model, max_rows)
        return activations, params
    if content_type not in ("application/json", ""):
        raise InvalidInput(
            f"unsupported Content-Type {content_type!r}; send application/json or {NPY}",
            code="unsupported_media_type",
        )
    # Query parameters would be ignored: say so instead of solving otherwise. (The raw string
    # first: parsing it costs more than the check, on every request.)
    if request.scope.get("query_string") and request.query_params:
        raise InvalidInput(
            f"query parameter(s) {sorted(request.query_params)} apply to {NPY} bodies only; "
            "with a JSON body, put them in the JSON object",
            code="invalid_request",
        )
    return await parse_json(request, len(body), _json_request, body, d_model, max_rows)


def _npy_activations(body: bytes, d_model: int, max_rows: int) -> np.ndarray:
    return activations_array(read_npy(body, "activations", max_rows), d_model)


def _json_request(body: bytes, d_model: int, max_rows: int) -> tuple[np.ndarray, Any]:
    data = parse_json_object(body)
    activations = data.pop("activations", None)
    if activations is None:
        raise InvalidInput(
            "activations: Field required (one vector (d_model,) or a batch (batch, d_model))",
            code="invalid_request",
        )
    if isinstance(activations, list) and activations and isinstance(activations[0], list):
        check_rows(len(activations), max_rows)
    params = validate(PARAMS_ADAPTER, data)
    return activations_array(activations, d_model), params


def parse_json_object(body: bytes) -> dict:
    """The JSON object of a request body; anything else is a 422 `invalid_request`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"body is not valid JSON: {error}", code="invalid_request") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object", code="invalid_request")
    return data


def query_values(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string as a dict; a parameter not in `allowed`, or given twice, is a 422
    `invalid_request` (never silently ignored, nor one of two values taken)."""
    items = request.query_params.multi_items()
    query = dict(items)
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"unknown query parameter(s) {unknown}; use {list(allowed)}", code="invalid_request"
        )
    if len(query) != len(items):
        repeated = sorted({key for key, _ in items if [k for k, _ in items].count(key) > 1})
        raise InvalidInput(
            f"query parameter(s) {repeated} given more than once; give each at most once",
            code="invalid_request",
        )
    return query


def json_scalar(text: str):
    """A query value as the JSON scalar it spells (`8`, `0.5`, `true`, `null`), else the
    string itself; empty stands for null (e.g. `k=` or `k=null`: no k). Validation is then as
    strict as for a JSON body: `k=true` is not a number, `positive=yes` not a boolean."""
    if text == "":
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if value is None or isinstance(value, bool | int | float) else text


def check_rows(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise too_many_rows(rows, max_rows)


def activations_array(values, d_model: int) -> np.ndarray:
    """Activations as float32 (batch, d_model) from a real array or JSON numbers
    (`formats.json_array`: strictly numbers); a single (d_model,) vector is one row."""
    if isinstance(values, np.ndarray):
        with np.errstate(over="ignore"):  # beyond float32 range becomes Inf: refused below
            array = values.astype(np.float32, copy=False)
    else:
        array = json_array(values, "activations", shape_code="invalid_shape")
    if array.ndim not in (1, 2) or array.shape[-1] != d_model:
        raise InvalidInput(
            f"activations have shape {list(array.shape)}; this dictionary needs "
            f"(batch, {d_model}) or ({d_model},)",
            code="shape_mismatch",
        )
    array = array.reshape(-1, d_model)
    if array.shape[0] == 0:
        raise InvalidInput("activations is an empty batch; send at least one row", code="empty")
    # One reduction for the common case: a float64 sum of float32 values cannot overflow, so
    # it is finite exactly when every value is.
    if not np.isfinite(array.sum(dtype=np.float64)):
        finite = np.isfinite(array).all(axis=1)
        raise InvalidInput(
            "activations contain NaN or Inf (or values beyond float32 range) in row(s) "
            f"{np.flatnonzero(~finite)[:10].tolist()}",
            code="non_finite",
        )
    return array


def solver_params(params) -> tuple[str, dict]:
    """(method, keyword arguments for `solvers.unfold`) from validated params."""
    fields = params.model_dump(exclude_none=True, exclude={*OUTPUT_FIELDS, "activations"})
    return fields.pop("method"), fields


SETTINGS_CACHE_SIZE = 256
"""Most solver settings remembered per dictionary (`solver_settings`); then it starts over."""


def solver_settings(entry: Entry, params):
    """`solvers.make_settings(...)` for validated `params`; a bad value is a 422.

    Requests repeat their parameters, so the result is remembered per dictionary, keyed by the
    parameter values; parameters the solver refuses (k > n_features, ...) are a 422 each time.
    """
    fields = _SOLVER_FIELDS.get(type(params))
    if fields is None:
        fields = _SOLVER_FIELDS[type(params)] = tuple(
            name for name in type(params).model_fields if name not in NOT_SOLVER_FIELDS
        )
    key = (params.method, *(getattr(params, name) for name in fields))
    cache = entry.settings_cache
    cached = cache.get(key)
    if cached is None:
        settings = make_settings(entry.prepared, params)
        if len(cache) >= SETTINGS_CACHE_SIZE:
            cache.clear()
        cached = cache[key] = settings
    return cached


def make_settings(prepared: solvers.Dictionary | Shape, params):
    """`solvers.make_settings` for validated `params`; a value the solver refuses is a 422."""
    method, kwargs = solver_params(params)
    try:
        return solvers.make_settings(method, prepared, **kwargs)
    except ValueError as error:
        raise InvalidInput(str(error), code="invalid_parameter") from None


class Shape(NamedTuple):
    """What settings are checked against: a dictionary's shape, without preparing it."""

    n_features: int
    d_model: int


def check_params(n_features: int, d_model: int, method: str, params: dict):
    """Validated `params` of `method` for a dictionary of this shape (422s as a request's),
    without preparing the dictionary: what a Ray driver checks before its actors prepare it."""
    validated = validate(PARAMS_ADAPTER, {"method": method, **params})
    make_settings(Shape(n_features, d_model), validated)
    return validated


NOT_SOLVER_FIELDS = {*OUTPUT_FIELDS, "activations", "method"}
_SOLVER_FIELDS: dict[type, tuple[str, ...]] = {}


class Answer(NamedTuple):
    """The codes of a request, and their certificates and the SAE encoder's codes when it
    asked for them (`encoder.compare`)."""

    result: solvers.UnfoldResult
    certificate: solvers.Certificate | None = None
    encoder: dict[str, Any] | None = None


async def unfold(
    request: Request,
    entry: Entry,
    activations: np.ndarray,
    params,
    render: Callable[[Answer], Response],
    dense: bool,
    advice: str,
) -> Response:
    """The response of an unfold request, whatever its format (v1 JSON or `.npy`, OIP), once
    parsed and validated: the memory its rows and answer need is held (`dense`: a dense answer
    is asked for; `advice`: how to ask for less), the rows solved (`solve`), and the answer
    `render`ed within that hold."""
    state = request.app.state
    nbytes = memory.request_bytes(
        activations.shape[0],
        entry.record.d_model,
        entry.record.n_features,
        dense_limit=state.settings.max_dense_answer_bytes,
        dense=dense,
        advice=advice,
    )
    with state.registry.budget.hold_request(nbytes, state.settings.retry_after_s):
        answer = await solve(entry, activations, params, state.batcher, client_of(request))
        return render(answer)


async def solve(
    entry: Entry, activations: np.ndarray, params, batcher: Batcher, client: str | None = None
) -> Answer:
    """Codes of validated `activations` (batch, d_model) with validated `params`.

    Parameters are checked against the dictionary first, so a bad request is refused (422)
    before it can join a batch; then the rows go through the `batcher` (merged with concurrent
    requests of the same dictionary and settings when dynamic batching is on; `client`, from
    `auth.client_of`, gets its fair share of the queue and the solver threads). The settings
    are recorded as used (`Usage`: start-up warms the most used). Certificates, when asked
    for, are computed on a worker thread once the codes are in.
    """
    settings = solver_settings(entry, params)
    check_encoder(entry, params)
    programs = batcher.programs
    programs.usage.record(entry.record.id, settings, activations.shape[0])
    result = await batcher.submit(
        (entry.record.id, settings),
        activations,
        lambda rows, cancel: programs.run(entry, settings, rows, cancel),
        label=entry.record.id,
        client=client,
    )
    if params.certify or params.compare_encoder:
        return await run_in_threadpool(
            checked, entry.prepared, entry.record, activations, result, params
        )
    return Answer(result)


def check_encoder(entry: Entry, params) -> None:
    """A 422 `no_encoder` when `params` ask to compare with an encoder `entry` lacks."""
    if params.compare_encoder and entry.record.encoder is None:
        raise InvalidInput(
            f"dictionary {entry.record.name!r} has no encoder to compare with; register a "
            "SAELens folder with its W_enc and b_enc (standard, jumprelu or topk)",
            code="no_encoder",
        )


def checked(prepared, record, activations: np.ndarray, result, params) -> Answer:
    """`result` with the certificate and the encoder comparison (with `record`'s encoder)
    that `params` ask for."""
    certificate = solvers.certify(result, prepared) if params.certify else None
    comparison = None
    if params.compare_encoder:
        comparison = encoder.compare(record, activations, result)
    return Answer(result, certificate, comparison)


class RowSolver:
    """Codes of rows solved in this process from a dictionary's arrays, as `answer_tensors`:
    what `unfold run` without a server and Ray's actors call (the server's requests and jobs
    solve through its `Programs`). `params` as a request's (`certify` included; there is no
    encoder to compare with)."""

    def __init__(self, directions, bias, method: str, params: dict):
        self.prepared = solvers.prepare(directions, bias)
        self.params = validate(PARAMS_ADAPTER, {"method": method, **params})
        if self.params.compare_encoder:
            raise InvalidInput(
                "compare_encoder needs a dictionary registered with its encoder; run it "
                "in-process or through the server's jobs",
                code="no_encoder",
            )
        self.settings = make_settings(self.prepared, self.params)  # errors before any work

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        result = solvers.unfold(rows, self.prepared, method=self.settings)
        return answer_tensors(checked(self.prepared, None, rows, result, self.params))


def render(request: Request, entry: Entry, answer: Answer, params) -> Response:
    """The answer in the format the `Accept` header asks for (JSON by default)."""
    result = answer.result
    accept = request.headers.get("accept", "")
    if NPY in accept:
        return Response(write_npy(result.to_dense().astype(np.float32)), media_type=NPY)
    if SAFETENSORS in accept:
        return Response(write_safetensors(answer_tensors(answer)), media_type=SAFETENSORS)
    return JSONResponse(response_body(answer, params, entry.record.labels))


DIAGNOSTICS = ("residual_norm", "relative_error", "l0", "n_iter", "status", "duality_gap")


def answer_tensors(answer: Answer) -> dict[str, np.ndarray]:
    """Every array of an answer by name (safetensors answers, job results): the codes, the
    diagnostics, and the certificate's and the encoder's arrays when asked for."""
    result = answer.result
    return {
        "indices": result.indices.astype(np.int32),
        "values": result.values.astype(np.float32),
        **{name: np.asarray(getattr(result, name)) for name in DIAGNOSTICS},
        **certificate_arrays(answer.certificate),
        **{f"encoder_{name}": value for name, value in (answer.encoder or {}).items()},
    }


def certificate_arrays(certificate: solvers.Certificate | None) -> dict[str, np.ndarray]:
    """The certificate's fields as arrays (float32, `certified` bool); none without one."""
    if certificate is None:
        return {}
    return {
        name: np.asarray(value, bool if name == "certified" else np.float32)
        for name, value in certificate._asdict().items()
    }


def response_body(answer: Answer, params, labels: list[str] | None) -> dict:
    result = answer.result
    body: dict[str, Any] = {}
    if params.output == "dense":
        body["dense"] = result.to_dense()
    else:
        body["codes"] = sparse_codes(result.indices, result.values, params.top, labels)
    for name in DIAGNOSTICS:
        body[name] = np.asarray(getattr(result, name))
    body["duality_gap"] = finite_or_null(body["duality_gap"])
    body["messages"] = result.messages()
    for name, value in certificate_arrays(answer.certificate).items():
        body[name] = value.tolist() if name == "certified" else finite_or_null(value)
    if answer.encoder is not None:
        comparison = dict(answer.encoder)
        indices, values = comparison.pop("indices"), comparison.pop("values")
        body["encoder"] = {"codes": sparse_codes(indices, values, params.top, labels), **comparison}
    return body


def finite_or_null(values: np.ndarray) -> list[float | None]:
    """JSON numbers, with None for NaN and infinities (JSON has neither)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def sparse_codes(all_indices, all_values, top: int | None, labels) -> list[dict]:
    """Per row of padded sparse codes: its `indices`, `values` (and `labels`), the `top`
    largest |values| only when given."""
    codes = []
    for indices, values in zip(all_indices, all_values, strict=True):
        keep = indices >= 0
        indices, values = indices[keep], values[keep]
        if top is not None and len(values) > top:
            order = np.argsort(-np.abs(values), kind="stable")[:top]
            indices, values = indices[order], values[order]
        code: dict[str, Any] = {"indices": indices.tolist(), "values": values.tolist()}
        if labels is not None:
            code["labels"] = [labels[i] for i in indices]
        codes.append(code)
    return codes
