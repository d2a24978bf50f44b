"""Per-answer certificates: when a found support can be trusted, and how far.

For a row with support ``S`` (the features it uses) over unit-normalised atoms ``d~_j``:

- **Exact recovery coefficient** (Tropp 2004, "Greed is good", Theorem 3.1 and 3.3):
  ``ERC(S) = max_{j not in S} ||pinv(D~_S) d~_j||_1``. When ``ERC(S) < 1`` (`certified`), any
  activation that is exactly a combination of the atoms in ``S`` is recovered exactly, support
  and codes, by OMP (in ``|S|`` steps) and by l1 minimisation (basis pursuit), and that
  representation is the unique one of least l1 norm (Fuchs 2004). With noise, the l1-penalised
  solution (LASSO) with a large enough penalty selects atoms of ``S`` only (Tropp 2006, "Just
  relax", Theorem 8). `erc_margin` is ``1 - ERC(S)``: how far the condition holds.
  It is a statement about ``S`` and the dictionary, not about the activation: it does not say
  that the activation *is* sparse on ``S`` (read the residual for that), nor that no other
  sparse code explains it equally well when the residual is large. For the non-negative
  methods it is conservative (it certifies the signed problem, which implies the
  non-negative one).
- **Support stability**: ``min_{i in S} |c_i| ||d_i|| sigma_min(D~_S) / ||r||``, with ``c`` the
  codes and ``r`` the residual. Least squares on ``S`` moves each code by at most
  ``||e|| / sigma_min(D~_S)`` (in the normalised units ``c_i ||d_i||``) when the activation
  moves by ``e``; so above 1, a perturbation as large as the residual left cannot zero or
  flip any code on ``S``. Infinite when the residual is zero, NaN for an empty support.

Both are computed from Gram rows ``G_{S,:}`` a block of features at a time (from the stored Gram
matrix on the Gram path, else from the atoms), never forming ``pinv`` for every atom:
``pinv(D~_S) d~_j = G~_SS^{-1} G~_{S,j}``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._dictionary import Dictionary, precision
from ._products import einsum, matmul
from ._result import UnfoldResult

BLOCK_BYTES = 64 << 20
"""Memory of the (rows, support, features) block of Gram entries handled at a time."""
CHUNK_ROWS = 256
"""Most rows certified per call; fewer are padded to a power of two (few programs)."""


class Certificate(NamedTuple):
    """Per-row certificates of an `UnfoldResult`, each of shape (batch,) (see the module's
    documentation for what each guarantees).

    Attributes:
        certified: bool, ``ERC(S) < 1`` on the row's support.
        erc: the exact recovery coefficient ``max_{j not in S} ||pinv(D~_S) d~_j||_1`` (0 for an
            empty support or one of every feature; NaN when the support's atoms are linearly
            dependent, which is never certified).
        erc_margin: ``1 - erc``.
        support_stability: ``min_i |c_i| ||d_i|| sigma_min(D~_S) / ||r||``.
    """

    certified: np.ndarray
    erc: np.ndarray
    erc_margin: np.ndarray
    support_stability: np.ndarray


def certify(result: UnfoldResult, dictionary: Dictionary) -> Certificate:
    """Certificates of every row of `result`, an answer of `solvers.unfold` over the prepared
    `dictionary` (`solvers.prepare`)."""
    indices = np.atleast_2d(result.indices).astype(np.int32)
    values = np.atleast_2d(result.values)
    residual = np.atleast_1d(result.residual_norm)
    width = max(indices.shape[1], 1)
    n_features = dictionary.n_features
    block = int(max(1, min(n_features, BLOCK_BYTES // (CHUNK_ROWS * width * 4))))
    parts = []
    with precision(dictionary.dtype):
        for start in range(0, indices.shape[0], CHUNK_ROWS):
            chunk_indices, chunk_values = (
                indices[start : start + CHUNK_ROWS],
                values[start : start + CHUNK_ROWS],
            )
            rows = len(chunk_indices)
            padded = 1 << max(3, (rows - 1).bit_length())
            pad = ((0, padded - rows), (0, 0))
            erc, smallest = _certify_chunk(
                dictionary,
                jnp.asarray(np.pad(chunk_indices, pad, constant_values=-1)),
                jnp.asarray(np.pad(chunk_values, pad)),
                block,
            )
            parts.append((np.asarray(erc)[:rows], np.asarray(smallest)[:rows]))
    erc = np.concatenate([p[0] for p in parts])
    smallest = np.concatenate([p[1] for p in parts])  # min |c_i| ||d_i|| sigma_min
    with np.errstate(divide="ignore", invalid="ignore"):
        stability = np.where(residual > 0, smallest / residual, np.inf)
    stability = np.where(np.isnan(smallest), np.nan, stability)
    certificate = Certificate(erc < 1, erc, 1 - erc, stability.astype(erc.dtype))
    if np.ndim(result.indices) == 1:
        return Certificate(*(field[0] for field in certificate))
    return certificate


@functools.partial(jax.jit, static_argnums=3)
def _certify_chunk(dictionary: Dictionary, indices, values, block: int):
    """(ERC, ``min_i |c_i| ||d_i|| sigma_min(D~_S)``) of each row, shapes (rows,)."""
    valid = indices >= 0
    idx = jnp.maximum(indices, 0)
    norms = dictionary.norms
    n_features = dictionary.n_features
    support_norms = jnp.where(valid, norms[idx], 1.0)
    if dictionary.gram is None:
        support = dictionary.atoms[idx] / support_norms[..., None]  # (rows, width, d_model)
        g_ss = einsum("bid,bjd->bij", support, support)
    else:
        g_ss = dictionary.gram[idx[:, :, None], idx[:, None, :]]
        g_ss = g_ss / (support_norms[:, :, None] * support_norms[:, None, :])
    mask = valid[:, :, None] & valid[:, None, :]
    eye = jnp.eye(indices.shape[1], dtype=g_ss.dtype)
    g_ss = jnp.where(mask, g_ss, eye)  # padding slots: identity, outside every product
    eigenvalues = jnp.linalg.eigvalsh(g_ss)
    smallest_eigenvalue = eigenvalues[:, 0]
    eps = jnp.finfo(g_ss.dtype).eps
    dependent = smallest_eigenvalue <= 100 * eps * indices.shape[1]
    chol = jnp.linalg.cholesky(jnp.where(dependent[:, None, None], eye, g_ss))

    def block_erc(start):
        """The largest ``||pinv(D~_S) d~_j||_1`` over the features j of one block."""
        start = jnp.minimum(start, n_features - block)  # the last block overlaps: max is safe
        columns = start + jnp.arange(block)
        block_norms = jax.lax.dynamic_slice_in_dim(norms, start, block)
        if dictionary.gram is None:
            atoms = jax.lax.dynamic_slice_in_dim(dictionary.atoms, start, block)
            cross = matmul(support, (atoms / block_norms[:, None]).T)  # (rows, width, block)
        else:
            gram_columns = jax.lax.dynamic_slice_in_dim(dictionary.gram, start, block, axis=1)
            cross = gram_columns[idx] / (support_norms[..., None] * block_norms)
        cross = jnp.where(valid[..., None], cross, 0.0)
        coefficients = jax.scipy.linalg.cho_solve((chol, True), cross)
        l1 = jnp.sum(jnp.abs(coefficients), axis=1)  # (rows, block)
        in_support = jnp.any(indices[:, :, None] == columns[None, None, :], axis=1)
        return jnp.max(jnp.where(in_support, -jnp.inf, l1), axis=1)

    starts = jnp.arange(0, n_features, block)
    erc = jnp.max(jax.lax.map(block_erc, starts), axis=0)
    erc = jnp.maximum(erc, 0.0)  # no feature outside S: the condition holds trivially
    erc = jnp.where(dependent, jnp.nan, erc)
    scaled = jnp.where(valid, jnp.abs(values) * support_norms, jnp.inf)
    smallest = jnp.min(scaled, axis=1) * jnp.sqrt(jnp.maximum(smallest_eigenvalue, 0.0))
    empty = ~jnp.any(valid, axis=1)
    erc = jnp.where(empty, 0.0, erc)
    smallest = jnp.where(empty | dependent, jnp.nan, smallest)
    return erc, smallest
