"""The result every solver returns: padded sparse codes plus per-row diagnostics."""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import numpy as np


class Status(enum.IntEnum):
    """Why a row's solve stopped. Codes are stable: the service reports them as integers."""

    CONVERGED = 0
    """The tolerance was met: OMP's residual reached `tol`; the LASSO methods' stopping rule."""
    MAX_ITER = 1
    """The iteration budget ran out before the tolerance was met."""
    EXACT = 2
    """The residual is zero (up to rounding): nothing left to explain."""
    DEPENDENT = 3
    """OMP: the next atom was linearly dependent on the selected ones; stopped early."""
    NO_POSITIVE_CORRELATION = 4
    """Non-negative OMP: no atom correlates positively with the residual; stopped early."""
    TOO_MANY_NONZEROS = 5
    """LASSO methods: the codes need more non-zeros than `max_nonzero`; raise it."""
    K_REACHED = 6
    """OMP: `k` atoms selected with the residual still above `tol` (and above rounding)."""


STATUS_MESSAGES: dict[int, str] = {
    Status.CONVERGED: "converged: the residual met the tolerance",
    Status.MAX_ITER: "maximum number of iterations reached before the tolerance was met",
    Status.EXACT: "residual is zero: the activation is fully explained",
    Status.DEPENDENT: "stopped early: the next atom is linearly dependent on the selected ones",
    Status.NO_POSITIVE_CORRELATION: (
        "stopped early: no atom correlates positively with the residual"
    ),
    Status.TOO_MANY_NONZEROS: (
        "the codes have more non-zeros than max_nonzero (the smallest were dropped or the "
        "solve could not finish): raise max_nonzero"
    ),
    Status.K_REACHED: "k atoms selected; a residual above tol is left (raise k to explain more)",
}


class ChunkSolution(NamedTuple):
    """What a solver returns for one chunk of rows, inside jit (padded sparse form)."""

    indices: jax.Array  # (batch, width) int32, -1 for padding
    values: jax.Array  # (batch, width), 0 for padding
    n_iter: jax.Array  # (batch,) int32
    status: jax.Array  # (batch,) int32 Status
    duality_gap: jax.Array  # (batch,), NaN when the method has none
    residual_norm: jax.Array | None = None
    """(batch,) ||x - codes @ D|| of the returned codes when the solver knows it (NaN for the
    rows where it does not); None: computed from the codes."""


class Solution(NamedTuple):
    """What `solvers.solve` returns: the fields of `UnfoldResult` as device arrays, each with a
    leading batch axis (see `UnfoldResult` for their meaning)."""

    indices: jax.Array
    values: jax.Array
    residual_norm: jax.Array
    relative_error: jax.Array
    l0: jax.Array
    n_iter: jax.Array
    status: jax.Array
    duality_gap: jax.Array


class UnfoldResult(NamedTuple):
    """Sparse codes of a batch of activations, in the dictionary's own units.

    Codes are stored padded: row ``i`` has its non-zeros at ``indices[i, :l0[i]]`` with
    ``values[i, :l0[i]]``; padding slots hold index ``-1`` and value ``0``. When the call was
    made with a single activation of shape ``(d_model,)`` every array loses its batch axis.

    Attributes:
        indices: feature indices, int32, of shape (batch, width).
        values: code values, of shape (batch, width).
        residual_norm: ``||x - bias - codes @ dictionary||``, of shape (batch,).
        relative_error: ``residual_norm / ||x - bias||`` (0 when ``x == bias``), of shape (batch,).
        l0: number of non-zero codes, int32, of shape (batch,).
        n_iter: iterations (OMP: atoms selected), int32, of shape (batch,).
        status: a `Status` code, int32, of shape (batch,).
        duality_gap: LASSO duality gap, NaN for methods without one, of shape (batch,).
        n_features: size of the feature space (columns of `to_dense`).
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
        """Dense codes of shape (batch, n_features) (or (n_features,) for a single vector)."""
        indices = np.atleast_2d(self.indices)
        values = np.atleast_2d(self.values)
        dense = np.zeros((indices.shape[0], self.n_features), dtype=values.dtype)
        rows, slots = np.nonzero(indices >= 0)
        dense[rows, indices[rows, slots]] = values[rows, slots]
        return dense.reshape(*np.shape(self.indices)[:-1], self.n_features)

    def messages(self) -> list[str] | str:
        """Human-readable `status` of each row."""
        if np.ndim(self.status) == 0:
            return STATUS_MESSAGES[int(self.status)]
        return [STATUS_MESSAGES[int(s)] for s in self.status]
