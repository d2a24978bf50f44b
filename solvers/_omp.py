"""Orthogonal Matching Pursuit, batched, on the Gram matrix or matrix-free.

Both paths grow an orthonormal basis ``q_1..q_t`` of the selected atoms (Gram-Schmidt, i.e. a
Cholesky factor ``L`` of the selected Gram block) and never form a least-squares solve inside
the loop. With ``z_t = <q_t, x>`` the residual correlations update as
``c <- c - (D q_t) z_t``, and the code on the support is ``L^T \\ z`` at the end.

- Gram path: ``D q_t`` comes from one Gram row and the earlier ``D q_i`` (Batch-OMP,
  Rubinstein et al. 2008): O(n_features * k) per step, no product with the dictionary.
- Matrix-free path: ``q_t`` is kept in the d_model space and ``D q_t`` is one product with the
  dictionary per step; memory O(batch * k * d_model), for dictionaries too large for a Gram.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._dictionary import Dictionary
from ._result import ChunkSolution, Status
from ._validation import check_nonnegative, check_positive_int


@dataclasses.dataclass(frozen=True)
class OMP:
    """Orthogonal Matching Pursuit settings (hashable: jit treats them as static).

    Attributes:
        k: at most this many atoms per row.
        tol: stop a row once its residual norm is at most `tol` (not squared, unlike
            scikit-learn's ``orthogonal_mp``); 0 to always select `k` atoms.
    """

    k: int
    tol: float = 0.0

    @classmethod
    def from_params(cls, dictionary: Dictionary, k=None, tol=None) -> OMP:
        """Validated settings; `k` defaults to d_model when only `tol` is given."""
        if k is None and tol is None:
            raise ValueError("omp needs k (maximum number of atoms) or tol (residual norm)")
        n_features, d_model = dictionary.atoms.shape
        k = d_model if k is None else check_positive_int("k", k, upper=n_features)
        tol = 0.0 if tol is None else check_nonnegative("tol", tol)
        # At most d_model atoms can be linearly independent.
        return cls(k=min(k, n_features, d_model), tol=tol)

    def solve(self, dictionary: Dictionary, x: jax.Array) -> ChunkSolution:
        return solve_omp(self, dictionary, x)


class OMPState(NamedTuple):
    correlations: jax.Array  # (batch, n_features): D r, r the current residual
    basis: jax.Array  # (batch, k, n_features) D q_i (Gram path) or (batch, k, d_model) q_i
    cholesky: jax.Array  # (batch, k, k) lower-triangular factor of the selected Gram block
    projections: jax.Array  # (batch, k) z_i = <q_i, x>
    indices: jax.Array  # (batch, k) selected atoms, -1 when none
    residual_sq: jax.Array  # (batch,) ||r||^2 from the projections
    stop: jax.Array  # (batch,) int32 Status + 1 once a row has stopped, 0 while running


def solve_omp(settings: OMP, dictionary: Dictionary, x: jax.Array) -> ChunkSolution:
    """OMP on a chunk of centred activations `x` of shape (batch, d_model).

    Indices and values come back of shape (batch, k).
    """
    batch = x.shape[0]
    k = settings.k
    n_features, d_model = dictionary.atoms.shape
    dtype = x.dtype
    use_gram = dictionary.gram is not None
    eps = jnp.finfo(dtype).eps
    rows = jnp.arange(batch)

    alpha0 = x @ dictionary.atoms.T  # (batch, n_features)
    x_sq = jnp.sum(x * x, axis=1)
    exact_sq = 10 * eps * x_sq  # below this the residual is rounding noise
    tol_sq = jnp.asarray(settings.tol, dtype) ** 2
    inv_norms = 1.0 / dictionary.norms
    atom_sq = dictionary.norms**2

    def step(t, s: OMPState) -> OMPState:
        running = s.stop == 0
        j = jnp.argmax(jnp.abs(s.correlations) * inv_norms, axis=1)  # (batch,)
        if use_gram:
            # <d_j, q_i> is entry j of the stored D q_i.
            overlaps = s.basis[rows, :, j]  # (batch, k), zero beyond t
        else:
            atom = dictionary.atoms[j]  # (batch, d_model)
            overlaps = jnp.einsum("bkm,bm->bk", s.basis, atom)
        new_sq = atom_sq[j] - jnp.sum(overlaps * overlaps, axis=1)
        independent = new_sq > 100 * eps * atom_sq[j]
        ok = running & independent
        diag = jnp.sqrt(jnp.where(ok, new_sq, 1.0))
        overlaps = jnp.where(ok[:, None], overlaps, 0.0)
        if use_gram:
            direction = dictionary.gram[j] - jnp.einsum("bk,bkn->bn", overlaps, s.basis)
            direction = direction / diag[:, None]
            d_q = direction
        else:
            direction = (atom - jnp.einsum("bk,bkm->bm", overlaps, s.basis)) / diag[:, None]
            d_q = direction @ dictionary.atoms.T
        z = (alpha0[rows, j] - jnp.sum(overlaps * s.projections, axis=1)) / diag
        z = jnp.where(ok, z, 0.0)
        direction = jnp.where(ok[:, None], direction, 0.0)
        residual_sq = s.residual_sq - z * z
        reached = residual_sq <= jnp.maximum(tol_sq, exact_sq)
        stop = jnp.where(
            running & ~independent,
            jnp.where(s.residual_sq <= exact_sq, Status.EXACT, Status.DEPENDENT) + 1,
            jnp.where(
                ok & reached,
                jnp.where(residual_sq <= exact_sq, Status.EXACT, Status.CONVERGED) + 1,
                s.stop,
            ),
        )
        cholesky = s.cholesky.at[:, t, :].set(overlaps).at[:, t, t].set(diag)
        return OMPState(
            correlations=s.correlations - (d_q * z[:, None]),
            basis=s.basis.at[:, t, :].set(direction),
            cholesky=cholesky,
            projections=s.projections.at[:, t].set(z),
            indices=s.indices.at[:, t].set(jnp.where(ok, j, -1)),
            residual_sq=residual_sq,
            stop=stop.astype(jnp.int32),
        )

    basis_width = n_features if use_gram else d_model
    init = OMPState(
        correlations=alpha0,
        basis=jnp.zeros((batch, k, basis_width), dtype),
        cholesky=jnp.zeros((batch, k, k), dtype),
        projections=jnp.zeros((batch, k), dtype),
        indices=jnp.full((batch, k), -1, jnp.int32),
        residual_sq=x_sq,
        stop=jnp.where(x_sq == 0, Status.EXACT + 1, 0).astype(jnp.int32),
    )
    final = jax.lax.fori_loop(0, k, step, init)
    # Code on the support: L^T values = z (unused slots have L_tt = 1, z = 0, so value 0).
    values = jax.vmap(
        lambda chol, z: jax.scipy.linalg.solve_triangular(chol, z, trans="T", lower=True)
    )(final.cholesky, final.projections)
    n_iter = jnp.sum(final.indices >= 0, axis=1).astype(jnp.int32)
    status = jnp.where(final.stop == 0, Status.CONVERGED, final.stop - 1).astype(jnp.int32)
    return ChunkSolution(
        indices=final.indices,
        values=jnp.where(final.indices >= 0, values, 0.0),
        n_iter=n_iter,
        status=status,
        duality_gap=jnp.full((batch,), jnp.nan, dtype),
    )
