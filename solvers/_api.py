"""The public entry point: `unfold(activations, dictionary, method=..., **params)`."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ._dictionary import Dictionary, precision, prepare
from ._lasso import FISTA, ISTA, Lasso
from ._omp import OMP
from ._result import ChunkSolution, UnfoldResult
from ._validation import check_activations, check_positive_int

METHODS: dict[str, type] = {"omp": OMP, "ista": ISTA, "fista": FISTA, "lasso": Lasso}
"""Solver settings class of each method name."""

DEFAULT_CHUNK_ROWS = 8
"""Rows solved together on the Gram path: small keeps each row's working set in cache."""
DEFAULT_BLOCK_ROWS = 1024
"""Rows per compiled call; larger batches run as several calls of this size."""
CHUNK_BYTES = 64 << 20
"""Matrix-free path: chunks as large as keeps a (chunk, n_features) array under this size
(every step multiplies the chunk by the whole dictionary: more rows use the product better)."""
MAX_CHUNK_ROWS = 256
MAX_STREAMS = 8
"""Each stream is a copy of the solver's loop in the compiled program: bounded for compile time."""


def default_chunk_rows(dictionary: Dictionary, settings=None) -> int:
    """Rows solved together: on the Gram path the method's own ``gram_chunk_rows`` (default
    `DEFAULT_CHUNK_ROWS`), a power of two bounded by `CHUNK_BYTES` and `MAX_CHUNK_ROWS` on the
    matrix-free path."""
    if dictionary.gram is not None:
        return getattr(settings, "gram_chunk_rows", DEFAULT_CHUNK_ROWS)
    rows = CHUNK_BYTES // (dictionary.n_features * dictionary.dtype.itemsize)
    rows = min(max(rows, DEFAULT_CHUNK_ROWS), MAX_CHUNK_ROWS)
    return 1 << (rows.bit_length() - 1)


def default_streams(dictionary: Dictionary) -> int:
    """Independent chunk sequences per compiled call. XLA's CPU runtime runs independent loops
    side by side, so on a CPU the Gram path runs one sequence per core; elsewhere (GPU/TPU),
    and on the matrix-free path whose products are multithreaded already, one. (Since jaxlib
    0.10 the CPU runtime also splits single ops across threads, and one sequence comes close:
    P1 OMP, 4096 rows, 1491-1636 rows/s against 1491-1709 with two.)"""
    if dictionary.gram is None or jax.default_backend() != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_STREAMS))


