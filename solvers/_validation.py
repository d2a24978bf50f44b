"""Boundary checks: every bad input becomes a `ValueError` that names the problem."""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float64")


CHECK_BLOCK_ELEMENTS = 1 << 24
"""Dictionaries are checked this many elements of rows at a time (a memory-mapped one is read
block by block; the checks' temporaries stay small)."""


def check_dtype(dtype: str) -> np.dtype:
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(str(dtype))


def check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def as_matrix(name: str, array, dtype: np.dtype, *, finite: bool = True) -> np.ndarray:
    """`array` as a 2-D numpy array of `dtype`, checked finite unless `finite` is False."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if not np.can_cast(array.dtype, np.float64, "same_kind"):  # numbers, bfloat16, bool
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.asarray(array, dtype=dtype)
    if finite:
        check_finite(name, array)
    return array


def check_dictionary(directions, bias, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Validate a dictionary of shape (n_features, d_model) and its bias of shape (d_model,)
    (`validate_dictionary`); return them as `dtype` arrays (`directions` already of `dtype` is
    not copied; a missing bias is zeros)."""
    validate_dictionary(directions, bias, dtype)
    atoms = np.asarray(directions, dtype=dtype)
    return atoms, np.zeros(atoms.shape[1], dtype) if bias is None else np.asarray(bias, dtype)


def validate_dictionary(directions, bias, dtype: np.dtype) -> None:
    """Raise a `ValueError` naming the problem unless `directions` is a non-empty 2-D numeric
    array whose rows are non-zero and finite in `dtype`, and `bias` None or finite of shape
    (d_model,). Checked a block of rows at a time: nothing the size of `directions` is made."""
    atoms = np.asarray(directions)
    if atoms.ndim != 2:
        raise ValueError(f"dictionary must be 2-D, got shape {atoms.shape}")
    n_features, d_model = atoms.shape
    if n_features == 0 or d_model == 0:
        raise ValueError(f"dictionary must be non-empty, got shape {atoms.shape}")
    rows = max(1, CHECK_BLOCK_ELEMENTS // d_model)
    zero_rows, non_finite = [], 0
    for start in range(0, n_features, rows):
        block = as_matrix("dictionary", atoms[start : start + rows], dtype, finite=False)
        non_finite += block.size - int(np.count_nonzero(np.isfinite(block)))
        zero_rows.extend((start + np.flatnonzero(~np.any(block != 0, axis=1))).tolist())
    if non_finite:
        raise ValueError(f"dictionary contains {non_finite} non-finite value(s) (NaN or Inf)")
    if zero_rows:
        raise ValueError(
            f"dictionary has {len(zero_rows)} all-zero row(s) (first: {zero_rows[:5]}); "
            "every feature direction must be non-zero"
        )
    if bias is not None:
        bias = np.asarray(bias, dtype=dtype)
        if bias.shape != (d_model,):
            raise ValueError(f"bias must have shape (d_model,) = ({d_model},), got {bias.shape}")
        check_finite("bias", bias)


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
