"""A dictionary with its once-per-dictionary precomputation (norms, Gram, Lipschitz constant)."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._validation import check_dictionary, check_dtype

DEFAULT_GRAM_BUDGET_BYTES = 1 << 30
"""Largest Gram matrix `prepare` builds by default (1 GiB: 16k features in float32)."""


class Dictionary(NamedTuple):
    """Feature directions and what every solve needs from them, computed once.

    A NamedTuple of arrays, hence a JAX pytree: pass it straight into jitted code.

    Attributes:
        atoms: feature directions, of shape (n_features, d_model).
        bias: decoder bias, of shape (d_model,) (zeros when none).
        norms: row norms of `atoms`, of shape (n_features,).
        gram: ``atoms @ atoms.T`` of shape (n_features, n_features), or None (matrix-free).
        lipschitz: largest eigenvalue of ``atoms.T @ atoms``, a scalar (the LASSO step bound).
    """

    atoms: jax.Array
    bias: jax.Array
    norms: jax.Array
    gram: jax.Array | None
    lipschitz: jax.Array

    @property
    def n_features(self) -> int:
        return self.atoms.shape[0]

    @property
    def d_model(self) -> int:
        return self.atoms.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.atoms.dtype)


def precision(dtype) -> contextlib.AbstractContextManager:
    """A scope in which JAX computes in `dtype` (float32 or float64).

    float64 needs JAX's 64-bit mode; it is switched on for this scope only (thread-locally), so
    importing or using `solvers` never changes global JAX configuration. Run every jitted call
    on a float64 `Dictionary` inside this scope (`unfold` does).
    """
    if np.dtype(dtype) == np.float64 and not jax.config.x64_enabled:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def gram_bytes(n_features: int, dtype="float32") -> int:
    """Memory the Gram matrix of `n_features` atoms takes."""
    return n_features * n_features * np.dtype(dtype).itemsize


def prepare(
    dictionary,
    bias=None,
    *,
    dtype: str | None = None,
    gram: bool | None = None,
    gram_budget_bytes: int = DEFAULT_GRAM_BUDGET_BYTES,
) -> Dictionary:
    """Validate a dictionary and precompute what every solve over it needs.

    Args:
        dictionary: feature directions, of shape (n_features, d_model); rows need not be
            unit-norm (codes are reported in the dictionary's own units). An existing
            `Dictionary` is returned unchanged when its dtype matches.
        bias: optional decoder bias of shape (d_model,): the model is
            ``x = codes @ dictionary + bias``.
        dtype: "float32" or "float64" (computed in JAX's 64-bit mode, enabled locally: see
            `precision`); None: a prepared dictionary's own, else "float32".
        gram: True to build the Gram matrix, False for the matrix-free path, None to decide by
            `gram_budget_bytes`.
        gram_budget_bytes: the largest Gram matrix built automatically.

    Raises:
        ValueError: non-2-D, empty, non-finite or all-zero rows, bias of the wrong shape.
    """
    if isinstance(dictionary, Dictionary) and dtype is None:
        dtype = dictionary.dtype.name
    np_dtype = check_dtype("float32" if dtype is None else dtype)
    if isinstance(dictionary, Dictionary):
        if dictionary.dtype != np_dtype:
            raise ValueError(f"dictionary was prepared as {dictionary.dtype}, not {np_dtype}")
        if bias is not None:
            raise ValueError("pass bias to prepare() once, not again with a prepared dictionary")
        return dictionary
    atoms, bias = check_dictionary(dictionary, bias, np_dtype)
    if gram is None:
        gram = gram_bytes(atoms.shape[0], np_dtype) <= gram_budget_bytes
    with precision(np_dtype):
        return _precompute(jnp.asarray(atoms), jnp.asarray(bias), bool(gram))


def _precompute(atoms: jax.Array, bias: jax.Array, with_gram: bool) -> Dictionary:
    norms = jnp.linalg.norm(atoms, axis=1)
    # d_model x d_model covariance: small even when n_features is huge.
    lipschitz = jnp.linalg.eigvalsh(atoms.T @ atoms)[-1]
    gram = atoms @ atoms.T if with_gram else None
    return Dictionary(atoms, bias, norms, gram, lipschitz)
