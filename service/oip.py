"""The Open Inference Protocol (KServe v2 / Triton REST) on the wire: decode inference
requests, encode responses, describe models. No FastAPI here: `routes/oip.py` is the router.

A model is a registered dictionary, named by its name or id; its one version is its content
id. It takes one input, `activations` of shape [batch, d_model] (or [d_model]); the solver
method and its parameters travel in the request's `parameters`. It produces `codes` (dense,
[batch, n_features]), the padded sparse codes `indices` and `values` ([batch, width]) and the
per-row diagnostics, and with the parameter ``certify: true`` the per-row certificates.

Binary tensor data extension: when the `Inference-Header-Content-Length` header is present, the
body is that many bytes of JSON followed by the binary tensors, in input order, each sized by
its `binary_data_size` parameter (little-endian, row-major). Outputs are binary when asked
with `binary_data` (per output) or `binary_data_output` (per request; the per-output setting
wins); the response then carries `Inference-Header-Content-Length` too.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from typing import Any

import numpy as np
import orjson

from . import __version__, unfolding
from .errors import InvalidInput, TooLarge
from .formats import json_array, too_many_rows
from .registry import Entry

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "parameters"]
PLATFORM = "unfold"
INPUT = "activations"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
"""Fixed-size protocol datatypes and their little-endian numpy dtypes (BYTES has no size)."""
ACTIVATION_DATATYPES = ("FP32", "FP64", "FP16")
"""Accepted for `activations`; FP64 and FP16 are converted to float32 (the solvers' dtype)."""

OUTPUTS: dict[str, str] = {
    "codes": "FP32",
    "indices": "INT32",
    "values": "FP32",
    "residual_norm": "FP32",
    "relative_error": "FP32",
    "l0": "INT32",
    "n_iter": "INT32",
    "status": "INT32",
    "duality_gap": "FP32",
}
"""Every output a model produces, in the order they are returned when none are requested."""
CERTIFICATE_OUTPUTS: dict[str, str] = {
    "certified": "BOOL",
    "erc": "FP32",
    "erc_margin": "FP32",
    "support_stability": "FP32",
}
"""The outputs of a request with the parameter ``certify: true`` (returned after `OUTPUTS`
when none are requested; NaN and infinities are null in JSON tensors)."""

PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})
IGNORED_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
)
"""Request parameters tritonclient may send that do not apply here (no sequences, no priority
levels; timeouts come from the server's own `request_timeout_s`)."""


def bad(message: str, code: str = "invalid_request") -> InvalidInput:
    return InvalidInput(message, code=code)


# Metadata.


def server_metadata() -> dict:
    return {"name": "unfold", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(entry: Entry) -> dict:
    record = entry.record
    width = -1  # padded sparse width depends on the method and its parameters
    shapes = {
        "codes": [-1, record.n_features],
        "indices": [-1, width],
        "values": [-1, width],
    }
    return {
        "name": record.name,
        "versions": [record.id],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, record.d_model]}],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": shapes.get(name, [-1])}
            for name, datatype in {**OUTPUTS, **CERTIFICATE_OUTPUTS}.items()
        ],
    }


def check_version(entry: Entry, version: str | None) -> None:
    """A version in the path must be the dictionary's content id (its only version)."""
    from .errors import NotFound

    if version is not None and version != entry.record.id:
        raise NotFound(
            f"model {entry.record.name!r} has no version {version!r}; its only version is its "
            f"content id {entry.record.id!r} (or leave the version out)"
        )


# Request bodies.


