"""Turn validated requests into solver calls, and solver results into response bodies."""

from __future__ import annotations

import numpy as np

import solvers

from .errors import InvalidInput
from .registry import Entry


def activations_array(values, d_model: int) -> tuple[np.ndarray, bool]:
    """Activations as float32 (batch, d_model), and whether a single vector was sent."""
    try:
        with np.errstate(over="ignore"):  # beyond float32 range becomes Inf: refused below
            array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(
            "activations must be a list of numbers or a list of equally long lists of numbers",
            code="invalid_shape",
        ) from None
    single = array.ndim == 1
    if array.ndim not in (1, 2) or array.shape[-1] != d_model:
        raise InvalidInput(
            f"activations have shape {list(array.shape)}; this dictionary needs "
            f"(batch, {d_model}) or ({d_model},)",
            code="shape_mismatch",
        )
    if array.shape[0] == 0 and not single:
        raise InvalidInput("activations is an empty batch; send at least one row", code="empty")
    if not np.all(np.isfinite(array)):
        rows = np.flatnonzero(~np.all(np.isfinite(array.reshape(-1, d_model)), axis=1))
        raise InvalidInput(
            f"activations contain NaN or Inf (or values beyond float32 range) in row(s) "
            f"{rows[:10].tolist()}",
            code="non_finite",
        )
    return array.reshape(-1, d_model), single


def run(entry: Entry, activations: np.ndarray, method: str, params: dict) -> solvers.UnfoldResult:
    """Solve; parameter problems the solver finds become 422s."""
    try:
        return solvers.unfold(activations, entry.prepared, method=method, **params)
    except ValueError as error:
        raise InvalidInput(str(error), code="invalid_parameter") from None


def sparse_codes(result: solvers.UnfoldResult) -> list[dict]:
    codes = []
    for indices, values in zip(result.indices, result.values, strict=True):
        keep = indices >= 0
        codes.append({"indices": indices[keep].tolist(), "values": values[keep].tolist()})
    return codes


def response_body(result: solvers.UnfoldResult) -> dict:
    return {
        "codes": sparse_codes(result),
        "residual_norm": result.residual_norm.tolist(),
        "relative_error": result.relative_error.tolist(),
        "l0": result.l0.tolist(),
        "n_iter": result.n_iter.tolist(),
        "status": result.status.tolist(),
        "messages": result.messages(),
    }
