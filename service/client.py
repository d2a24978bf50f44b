"""Python clients of the Unfold REST API: `UnfoldClient` (blocking) and `AsyncUnfoldClient`.

    >>> from service.client import UnfoldClient
    >>> with UnfoldClient("http://127.0.0.1:8000") as client:
    ...     client.register_saelens("gpt2-l8", "path/to/sae_folder")
    ...     result = client.unfold("gpt2-l8", activations, method="omp", k=32)
    ...     result.indices, result.values, result.relative_error, result.to_dense()

Arrays travel as binary: activations go up as `.npy` (parameters in the query string) and
results come back as safetensors. Registering a file uploads only what the server keeps,
streamed from disk: of a safetensors file or SAELens folder, a safetensors file synthesized on
the fly with just the directions and the bias (`W_dec`, `b_dec`; of a SAELens folder also its
encoder, `W_enc`, `b_enc`, `threshold`, unless `encoder=False`), in their own dtype; a `.npy`
file as it is. Uploads report `progress(sent, total)` in bytes.

Large batches go in chunks (one request after the other) and are reassembled. By default the
chunk size is automatic: the first is sized from the dictionary's shape and the method's work
per row so that it takes a fraction of the smaller of the client's and the server's timeouts,
the next ones from the measured time of the previous (`ChunkSizer`); `chunk_rows=` fixes it.

Answers 429 and 503 are retried with exponential backoff, honouring `Retry-After`, at most
`max_retries` times; so are connection failures: a failure to connect for any call (nothing
was sent), a connection lost after sending only for idempotent calls (every call of this API:
reads, deletes, unfolding, and registration, idempotent by content). A timeout once connected
is an `UnfoldTimeoutError`, never retried. Every other error raises an `UnfoldAPIError`
subclass carrying the server's status, machine-readable code and message.

Both clients share one implementation: each operation is written once as a generator that
yields `httpx.Request`s and receives `httpx.Response`s, or has the `UnfoldClientError` of a
failed one raised where it yielded (`_Operations`); the blocking and the async client only
differ in how they send them (`_run`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import functools
import io
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from .encoder import TENSORS as ENCODER_TENSORS
from .errors import InvalidInput
from .formats import (
    SafetensorsFile,
    TensorEntry,
    dictionary_tensor_names,
    map_file,
    safetensors_header,
)
from .schemas import OMPParams

NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
DIAGNOSTICS = ("residual_norm", "relative_error", "l0", "n_iter", "status", "duality_gap")
RETRY_STATUSES = frozenset({429, 503})

__all__ = [
    "AsyncUnfoldClient",
    "AuthenticationError",
    "ChunkSizer",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "SafetensorsSubset",
    "ServerTimeoutError",
    "UnfoldAPIError",
    "UnfoldClient",
    "UnfoldClientError",
    "UnfoldConnectionError",
    "UnfoldResult",
    "UnfoldTimeoutError",
]


# Errors.


class UnfoldClientError(Exception):
    """Anything that went wrong talking to an Unfold server."""


class UnfoldConnectionError(UnfoldClientError):
    """The server could not be reached (down, wrong URL, network failure)."""


class UnfoldTimeoutError(UnfoldClientError):
    """The server was reached but did not answer within the client's `timeout`."""


class UnfoldAPIError(UnfoldClientError):
    """The server answered with an error. `code` is its machine-readable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message


class InvalidInputError(UnfoldAPIError):
    """400/422: shapes, values or parameters the server cannot use."""


class AuthenticationError(UnfoldAPIError):
    """401: missing or wrong API key."""


class NotFoundError(UnfoldAPIError):
    """404: no dictionary with that id or name."""


class ConflictError(UnfoldAPIError):
    """409: name taken, or the content is registered under another name."""


class PayloadTooLargeError(UnfoldAPIError):
    """413: the request body is over the server's limit (lower `chunk_rows`)."""


class OverloadedError(UnfoldAPIError):
    """429/503 after every retry: the server is busy or not ready. `retry_after` in seconds."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(status, code, message)
        self.retry_after = retry_after


class ServerTimeoutError(UnfoldAPIError):
    """504: the solve did not finish within the server's request timeout."""