def content_encoding(header: str | None) -> str:
    """The body's `Content-Encoding`: identity, gzip or deflate (others are refused)."""
    encoding = (header or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise bad(
            f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or no encoding",
            code="unsupported_encoding",
        )
    return encoding


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its `content_encoding`, refused (413 `body_too_large`) once it expands
    past `limit` bytes: zlib writes at most `limit + 1` bytes, so a small body that would
    expand without bound costs no more memory than the limit. zlib releases the interpreter
    while it inflates: run this on a worker thread."""
    if encoding == "identity":
        return body
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        expanded = inflater.decompress(body, limit + 1)
        if len(expanded) <= limit:
            expanded += inflater.flush()
    except zlib.error as error:
        raise bad(f"the body is not valid {encoding} data ({error})") from None
    if len(expanded) > limit:
        raise TooLarge(
            f"the {encoding}-compressed body expands beyond the limit of {limit} bytes "
            "(UNFOLD_MAX_BODY_BYTES); send fewer rows per request",
            code="body_too_large",
        )
    if not inflater.eof:
        raise bad(f"the body is not valid {encoding} data (it ends mid-stream)")
    return expanded


@dataclasses.dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: not said; the request's `binary_data_output` decides


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    id: str | None
    activations: np.ndarray  # float32, as sent: (batch, d_model) or (d_model,)
    params: Any  # validated `schemas.UnfoldParams`
    outputs: tuple[RequestedOutput, ...]
    binary_output: bool


def json_length(body: bytes, header_length: str | None) -> int:
    """How many of the body's bytes are JSON: the `Inference-Header-Content-Length` when
    binary tensor data follows, else all."""
    try:
        return min(len(body), int(header_length)) if header_length is not None else len(body)
    except ValueError:
        return len(body)


def parse_infer_request(
    body: bytes, header_length: str | None, max_rows: int, d_model: int
) -> tuple[InferRequest, np.ndarray]:
    """The decoded request and its activations as a float32 (batch, d_model) array."""
    decoded = decode_infer_request(body, header_length, max_rows)
    return decoded, unfolding.activations_array(decoded.activations, d_model)


def decode_infer_request(body: bytes, header_length: str | None, max_rows: int) -> InferRequest:
    """Parse an inference request (JSON, optionally followed by binary tensor data). An input
    of more than `max_rows` rows is refused (`too_many_rows`) from its declared shape, before
    its data is read."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if size < 0 or size > len(body):
            raise bad(
                f"{HEADER_LENGTH} is {header_length!r}, but the body holds {len(body)} bytes; "
                "it must be the length of the JSON header, at most the body's length"
            )
        header, binary = body[:size], memoryview(body)[size:]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        hint = "" if header_length else f"; binary tensor data needs the {HEADER_LENGTH} header"
        raise bad(f"the inference request is not valid JSON ({error}){hint}") from None
    if not isinstance(request, dict):
        raise bad("the inference request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("the request `id` must be a string")
    parameters = _object(request.get("parameters"), "request parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad("`binary_data_output` must be true or false")
    activations = _decode_inputs(request.get("inputs"), binary, max_rows)
    params = _solver_params(parameters)
    return InferRequest(
        id=request_id,
        activations=activations,
        params=params,
        outputs=_requested_outputs(request.get("outputs"), params.certify),
        binary_output=binary_output,
    )


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object")
    return value


def _decode_inputs(inputs, binary, max_rows: int) -> np.ndarray:
    if not isinstance(inputs, list) or not inputs:
        raise bad(f"the request needs `inputs`: a list holding the one input {INPUT!r}")
    offset, found = 0, None
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise bad("each input must be a JSON object {name, shape, datatype, data}")
        name = tensor.get("name")
        if name != INPUT:
            raise bad(f"unknown input {name!r}: this model takes one input, {INPUT!r}")
        if found is not None:
            raise bad(f"input {INPUT!r} is given twice")
        found, offset = _decode_tensor(tensor, binary, offset, max_rows)
    if offset != len(binary):
        raise bad(
            f"{len(binary) - offset} bytes of binary data follow the inputs' declared "
            f"binary_data_size ({offset} bytes); the sizes must add up to the body's length "
            f"after the {HEADER_LENGTH} bytes of JSON"
        )
    return _activations(found)


def _decode_tensor(tensor: dict, binary, offset: int, max_rows: int) -> tuple[np.ndarray, int]:
    name = tensor["name"]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"input {name!r}: `shape` must be a list of non-negative integers")
    if len(shape) not in (1, 2):
        raise bad(
            f"input {name!r} has shape {shape}; send [batch, d_model] or [d_model]",
            code="shape_mismatch",
        )
    rows = shape[0] if len(shape) == 2 else 1
    if rows > max_rows:
        raise too_many_rows(rows, max_rows)
    datatype = tensor.get("datatype")
    if datatype not in ACTIVATION_DATATYPES:
        what = "datatype" if datatype in DATATYPES or datatype == "BYTES" else "unknown datatype"
        raise bad(
            f"input {name!r} has {what} {datatype!r}; send FP32 "
            "(FP64 and FP16 are accepted and converted to float32)",
            code="invalid_datatype",
        )
    dtype = DATATYPES[datatype]
    parameters = _object(tensor.get("parameters"), f"input {name!r} parameters")
    if "shared_memory_region" in parameters:
        raise bad(f"input {name!r}: shared memory is not supported; send the data in the body")
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise bad(f"input {name!r} has both `data` and binary_data_size; send one of them")
        if offset + size > len(binary):
            raise bad(
                f"input {name!r} declares binary_data_size={size}, but only "
                f"{len(binary) - offset} bytes of binary data follow the JSON header"
                + ("" if len(binary) else f" (send the {HEADER_LENGTH} header)")
            )
        if size != count * dtype.itemsize:
            raise bad(
                f"input {name!r}: binary_data_size={size} bytes, but shape {shape} of "
                f"{datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape), offset + size
    if "data" not in tensor:
        raise bad(f"input {name!r} has neither `data` nor a binary_data_size parameter")
    # Numbers only (no booleans or strings), flat in row-major order or nested by shape.
    array = json_array(
        tensor["data"], f"input {name!r} data", shape_code="invalid_shape", dtype=dtype
    )
    if array.size != count:
        raise bad(
            f"input {name!r}: `data` holds {array.size} values, but shape {shape} needs {count}"
        )
    return array.reshape(shape), offset


def _activations(array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float32 range becomes Inf: refused later
        return array.astype(np.float32, copy=False)


def _solver_params(parameters: dict):
    """The solver settings among the request parameters, validated like the v1 API's."""
    params = {
        key: value
        for key, value in parameters.items()
        if key not in PROTOCOL_PARAMETERS and key not in IGNORED_PARAMETERS
    }
    if "compare_encoder" in params:
        raise bad(
            "parameter 'compare_encoder' is served by the v1 API only "
            "(POST /v1/dictionaries/{ref}/unfold)"
        )
    for key in ("output", "top"):
        if key in params:
            raise bad(
                f"parameter {key!r} is not used by this protocol: list the outputs you want in "
                "the request's `outputs` (codes, indices, values, diagnostics)"
            )
    return unfolding.validate(unfolding.PARAMS_ADAPTER, params)


def _requested_outputs(outputs, certify: bool) -> tuple[RequestedOutput, ...]:
    produced = {**OUTPUTS, **CERTIFICATE_OUTPUTS} if certify else OUTPUTS
    if outputs is None:
        return tuple(RequestedOutput(name, None) for name in produced)
    if not isinstance(outputs, list):
        raise bad("`outputs` must be a list of {name, parameters}")
    requested, seen = [], set()
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name in CERTIFICATE_OUTPUTS and not certify:
            raise bad(f"output {name!r} needs the request parameter `certify: true`")
        if name not in produced:
            raise bad(f"unknown output {name!r}; this model produces {list(produced)}")
        if name in seen:
            raise bad(f"output {name!r} is requested twice")
        seen.add(name)
        parameters = _object(output.get("parameters"), f"output {name!r} parameters")
        if parameters.get("classification"):
            raise bad("the classification extension is not supported")
        if "shared_memory_region" in parameters:
            raise bad(f"output {name!r}: shared memory is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise bad(f"output {name!r}: binary_data must be true or false")
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


# Responses.


def output_array(answer: unfolding.Answer, name: str) -> np.ndarray:
    if name in CERTIFICATE_OUTPUTS:
        array = getattr(answer.certificate, name)
    elif name == "codes":
        array = answer.result.to_dense()
    else:
        array = getattr(answer.result, name)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype(name)])


def datatype(output: str) -> str:
    return OUTPUTS.get(output) or CERTIFICATE_OUTPUTS[output]


def encode_infer_response(
    model: Entry, request: InferRequest, answer: unfolding.Answer
) -> tuple[bytes, int | None]:
    """(body, JSON header length if binary outputs follow it, else None)."""
    outputs, chunks = [], []
    for output in request.outputs:
        array = output_array(answer, output.name)
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": datatype(output.name),
            "shape": list(array.shape),
        }
        binary = request.binary_output if output.binary is None else output.binary
        if binary:
            data = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = array.ravel()  # NaN (duality_gap of OMP) becomes null
        outputs.append(tensor)
    response: dict[str, Any] = {"model_name": model.record.name, "model_version": model.record.id}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def compress(body: bytes, accept_encoding: str | None, minimum: int = 1024):
    """(body, Content-Encoding or None): gzip or deflate when the client accepts it."""
    if len(body) < minimum or not accept_encoding:
        return body, None
    accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None