def make_settings(method: str, dictionary: Dictionary, **params):
    """Validated, hashable settings of `method` for `dictionary`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method].from_params(dictionary, **params)
    except TypeError as error:  # an unknown keyword
        raise ValueError(f"bad parameters for method {method!r}: {error}") from None


def unfold(
    activations,
    dictionary,
    method="omp",
    *,
    bias=None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    streams: int | None = None,
    **params,
) -> UnfoldResult:
    """Sparse codes of `activations` over the feature directions of `dictionary`.

    Args:
        activations: of shape (batch, d_model), or a single vector of shape (d_model,).
        dictionary: feature directions of shape (n_features, d_model), or a `Dictionary`
            from `prepare` (which holds the per-dictionary precomputation: reuse it).
        method: one of `METHODS` ("omp", ...), or settings from `make_settings` for this
            dictionary (then no `params`): callers that solve many batches with the same
            settings validate them once.
        bias: optional decoder bias of shape (d_model,) (only with a raw dictionary).
        dtype: "float32" or "float64"; None: a prepared dictionary's own, else "float32".
        chunk_rows, block_rows, streams: execution tuning: rows solved together (default
            `default_chunk_rows`), rows per compiled call, independent chunk sequences per
            call (default `default_streams`: one per CPU core on the Gram path).
        **params: the method's settings, e.g. ``k`` and ``tol`` for "omp".

    Returns:
        An `UnfoldResult` of numpy arrays, codes in the dictionary's own units.

    Raises:
        ValueError: naming the bad shape, value or parameter.
    """
    dictionary = prepare(dictionary, bias, dtype=dtype)
    if isinstance(method, str):
        settings = make_settings(method, dictionary, **params)
    elif isinstance(method, tuple(METHODS.values())) and not params:
        settings = method
    else:
        raise ValueError(
            "method must be a name in METHODS (with its parameters), or settings from "
            f"make_settings (alone), got {method!r} with parameters {sorted(params)}"
        )
    x, single = check_activations(activations, dictionary.d_model, dictionary.dtype)
    if chunk_rows is not None:
        chunk_rows = check_positive_int("chunk_rows", chunk_rows)
    if streams is not None:
        streams = check_positive_int("streams", streams)
    block_rows = check_positive_int("block_rows", block_rows)
    with precision(dictionary.dtype):  # float64: JAX's 64-bit mode for this call only
        result = solve(
            settings, dictionary, x, chunk_rows=chunk_rows, block_rows=block_rows, streams=streams
        )
    if single:
        fields = result._asdict().items()
        return result._replace(**{f: v[0] for f, v in fields if f != "n_features"})
    return result


def padded_rows(n_rows: int, chunk_rows: int, block_rows: int, min_rows: int = 1) -> int:
    """Rows of the compiled call for a (partial) block: a power of two times `chunk_rows`, or
    for fewer rows than a chunk, a power of two, at least `min_rows` (at most a chunk; 1: a single
    row is solved alone)."""
    n_rows = max(1, min(min_rows, chunk_rows), min(n_rows, block_rows))
    if n_rows <= chunk_rows:
        return min(chunk_rows, 1 << (n_rows - 1).bit_length())
    chunks = -(-n_rows // chunk_rows)
    return chunk_rows * (1 << (chunks - 1).bit_length())


def solve(
    settings,
    dictionary: Dictionary,
    x: np.ndarray,
    *,
    chunk_rows: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    streams: int | None = None,
) -> UnfoldResult:
    """Run validated `settings` on validated activations `x` of shape (batch, d_model).

    Batches are cut into blocks of `block_rows` and the last one is padded (`padded_rows`), so
    any batch size reuses a handful of compiled programs. Each block runs as `streams`
    independent sequences of chunks of `chunk_rows` rows.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(dictionary, settings)
    if streams is None:
        streams = default_streams(dictionary)
    n_rows = x.shape[0]
    block_rows = max(chunk_rows, block_rows - block_rows % chunk_rows)
    min_rows = getattr(settings, "gram_min_rows", 1) if dictionary.gram is not None else 1
    parts = []
    for start in range(0, max(n_rows, 1), block_rows):
        block = x[start : start + block_rows]
        rows = padded_rows(block.shape[0], chunk_rows, block_rows, min_rows)
        chunk = min(chunk_rows, rows)
        # A power of two of sequences that divides the (power of two) number of chunks.
        n_streams = 1 << (min(streams, rows // chunk).bit_length() - 1)
        padded = np.zeros((rows, x.shape[1]), x.dtype)
        padded[: block.shape[0]] = block
        out = _solve_block(settings, dictionary, jnp.asarray(padded), chunk, n_streams)
        parts.append((out, block.shape[0]))  # dispatched asynchronously; gathered below
    fields = [
        np.concatenate([np.asarray(out[i])[:n] for out, n in parts])
        for i in range(len(parts[0][0]))
    ]
    return UnfoldResult(*fields, n_features=dictionary.n_features)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _solve_block(settings, dictionary: Dictionary, x: jax.Array, chunk_rows: int, streams: int):
    """Solve a block of activations (batch, d_model), batch % (chunk_rows * streams) == 0, as
    `streams` independent `lax.map`s over chunks (XLA runs independent loops concurrently).

    `settings` is a pytree: its float fields (tol, alpha) are traced, the rest is static, so
    one program serves every penalty and tolerance.

    A method whose settings have ``uses_correlations = True`` gets, on the Gram path,
    ``correlations=chunk @ atoms.T`` computed for the whole block in one product.
    """
    centred = x - dictionary.bias
    d_model = centred.shape[1]
    with_correlations = dictionary.gram is not None and getattr(
        settings, "uses_correlations", False
    )

    def solve_chunk(args):
        chunk, correlations = args
        if with_correlations:
            sol: ChunkSolution = settings.solve(dictionary, chunk, correlations=correlations)
        else:
            sol = settings.solve(dictionary, chunk)
        checks = diagnostics(dictionary, chunk, sol)
        return (*sol[:2], *checks, sol.n_iter, sol.status, sol.duality_gap)

    chunks = centred.reshape(streams, -1, chunk_rows, d_model)
    if with_correlations:
        correlations = (centred @ dictionary.atoms.T).reshape(
            streams, -1, chunk_rows, dictionary.n_features
        )
    else:
        correlations = jnp.zeros((streams, chunks.shape[1], 0), centred.dtype)
    outs = [jax.lax.map(solve_chunk, (chunks[i], correlations[i])) for i in range(streams)]
    # Each output is (chunks, chunk_rows, ...) per stream: back to (batch, ...) in row order.
    return tuple(
        jnp.concatenate([out[field].reshape(-1, *out[field].shape[2:]) for out in outs])
        for field in range(len(outs[0]))
    )


GATHER_WIDTH = 64
"""Reconstruct codes at most this wide from gathered atoms (batch, width, d_model); wider
ones (the LASSO's, up to d_model) through dense codes and one product with the dictionary."""


def diagnostics(dictionary: Dictionary, x: jax.Array, sol: ChunkSolution):
    """(residual_norm, relative_error, l0) of padded sparse codes for centred `x`."""
    values = jnp.where(sol.indices >= 0, sol.values, 0.0)
    batch, width = values.shape

    def residual_norm_of_codes():
        if width <= GATHER_WIDTH:
            atoms = dictionary.atoms[jnp.maximum(sol.indices, 0)]  # (batch, width, d_model)
            reconstruction = jnp.einsum("bw,bwm->bm", values, atoms)
        else:  # padding slots add 0 to feature 0
            dense = jnp.zeros((batch, dictionary.n_features), values.dtype)
            dense = dense.at[jnp.arange(batch)[:, None], jnp.maximum(sol.indices, 0)].add(values)
            reconstruction = dense @ dictionary.atoms
        return jnp.linalg.norm(x - reconstruction, axis=1)

    if sol.residual_norm is None:
        residual_norm = residual_norm_of_codes()
    else:  # the solver's own, unless it does not know some row's
        residual_norm = jax.lax.cond(
            jnp.any(jnp.isnan(sol.residual_norm)),
            residual_norm_of_codes,
            lambda: sol.residual_norm,
        )
    x_norm = jnp.linalg.norm(x, axis=1)
    relative_error = jnp.where(x_norm > 0, residual_norm / jnp.where(x_norm > 0, x_norm, 1), 0.0)
    l0 = jnp.sum((sol.indices >= 0) & (values != 0), axis=1).astype(jnp.int32)
    return residual_norm, relative_error, l0