ERRORS: dict[int, type[UnfoldAPIError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
    429: OverloadedError,
    503: OverloadedError,
    504: ServerTimeoutError,
}


def api_error(response: httpx.Response) -> UnfoldAPIError:
    """The typed error of an error response (v1 ``{"error": {"code", "message"}}`` or the
    Open Inference Protocol's ``{"error": "..."}``)."""
    code, message = "http_error", response.reason_phrase or f"HTTP {response.status_code}"
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code, message = str(error.get("code", code)), str(error.get("message", message))
    elif isinstance(error, str):
        message = error
    elif response.content:
        message = response.text[:500]
    cls = ERRORS.get(response.status_code, UnfoldAPIError)
    if cls is OverloadedError:
        return OverloadedError(response.status_code, code, message, retry_after(response))
    return cls(response.status_code, code, message)


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Results.


@dataclasses.dataclass(frozen=True)
class UnfoldResult:
    """Sparse codes of activations of shape (*lead, d_model), in the dictionary's units.

    Row ``i`` has its non-zeros at ``indices[i, :l0[i]]`` with ``values[i, :l0[i]]``; padding
    slots hold index -1 and value 0. `lead` is the activations' leading shape: (batch,) for a
    batch, () for one vector, (batch, pos) for a TransformerLens-style (batch, pos, d_model).

    Attributes:
        indices: int32 of shape (*lead, width).
        values: float32 of shape (*lead, width).
        residual_norm, relative_error, duality_gap: float32 of shape lead (duality_gap NaN
            for OMP).
        l0, n_iter, status: int32 of shape lead.
        n_features: the dictionary's number of features (the width of `to_dense`).
    """

    indices: np.ndarray
    values: np.ndarray
    residual_norm: np.ndarray
    relative_error: np.ndarray
    l0: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    duality_gap: np.ndarray
    n_features: int

    def to_dense(self) -> np.ndarray:
        """Dense codes of shape (*lead, n_features)."""
        lead = self.l0.shape
        indices = self.indices.reshape(-1, self.indices.shape[-1])
        values = self.values.reshape(-1, self.values.shape[-1])
        dense = np.zeros((indices.shape[0], self.n_features), dtype=np.float32)
        rows, slots = np.nonzero(indices >= 0)
        dense[rows, indices[rows, slots]] = values[rows, slots]
        return dense.reshape(*lead, self.n_features)

    def __len__(self) -> int:
        return self.l0.shape[0] if self.l0.ndim else 1

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], n_features: int) -> UnfoldResult:
        return cls(
            indices=np.asarray(tensors["indices"], np.int32),
            values=np.asarray(tensors["values"], np.float32),
            **{name: np.asarray(tensors[name]) for name in DIAGNOSTICS},
            n_features=n_features,
        )

    @classmethod
    def from_json(cls, body: dict, n_features: int) -> UnfoldResult:
        """From a v1 JSON answer with sparse output."""
        codes = body["codes"]
        width = max((len(code["indices"]) for code in codes), default=0)
        indices = np.full((len(codes), width), -1, np.int32)
        values = np.zeros((len(codes), width), np.float32)
        for row, code in enumerate(codes):
            indices[row, : len(code["indices"])] = code["indices"]
            values[row, : len(code["values"])] = code["values"]
        gap = [np.nan if g is None else g for g in body["duality_gap"]]
        return cls(
            indices=indices,
            values=values,
            residual_norm=np.asarray(body["residual_norm"], np.float32),
            relative_error=np.asarray(body["relative_error"], np.float32),
            l0=np.asarray(body["l0"], np.int32),
            n_iter=np.asarray(body["n_iter"], np.int32),
            status=np.asarray(body["status"], np.int32),
            duality_gap=np.asarray(gap, np.float32),
            n_features=n_features,
        )

    @classmethod
    def concatenate(cls, parts: list[UnfoldResult]) -> UnfoldResult:
        """Results of consecutive row chunks, as one (sparse widths padded to the widest)."""
        if len(parts) == 1:
            return parts[0]
        width = max(part.indices.shape[1] for part in parts)

        def pad(array: np.ndarray, fill) -> np.ndarray:
            extra = width - array.shape[1]
            return np.pad(array, ((0, 0), (0, extra)), constant_values=fill) if extra else array

        return cls(
            indices=np.concatenate([pad(p.indices, -1) for p in parts]),
            values=np.concatenate([pad(p.values, 0) for p in parts]),
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in DIAGNOSTICS},
            n_features=parts[0].n_features,
        )

    def reshape(self, lead: tuple[int, ...]) -> UnfoldResult:
        """Rows (batch, ...) given the leading shape `lead` (batch = prod(lead))."""
        return dataclasses.replace(
            self,
            indices=self.indices.reshape(*lead, self.indices.shape[-1]),
            values=self.values.reshape(*lead, self.values.shape[-1]),
            **{name: getattr(self, name).reshape(lead) for name in DIAGNOSTICS},
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """Every array by name (what `unfold run` writes to safetensors)."""
        return {
            "indices": self.indices,
            "values": self.values,
            **{name: getattr(self, name) for name in DIAGNOSTICS},
        }


# Request building and response parsing, shared by both clients.


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def query_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def activation_rows(activations) -> tuple[np.ndarray, tuple[int, ...]]:
    """Activations as float32 rows (n, d_model) and their leading shape."""
    array = np.asarray(activations, dtype=np.float32)
    if array.ndim == 0:
        raise ValueError("activations must have shape (..., d_model), got a scalar")
    lead = array.shape[:-1]
    rows = array.reshape(-1, array.shape[-1])
    if rows.shape[0] == 0:
        raise ValueError(f"activations of shape {array.shape} hold no rows")
    return rows, lead


# Uploads: only the tensors the server keeps, streamed from the file.

Progress = Callable[[int, int], None]
"""`progress(sent, total)`: bytes of the request body sent so far, of `total`. Called with 0
when the body starts, then after each chunk; a retried upload starts again from 0."""

UPLOAD_CHUNK = 1 << 20  # bytes read from a file at a time


class SafetensorsSubset(io.RawIOBase):
    """A safetensors file holding only some tensors of another, built as it is read: a new
    header (the tensors' names, dtypes and shapes, laid out one after the other), then each
    tensor's bytes read from the source file on demand. Nothing is converted or held in memory.

    Readable and seekable with a known length, so httpx sends it as a multipart part with a
    Content-Length and reads it again from the start on a retry.

        >>> with open("sae_weights.safetensors", "rb") as source:
        ...     tensors = SafetensorsFile(map_file(source), "sae_weights.safetensors").tensors
        ...     subset = SafetensorsSubset(source, {"W_dec": tensors["W_dec"]})
        ...     httpx.post(url, files={"file": ("W_dec.safetensors", subset)})
    """

    def __init__(self, source: BinaryIO, tensors: dict[str, TensorEntry]):
        super().__init__()
        self.source = source
        self._header = safetensors_header(
            {name: (entry.dtype, entry.shape, entry.nbytes) for name, entry in tensors.items()}
        )
        offset, self._pieces = 0, []
        for entry in tensors.values():
            self._pieces.append((offset, offset + entry.nbytes, entry.start))
            offset += entry.nbytes
        self.size = len(self._header) + offset
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        """Up to len(buffer) bytes from the current position: of the header, or of one tensor."""
        view, position = memoryview(buffer).cast("B"), self._position
        if position >= self.size or not len(view):
            return 0
        if position < len(self._header):
            count = min(len(view), len(self._header) - position)
            view[:count] = self._header[position : position + count]
        else:
            data = position - len(self._header)
            begin, end, source = next(piece for piece in self._pieces if data < piece[1])
            self.source.seek(source + data - begin)
            count = self.source.readinto(view[: min(len(view), end - data)])
            if not count:
                raise OSError(f"{self.source.name} ended early: was it truncated while read?")
        self._position += count
        return count


class Upload(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A request body of `total` bytes streamed from `chunks()` (a fresh iterator each time, so
    a retry sends it again from the start), reporting `progress(sent, total)`.

    The async client reads files synchronously, one chunk (at most `UPLOAD_CHUNK`) at a time.
    """

    def __init__(self, chunks: Callable[[], Iterable[bytes]], total: int, progress: Progress):
        self.chunks, self.total, self.progress = chunks, total, progress

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        self.progress(sent, self.total)
        for chunk in self.chunks():
            sent += len(chunk)
            self.progress(sent, self.total)
            yield chunk

    async def __aiter__(self):
        for chunk in self:
            yield chunk


def file_chunks(file: BinaryIO) -> Iterator[bytes]:
    """The whole of `file`, from its start, in chunks of `UPLOAD_CHUNK` bytes."""
    file.seek(0)
    while chunk := file.read(UPLOAD_CHUNK):
        yield chunk


def no_progress(sent: int, total: int) -> None:
    pass


# Automatic chunking of unfold requests.

ASSUMED_MULTIPLY_ADDS_PER_S = 2e10
"""Throughput the first chunk is sized for. Measured: OMP k=64 on a 24576 x 768 dictionary runs
~150 rows/s on a 2-core CPU, ~1.8e11 multiply-adds/s; assumed ~9x less, for a slower or busier
server, a first call that pays for compilation, and work the count below leaves out."""
TIMEOUT_FRACTION = 1 / 8
"""A call aims at this fraction of the smaller of the client's and the server's timeouts."""
MAX_GROWTH = 4
"""A chunk is at most this many times the previous one (one fast call is not trusted more)."""
MAX_CHUNK_ROWS = 65536
DEFAULT_TIMEOUT_S = 60.0  # when neither the client nor the server states one
DEFAULT_PASSES = {"omp": OMPParams.model_fields["k"].default, "l1": 1000}
"""Passes over the dictionary per row when the request does not say: OMP's default k (one
correlation pass per atom); the LASSO methods' max_iter (ISTA's and FISTA's default; the
lasso's homotopy steps, 10000 at most by default, each cost far less than a pass)."""


def passes_per_row(method: str, params: dict, n_features: int, d_model: int) -> int:
    """Passes over the (n_features, d_model) dictionary one row costs: OMP's k (d_model when
    k=None: stopping on `tol` only), the iterative methods' max_iter."""
    if method == "omp":
        k = params.get("k", DEFAULT_PASSES["omp"])
        return max(1, min(d_model if k is None else int(k), n_features, d_model))
    return max(1, int(params.get("max_iter") or DEFAULT_PASSES["l1"]))


def floor_power_of_two(value: float) -> int:
    """The largest power of two <= value (1 below 1): the server pads calls to powers of two,
    so such chunks waste nothing and compile few programs."""
    return 1 << max(0, math.floor(math.log2(value))) if value >= 1 else 1


@dataclasses.dataclass
class ChunkSizer:
    """Rows per unfold request so that one request takes about `target_s` seconds.

    Starts at `rows` (`ChunkSizer.first`); `observe` then adapts it from the measured time of
    each request: a request slower than the target shrinks the chunk in proportion; a full
    chunk faster than it grows the chunk towards the measured rate, at most `MAX_GROWTH`
    times. Chunks are powers of two within [1, upper].
    """

    rows: int
    target_s: float
    upper: int

    @classmethod
    def first(cls, n_features: int, d_model: int, passes: int, target_s: float, upper: int):
        """Sized for `ASSUMED_MULTIPLY_ADDS_PER_S`, each row costing `passes` passes over the
        (n_features, d_model) dictionary."""
        rate = ASSUMED_MULTIPLY_ADDS_PER_S / (passes * n_features * d_model)  # rows/s
        return cls(min(floor_power_of_two(rate * target_s), upper), target_s, upper)

    def observe(self, rows: int, seconds: float) -> None:
        """A request of `rows` rows took `seconds` (waiting and retries included)."""
        fitting = rows * self.target_s / max(seconds, 1e-6)  # rows that take the target
        if seconds > self.target_s:
            self.rows = min(floor_power_of_two(fitting), self.upper)
        elif rows >= self.rows:  # a partial chunk says little about a full one
            grown = floor_power_of_two(min(fitting, self.rows * MAX_GROWTH))
            self.rows = max(self.rows, min(grown, self.upper))


Plan = Generator[httpx.Request, httpx.Response, Any]


class _Operations:
    """Every API operation, written once as a plan of requests; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        chunk_rows: int | None = None,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1, or None (automatic)")
        self.base_url = base_url.rstrip("/")
        self.chunk_rows = chunk_rows
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._shapes: dict[str, tuple[int, int]] = {}  # ref -> (n_features, d_model)
        self._sizers: dict[str, dict[tuple, ChunkSizer]] = {}  # ref -> method and params -> ...
        self._limits: dict | None = None  # the server's, from GET /v1/info
        self._clock = time.monotonic

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs):
        """A request; `idempotent` ones are retried when the connection fails after sending."""
        request = self._http.build_request(method, path, **kwargs)
        request.extensions["unfold.idempotent"] = idempotent
        return request

    def _upload(self, request: httpx.Request, chunks, progress: Progress | None):
        """`request` (with its Content-Length) with a body streamed from `chunks()` instead."""
        total = int(request.headers["Content-Length"])
        return httpx.Request(
            request.method,
            request.url,
            headers=request.headers,
            extensions=request.extensions,
            stream=Upload(chunks, total, progress or no_progress),
        )

    def transport_error(self, error: httpx.TransportError, retries: int = 0) -> UnfoldClientError:
        """The client's error for a failed exchange: a timeout once connected is a timeout,
        anything else (refused, unresolvable, connect timeout, connection lost) a connection
        error."""
        if isinstance(error, httpx.TimeoutException) and not isinstance(
            error, httpx.ConnectTimeout
        ):
            return UnfoldTimeoutError(
                f"no answer from {self.base_url} within the client's timeout ({self.timeout} s): "
                "raise timeout=, or send fewer rows per request (chunk_rows)"
            )
        after = f" (after {retries} retries)" if retries else ""
        return UnfoldConnectionError(f"cannot reach {self.base_url}{after}: {error}")

    def backoff_delay(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response` (attempt 0, 1, ...), or None."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        told = retry_after(response)
        return self.backoff_delay(attempt) if told is None else min(told, self.max_backoff)

    def connection_retry_delay(
        self, error: httpx.TransportError, request: httpx.Request, attempt: int
    ) -> float | None:
        """Seconds to wait before sending `request` again after `error`, or None: a failure to
        connect is retried (nothing was sent), a connection lost after sending only for an
        idempotent request, a timeout never."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            return self.backoff_delay(attempt)
        lost = isinstance(error, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)
        if lost and request.extensions.get("unfold.idempotent"):
            return self.backoff_delay(attempt)
        return None

    @staticmethod
    def checked(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise api_error(response)
        return response

    # Dictionaries.

    def _register_plan(self, name, directions, bias, labels, metadata) -> Plan:
        if directions is None:
            raise ValueError("give the directions: an array of shape (n_features, d_model)")
        directions = np.asarray(directions, dtype=np.float32)
        if labels is not None or metadata is not None:
            body = {
                "name": name,
                "directions": directions.tolist(),
                "bias": None if bias is None else np.asarray(bias, np.float32).tolist(),
                "labels": None if labels is None else list(labels),
                "metadata": metadata or {},
            }
            request = self._request("POST", "/v1/dictionaries", json=body)
        elif bias is not None:
            tensors = {"directions": directions, "bias": np.asarray(bias, np.float32)}
            request = self._request(
                "POST",
                "/v1/dictionaries",
                data={"name": name, "tensor": "directions", "bias_tensor": "bias"},
                files={"file": ("dictionary.safetensors", save_safetensors(tensors))},
            )
        else:
            request = self._request(
                "POST",
                "/v1/dictionaries",
                params={"name": name},
                content=npy_bytes(directions),
                headers={"Content-Type": NPY},
            )
        return self._forget((yield request).json())

    def _register_file_plan(self, name, path, tensor, bias_tensor, progress) -> Plan:
        path = Path(path)
        if path.is_dir():
            if tensor or bias_tensor:
                raise ValueError("tensor and bias_tensor apply to .safetensors files only")
            return (yield from self._register_saelens_plan(name, path, progress, True))
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if tensor or bias_tensor:
                raise ValueError("tensor and bias_tensor apply to .safetensors files only")
            with open(path, "rb") as file:
                request = self._request(
                    "POST",
                    "/v1/dictionaries",
                    params={"name": name},
                    headers={"Content-Type": NPY, "Content-Length": str(path.stat().st_size)},
                )
                request = self._upload(request, functools.partial(file_chunks, file), progress)
                response = yield request
        elif suffix == ".safetensors":
            response = yield from self._upload_safetensors(
                name, path, None, tensor, bias_tensor, progress
            )
        else:
            raise ValueError(
                f"{path}: register a .npy or .safetensors file, or a SAELens folder "
                "(cfg.json + sae_weights.safetensors)"
            )
        return self._forget(response.json())

    def _register_saelens_plan(self, name, folder, progress, encoder: bool) -> Plan:
        folder = Path(folder)
        weights, config = folder / "sae_weights.safetensors", folder / "cfg.json"
        if not weights.is_file():
            raise ValueError(f"{folder} is not a SAELens folder: no sae_weights.safetensors")
        config = config if config.is_file() else None
        response = yield from self._upload_safetensors(
            name, weights, config, None, None, progress, encoder=encoder
        )
        return self._forget(response.json())

    def _upload_safetensors(
        self, name, path, config, tensor, bias_tensor, progress, *, encoder: bool = False
    ) -> Plan:
        """Register the directions and bias of the safetensors file at `path` (chosen by the
        server's rule, `formats.dictionary_tensor_names`), and with `encoder` the encoder's
        tensors it has (`encoder.TENSORS`), sent alone as a `SafetensorsSubset`, with the
        SAELens `config` file (cfg.json) when given. Errors in the file raise ValueError
        before anything is sent."""
        with open(path, "rb") as source:
            try:
                tensors = SafetensorsFile(map_file(source), str(path)).tensors
                shapes = {key: entry.shape for key, entry in tensors.items()}
                tensor, bias_tensor = dictionary_tensor_names(shapes, tensor, bias_tensor)
            except InvalidInput as error:  # the file itself: its message names it
                raise ValueError(error.message) from None
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
            data = {"name": name, "tensor": tensor}
            if bias_tensor is not None:
                data["bias_tensor"] = bias_tensor
            names = (tensor, bias_tensor, *(ENCODER_TENSORS if encoder else ()))
            kept = {key: tensors[key] for key in names if key is not None and key in tensors}
            files = {
                "file": (path.name, SafetensorsSubset(source, kept), "application/octet-stream")
            }
            if config is not None:
                files["cfg"] = (config.name, config.read_bytes(), "application/json")
            request = self._request("POST", "/v1/dictionaries", data=data, files=files)
            return (yield self._upload(request, request.stream.__iter__, progress))

    def _forget(self, info: dict) -> dict:
        for ref in (info.get("name"), info.get("id")):
            self._shapes.pop(ref, None)
            self._sizers.pop(ref, None)
        return info

    def _list_plan(self) -> Plan:
        return (yield self._request("GET", "/v1/dictionaries")).json()["dictionaries"]

    def _get_plan(self, ref: str) -> Plan:
        info = (yield self._request("GET", f"/v1/dictionaries/{ref}")).json()
        self._shapes[ref] = (info["n_features"], info["d_model"])
        return info

    def _delete_plan(self, ref: str) -> Plan:
        yield self._request("DELETE", f"/v1/dictionaries/{ref}")
        self._shapes.pop(ref, None)
        self._sizers.pop(ref, None)

    def _ready_plan(self) -> Plan:
        return (yield self._request("GET", "/readyz")).status_code == 200

    def _limits_plan(self) -> Plan:
        """The server's `limits` (GET /v1/info), fetched once; {} if it does not say."""
        if self._limits is None:
            try:
                info = (yield self._request("GET", "/v1/info")).json()
            except (NotFoundError, ValueError):  # an older server, or not JSON
                info = {}
            limits = info.get("limits") if isinstance(info, dict) else None
            self._limits = limits if isinstance(limits, dict) else {}
        return self._limits

    # Unfolding.

    def _sizer_plan(self, ref, method, params, shape, row_bytes) -> Plan:
        """The `ChunkSizer` of dictionary `ref` with `method` and `params` (kept across calls).
        Its target is `TIMEOUT_FRACTION` of the smaller of the client's `timeout` and the
        server's `request_timeout_s`; its upper bound the least of `MAX_CHUNK_ROWS`, the
        server's `max_rows`, and the rows of `row_bytes` bytes that fit its `max_body_bytes`."""
        key = (method, tuple(sorted((k, repr(v)) for k, v in params.items())))
        sizer = self._sizers.get(ref, {}).get(key)
        if sizer is None:
            limits = yield from self._limits_plan()

            def number(value):
                return value if isinstance(value, int | float) and value > 0 else None

            timeouts = [t for t in (self.timeout, limits.get("request_timeout_s")) if number(t)]
            upper = [MAX_CHUNK_ROWS]
            if number(limits.get("max_rows")):
                upper.append(int(limits["max_rows"]))
            if number(limits.get("max_body_bytes")):  # 4 KiB for the .npy header and the rest
                upper.append((int(limits["max_body_bytes"]) - 4096) // row_bytes)
            sizer = ChunkSizer.first(
                *shape,
                passes_per_row(method, params, *shape),
                target_s=TIMEOUT_FRACTION * min(timeouts, default=DEFAULT_TIMEOUT_S),
                upper=max(1, min(upper)),
            )
            self._sizers.setdefault(ref, {})[key] = sizer
        return sizer

    def _unfold_plan(self, ref: str, activations, method: str, params: dict) -> Plan:
        rows, lead = activation_rows(activations)
        if ref not in self._shapes:
            yield from self._get_plan(ref)
        n_features, d_model = self._shapes[ref]
        # A parameter explicitly None (e.g. k=None with tol) cannot go in a query string.
        as_json = any(value is None for value in params.values())
        sizer = None
        if self.chunk_rows is None:
            row_bytes = d_model * (24 if as_json else 4)  # a float as JSON text: ~24 bytes
            sizer = yield from self._sizer_plan(
                ref, method, params, (n_features, d_model), row_bytes
            )
        query = {"method": method, **{k: query_value(v) for k, v in params.items()}}
        path = f"/v1/dictionaries/{ref}/unfold"
        parts, start = [], 0
        while start < rows.shape[0]:
            chunk = rows[start : start + (self.chunk_rows or sizer.rows)]
            started = self._clock()
            if as_json:
                body = {"activations": chunk.tolist(), "method": method, **params}
                response = yield self._request("POST", path, json=body)
                parts.append(UnfoldResult.from_json(response.json(), n_features))
            else:
                response = yield self._request(
                    "POST",
                    path,
                    params=query,
                    content=npy_bytes(chunk),
                    headers={"Content-Type": NPY, "Accept": SAFETENSORS},
                )
                parts.append(
                    UnfoldResult.from_tensors(load_safetensors(response.content), n_features)
                )
            if sizer is not None:
                sizer.observe(chunk.shape[0], self._clock() - started)
            start += chunk.shape[0]
        return UnfoldResult.concatenate(parts).reshape(lead)


class _Client(_Operations):
    """The public API; `_run` executes a plan (blocking, or as a coroutine in the async twin)."""

    def register(
        self,
        name: str,
        directions=None,
        bias=None,
        labels: list[str] | None = None,
        metadata: dict | None = None,
    ):
        """Register `directions` of shape (n_features, d_model) (and a `bias` of shape
        (d_model,)) under `name`; returns the dictionary's description (id, shape, ...).

        Sent as `.npy` (safetensors when there is a bias; JSON when there are labels or
        metadata, which only the JSON format carries). Idempotent for identical content.
        """
        return self._run(self._register_plan(name, directions, bias, labels, metadata))

    def register_file(
        self,
        name: str,
        path,
        tensor: str | None = None,
        bias_tensor: str | None = None,
        progress: Progress | None = None,
    ):
        """Register a `.npy` file (n_features, d_model), a `.safetensors` file, or a SAELens
        folder (see `register_saelens`); returns the dictionary's description.

        Of a safetensors file only the directions and bias are sent (a `SafetensorsSubset`, in
        their own dtype): the tensor `tensor`, else `W_dec`, else its only 2-D tensor; the
        bias `bias_tensor`, else `b_dec` beside `W_dec`. A `.npy` file is sent as it is. Both
        stream from the file; `progress(sent, total)` is called with the bytes sent. A file
        the client cannot use raises ValueError before anything is sent.
        """
        return self._run(self._register_file_plan(name, path, tensor, bias_tensor, progress))

    def register_saelens(
        self, name: str, folder, progress: Progress | None = None, *, encoder: bool = True
    ):
        """Register a SAELens SAE folder: `W_dec` and `b_dec` of `sae_weights.safetensors`,
        with `encoder` its encoder's tensors too (`W_enc`, `b_enc`, `threshold`: the server
        keeps a standard, jumprelu or topk encoder as the baseline of `compare_encoder`),
        streamed from the file without its other tensors, and `cfg.json`; `progress(sent,
        total)` is called with the bytes sent."""
        return self._run(self._register_saelens_plan(name, folder, progress, encoder))

    def list(self):
        """Descriptions of every registered dictionary."""
        return self._run(self._list_plan())

    def get(self, ref: str):
        """The description of the dictionary with id or name `ref`."""
        return self._run(self._get_plan(ref))

    def delete(self, ref: str):
        """Delete the dictionary with id or name `ref`."""
        return self._run(self._delete_plan(ref))

    def ready(self):
        """True once the server has loaded every stored dictionary."""
        return self._run(self._ready_plan())

    def unfold(self, ref: str, activations, method: str = "omp", **params):
        """Sparse codes of `activations` of shape (..., d_model) over dictionary `ref`.

        `params` are the method's parameters (omp: k, tol, positive; ista/fista/lasso:
        alpha, tol, max_iter, positive). Returns an `UnfoldResult` whose arrays have the
        activations' leading shape. Rows go in chunks of `chunk_rows`, or, by default, of a
        size chosen per dictionary, method and parameters (`ChunkSizer`: the first from the
        dictionary's shape and the work per row, the next from the time the previous took,
        remembered across calls) so that each request takes about an eighth of the smaller of
        the client's and the server's timeouts.
        """
        return self._run(self._unfold_plan(ref, activations, method, params))


class UnfoldClient(_Client):
    """Blocking client. Use as a context manager, or call `close()`.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        timeout: seconds per HTTP request.
        chunk_rows: most activation rows per unfold request; None (default): automatic
            (see `unfold`).
        max_retries: retries of a 429/503 answer before `OverloadedError`, and of a failed
            connection before `UnfoldConnectionError`.
        backoff: first retry delay in seconds when the server sends no Retry-After (doubles
            each time, at most `max_backoff`).
        transport: an `httpx` transport (tests use `httpx.MockTransport`).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, transport=None, **options):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self._sleep = time.sleep

    def _run(self, plan: Plan):
        try:
            request = next(plan)
            while True:
                try:
                    response = self._send(request)
                except UnfoldClientError as error:
                    request = plan.throw(error)  # the plan may handle it
                else:
                    request = plan.send(response)
        except StopIteration as stop:
            return stop.value
        finally:
            plan.close()  # its open files, when a request failed

    def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as error:
                delay = self.connection_retry_delay(error, request, attempt)
                if delay is None:
                    raise self.transport_error(error, attempt) from error
            else:
                delay = self.retry_delay(response, attempt)
                if delay is None:
                    return self.checked(response)
            self._sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> UnfoldClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncUnfoldClient(_Client):
    """The async twin of `UnfoldClient` (same arguments); every method is awaited:
    ``result = await client.unfold("sae", activations, k=32)``."""

    def __init__(self, base_url: str, api_key: str | None = None, *, transport=None, **options):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self._sleep = asyncio.sleep

    async def _run(self, plan: Plan):
        try:
            request = next(plan)
            while True:
                try:
                    response = await self._send(request)
                except UnfoldClientError as error:
                    request = plan.throw(error)
                else:
                    request = plan.send(response)
        except StopIteration as stop:
            return stop.value
        finally:
            plan.close()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as error:
                delay = self.connection_retry_delay(error, request, attempt)
                if delay is None:
                    raise self.transport_error(error, attempt) from error
            else:
                delay = self.retry_delay(response, attempt)
                if delay is None:
                    return self.checked(response)
            await self._sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncUnfoldClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
