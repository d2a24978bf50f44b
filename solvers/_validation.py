"""Boundary checks: every bad input becomes a `ValueError` that names the problem."""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float64")


def check_dtype(dtype: str) -> np.dtype:
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(str(dtype))


def check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def as_matrix(name: str, array, dtype: np.dtype) -> np.ndarray:
    """`array` as a finite 2-D numpy array of `dtype`."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.asarray(array, dtype=dtype)
    check_finite(name, array)
    return array


def check_dictionary(directions, bias, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Validate a dictionary of shape (n_features, d_model) and its bias of shape (d_model,)."""
    atoms = as_matrix("dictionary", directions, dtype)
    n_features, d_model = atoms.shape
    if n_features == 0 or d_model == 0:
        raise ValueError(f"dictionary must be non-empty, got shape {atoms.shape}")
    zero_rows = np.flatnonzero(~np.any(atoms != 0, axis=1))
    if zero_rows.size:
        raise ValueError(
            f"dictionary has {zero_rows.size} all-zero row(s) (first: {zero_rows[:5].tolist()}); "
            "every feature direction must be non-zero"
        )
    if bias is None:
        return atoms, np.zeros(d_model, dtype)
    bias = np.asarray(bias, dtype=dtype)
    if bias.shape != (d_model,):
        raise ValueError(f"bias must have shape (d_model,) = ({d_model},), got {bias.shape}")
    check_finite("bias", bias)
    return atoms, bias


def check_activations(activations, d_model: int, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """Activations as (batch, d_model); also whether a single (d_model,) vector was given."""
    x = np.asarray(activations)
    single = x.ndim == 1
    if x.ndim not in (1, 2) or x.shape[-1] != d_model:
        raise ValueError(
            f"activations must have shape (batch, {d_model}) or ({d_model},) to match the "
            f"dictionary's d_model={d_model}, got {x.shape}"
        )
    x = as_matrix("activations", x.reshape(-1, d_model), dtype)
    return x, single


def check_positive_int(name: str, value, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be at least 1{bound}, got {value}")
    return int(value)


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)
