"""The public entry point: `unfold(activations, dictionary, method=..., **params)`."""

from __future__ import annotations

import functools

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
"""Rows solved together: small keeps each row's working set in cache on a CPU."""
DEFAULT_BLOCK_ROWS = 1024
"""Rows per compiled call; larger batches run as several calls of this size."""


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
    method: str = "omp",
    *,
    bias=None,
    dtype: str = "float32",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    **params,
) -> UnfoldResult:
    """Sparse codes of `activations` over the feature directions of `dictionary`.

    Args:
        activations: of shape (batch, d_model), or a single vector of shape (d_model,).
        dictionary: feature directions of shape (n_features, d_model), or a `Dictionary`
            from `prepare` (which holds the per-dictionary precomputation: reuse it).
        method: one of `METHODS` ("omp", ...).
        bias: optional decoder bias of shape (d_model,) (only with a raw dictionary).
        dtype: "float32" or "float64".
        chunk_rows, block_rows: execution tuning (rows solved together; rows per compiled call).
        **params: the method's settings, e.g. ``k`` and ``tol`` for "omp".

    Returns:
        An `UnfoldResult` of numpy arrays, codes in the dictionary's own units.

    Raises:
        ValueError: naming the bad shape, value or parameter.
    """
    dictionary = prepare(dictionary, bias, dtype=dtype)
    settings = make_settings(method, dictionary, **params)
    x, single = check_activations(activations, dictionary.d_model, dictionary.dtype)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows)
    block_rows = check_positive_int("block_rows", block_rows)
    with precision(dictionary.dtype):  # float64: JAX's 64-bit mode for this call only
        result = solve(settings, dictionary, x, chunk_rows=chunk_rows, block_rows=block_rows)
    if single:
        return result._replace(**{f: v[0] for f, v in result._asdict().items() if f != "n_features"})
    return result


def padded_rows(n_rows: int, chunk_rows: int, block_rows: int) -> int:
    """Rows of the compiled call for a (partial) block: a power of two times `chunk_rows`."""
    chunks = -(-min(n_rows, block_rows) // chunk_rows)
    return chunk_rows * (1 << max(chunks - 1, 0).bit_length())


def solve(
    settings, dictionary: Dictionary, x: np.ndarray, *, chunk_rows: int, block_rows: int
) -> UnfoldResult:
    """Run validated `settings` on validated activations `x` of shape (batch, d_model).

    Batches are cut into blocks of `block_rows` and the last one is padded to a power of two
    times `chunk_rows`, so any batch size reuses a handful of compiled programs.
    """
    n_rows = x.shape[0]
    block_rows = max(chunk_rows, block_rows - block_rows % chunk_rows)
    parts = []
    for start in range(0, max(n_rows, 1), block_rows):
        block = x[start : start + block_rows]
        rows = padded_rows(block.shape[0], chunk_rows, block_rows)
        padded = np.zeros((rows, x.shape[1]), x.dtype)
        padded[: block.shape[0]] = block
        out = _solve_block(settings, dictionary, jnp.asarray(padded), chunk_rows)
        parts.append((out, block.shape[0]))  # dispatched asynchronously; gathered below
    fields = [
        np.concatenate([np.asarray(out[i])[:n] for out, n in parts]) for i in range(len(parts[0][0]))
    ]
    return UnfoldResult(*fields, n_features=dictionary.n_features)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _solve_block(settings, dictionary: Dictionary, x: jax.Array, chunk_rows: int):
    """Solve a block of activations (batch, d_model) chunk by chunk; batch % chunk_rows == 0."""
    centred = x - dictionary.bias

    def solve_chunk(chunk: jax.Array):
        sol: ChunkSolution = settings.solve(dictionary, chunk)
        return (*sol[:2], *diagnostics(dictionary, chunk, sol), sol.n_iter, sol.status, sol.duality_gap)

    chunks = centred.reshape(-1, chunk_rows, centred.shape[1])
    out = jax.lax.map(solve_chunk, chunks)
    return tuple(a.reshape(x.shape[0], *a.shape[2:]) for a in out)


def diagnostics(dictionary: Dictionary, x: jax.Array, sol: ChunkSolution):
    """(residual_norm, relative_error, l0) of padded sparse codes for centred `x`."""
    atoms = dictionary.atoms[jnp.maximum(sol.indices, 0)]  # (batch, width, d_model)
    values = jnp.where(sol.indices >= 0, sol.values, 0.0)
    residual_norm = jnp.linalg.norm(x - jnp.einsum("bw,bwm->bm", values, atoms), axis=1)
    x_norm = jnp.linalg.norm(x, axis=1)
    relative_error = jnp.where(x_norm > 0, residual_norm / jnp.where(x_norm > 0, x_norm, 1), 0.0)
    l0 = jnp.sum((sol.indices >= 0) & (values != 0), axis=1).astype(jnp.int32)
    return residual_norm, relative_error, l0
