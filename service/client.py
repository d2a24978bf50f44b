"""Python clients of the Unfold REST API: `UnfoldClient` (blocking) and `AsyncUnfoldClient`.

    >>> from service.client import UnfoldClient
    >>> with UnfoldClient("http://127.0.0.1:8000") as client:
    ...     client.register_saelens("gpt2-l8", "path/to/sae_folder")
    ...     result = client.unfold("gpt2-l8", activations, method="omp", k=32)
    ...     result.indices, result.values, result.relative_error, result.to_dense()

Arrays travel as binary: activations go up as `.npy` (parameters in the query string) and
results come back as safetensors. Batches larger than `chunk_rows` rows are sent in chunks
(one after the other) and reassembled. Answers 429 and 503 are retried with exponential
backoff, honouring `Retry-After`, at most `max_retries` times. Every other error raises an
`UnfoldAPIError` subclass carrying the server's status, machine-readable code and message.

Both clients share one implementation: each operation is written once as a generator that
yields `httpx.Request`s and receives `httpx.Response`s (`_Operations`); the blocking and the
async client only differ in how they send them (`_run`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
DIAGNOSTICS = ("residual_norm", "relative_error", "l0", "n_iter", "status", "duality_gap")
RETRY_STATUSES = frozenset({429, 503})

__all__ = [
    "AsyncUnfoldClient",
    "AuthenticationError",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
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


Plan = Generator[httpx.Request, httpx.Response, Any]


class _Operations:
    """Every API operation, written once as a plan of requests; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        chunk_rows: int = 4096,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.chunk_rows = chunk_rows
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._n_features: dict[str, int] = {}

    def _request(self, method: str, path: str, **kwargs) -> httpx.Request:
        return self._http.build_request(method, path, **kwargs)

    def transport_error(self, error: httpx.TransportError) -> UnfoldClientError:
        """The client's error for a failed exchange: a timeout once connected is a timeout,
        anything else (refused, unresolvable, connect timeout) a connection error."""
        if isinstance(error, httpx.TimeoutException) and not isinstance(
            error, httpx.ConnectTimeout
        ):
            return UnfoldTimeoutError(
                f"no answer from {self.base_url} within the client's timeout ({self.timeout} s): "
                "raise timeout=, or send fewer rows per request (chunk_rows)"
            )
        return UnfoldConnectionError(f"cannot reach {self.base_url}: {error}")

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response` (attempt 0, 1, ...), or None."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        told = retry_after(response)
        if told is not None:
            return min(told, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff)

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

    def _register_file_plan(self, name, path, tensor, bias_tensor) -> Plan:
        path = Path(path)
        if path.is_dir():
            return (yield from self._register_saelens_plan(name, path))
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if tensor or bias_tensor:
                raise ValueError("tensor and bias_tensor apply to .safetensors files only")
            request = self._request(
                "POST",
                "/v1/dictionaries",
                params={"name": name},
                content=path.read_bytes(),
                headers={"Content-Type": NPY},
            )
        elif suffix == ".safetensors":
            fields = {"name": name, "tensor": tensor, "bias_tensor": bias_tensor}
            fields = {key: value for key, value in fields.items() if value}
            request = self._request(
                "POST",
                "/v1/dictionaries",
                data=fields,
                files={"file": (path.name, path.read_bytes())},
            )
        else:
            raise ValueError(
                f"{path}: register a .npy or .safetensors file, or a SAELens folder "
                "(cfg.json + sae_weights.safetensors)"
            )
        return self._forget((yield request).json())

    def _register_saelens_plan(self, name, folder) -> Plan:
        folder = Path(folder)
        weights, config = folder / "sae_weights.safetensors", folder / "cfg.json"
        if not weights.is_file():
            raise ValueError(f"{folder} is not a SAELens folder: no sae_weights.safetensors")
        files = {"file": (weights.name, weights.read_bytes())}
        if config.is_file():
            files["cfg"] = (config.name, config.read_bytes())
        request = self._request("POST", "/v1/dictionaries", data={"name": name}, files=files)
        return self._forget((yield request).json())

    def _forget(self, info: dict) -> dict:
        self._n_features.pop(info.get("name"), None)
        self._n_features.pop(info.get("id"), None)
        return info

    def _list_plan(self) -> Plan:
        return (yield self._request("GET", "/v1/dictionaries")).json()["dictionaries"]

    def _get_plan(self, ref: str) -> Plan:
        info = (yield self._request("GET", f"/v1/dictionaries/{ref}")).json()
        self._n_features[ref] = info["n_features"]
        return info

    def _delete_plan(self, ref: str) -> Plan:
        yield self._request("DELETE", f"/v1/dictionaries/{ref}")
        self._n_features.pop(ref, None)

    def _ready_plan(self) -> Plan:
        return (yield self._request("GET", "/readyz")).status_code == 200

    # Unfolding.

    def _unfold_plan(self, ref: str, activations, method: str, params: dict) -> Plan:
        rows, lead = activation_rows(activations)
        if ref not in self._n_features:
            yield from self._get_plan(ref)
        n_features = self._n_features[ref]
        # A parameter explicitly None (e.g. k=None with tol) cannot go in a query string.
        as_json = any(value is None for value in params.values())
        query = {"method": method, **{k: query_value(v) for k, v in params.items()}}
        path = f"/v1/dictionaries/{ref}/unfold"
        parts = []
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = rows[start : start + self.chunk_rows]
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
        self, name: str, path, tensor: str | None = None, bias_tensor: str | None = None
    ):
        """Register a `.npy` file (n_features, d_model), a `.safetensors` file (the tensor
        `tensor`, else `W_dec` or its only 2-D tensor; bias `bias_tensor`, else `b_dec`), or a
        SAELens folder."""
        return self._run(self._register_file_plan(name, path, tensor, bias_tensor))

    def register_saelens(self, name: str, folder):
        """Register a SAELens SAE folder: `sae_weights.safetensors` (W_dec, b_dec) + `cfg.json`."""
        return self._run(self._register_saelens_plan(name, folder))

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
        activations' leading shape. Rows beyond `chunk_rows` go in several requests.
        """
        return self._run(self._unfold_plan(ref, activations, method, params))


class UnfoldClient(_Client):
    """Blocking client. Use as a context manager, or call `close()`.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        timeout: seconds per HTTP request.
        chunk_rows: most activation rows per unfold request.
        max_retries: retries of a 429/503 answer before `OverloadedError`.
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
                request = plan.send(self._send(request))
        except StopIteration as stop:
            return stop.value

    def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as error:
                raise self.transport_error(error) from error
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
                request = plan.send(await self._send(request))
        except StopIteration as stop:
            return stop.value

    async def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as error:
                raise self.transport_error(error) from error
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
