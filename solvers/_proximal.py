"""Pieces every LASSO solver shares: the proximal step, the duality gap, the padded output.

The objective, per row, in the dictionary's own units (rows need not be unit-norm):

    P(c) = 0.5 * ||x - c @ D||^2 + alpha * ||c||_1        (optionally c >= 0)

Its dual is ``max_theta 0.5 ||x||^2 - 0.5 ||x - theta||^2`` subject to ``|D theta| <= alpha``
(``D theta <= alpha`` when ``c >= 0``). From the residual ``r = x - c @ D`` and its correlations
``D r`` the dual point ``theta = s r`` with ``s = min(1, alpha / max|D r|)`` is feasible, and

    gap = P(c) - dual(theta)
        = 0.5 (1 - s)^2 ||r||^2 + sum_j (alpha |c_j| - s c_j (D r)_j),

a sum of non-negative terms that never subtracts two large numbers (``||x||^2`` cancels
analytically), so it stays meaningful in float32 down to rounding of the correlations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GAP_FLOOR_FACTOR = 8.0
"""A gap below this many float epsilons times the scale of its rounding error is noise."""


def soft_threshold(v: jax.Array, threshold, positive: bool) -> jax.Array:
    """The proximal map of ``threshold * ||.||_1`` (plus the indicator of ``c >= 0``)."""
    if positive:
        return jnp.maximum(v - threshold, 0.0)
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - threshold, 0.0)


def dual_scale(correlations: jax.Array, alpha, positive: bool) -> jax.Array:
    """``s`` in (0, 1] that makes ``s * r`` dual-feasible, from ``D r`` of shape (batch, m).

    Only the features in `correlations` are checked: pass all of them for a global gap.
    """
    return scale_from_peak(peak_correlation(correlations, positive), alpha)


def peak_correlation(correlations: jax.Array, positive: bool) -> jax.Array:
    """The largest (absolute, unless `positive`) correlation of each row, of shape (batch,)."""
    return jnp.max(correlations if positive else jnp.abs(correlations), axis=-1)


def scale_from_peak(peak: jax.Array, alpha) -> jax.Array:
    """`dual_scale` from the rows' `peak_correlation`."""
    return jnp.where(peak <= alpha, 1.0, alpha / jnp.where(peak <= alpha, 1.0, peak))


def duality_gap(residual_sq, codes, correlations_at_codes, scale, alpha):
    """(gap, primal) per row.

    Args:
        residual_sq: ``||r||^2`` of shape (batch,).
        codes: of shape (batch, m), the non-zero codes (any superset of the support).
        correlations_at_codes: ``(D r)_j`` for the same features, of shape (batch, m).
        scale: the dual scaling `s` of shape (batch,), from `dual_scale` over all features.
        alpha: the l1 penalty.
    """
    l1 = jnp.sum(jnp.abs(codes), axis=-1)
    coupling = jnp.sum(codes * correlations_at_codes, axis=-1)
    gap = 0.5 * (1.0 - scale) ** 2 * residual_sq + (alpha * l1 - scale * coupling)
    primal = 0.5 * residual_sq + alpha * l1
    return jnp.maximum(gap, 0.0), primal


def gap_floor(x_norm, weighted_l1, dtype) -> jax.Array:
    """The rounding noise of a computed gap, ``eps * ||x|| * (||x|| + sum_j |c_j| ||d_j||)``.

    The correlations ``D r`` carry an error of about ``eps * ||x|| * ||d_j||``, weighted by
    ``|c_j|`` in the gap. A gap below this is indistinguishable from zero in `dtype`, so a
    tolerance under it counts as met (in float32 this is typically 1e-5 to 1e-3 of the
    objective; in float64 it is negligible).
    """
    eps = jnp.finfo(dtype).eps
    return GAP_FLOOR_FACTOR * eps * x_norm * (x_norm + weighted_l1)


def gap_met(gap, primal, floor, tol) -> jax.Array:
    """Whether a row's gap meets the relative tolerance ``gap <= tol * primal`` (or the floor)."""
    return gap <= jnp.maximum(tol * primal, floor)


def padded_from_dense(codes: jax.Array, width: int):
    """The `width` largest-magnitude codes of each row of `codes` (batch, n_features).

    Returns:
        indices (batch, width) int32 with -1 padding, values (batch, width) with 0 padding,
        sorted by decreasing magnitude, and `overflow` (batch,) bool: the row had more
        non-zeros than `width` (the smallest were dropped; the caller must report it).
    """
    magnitude = jnp.abs(codes)
    top, indices = jax.lax.top_k(magnitude, width)
    nonzero = top > 0
    values = jnp.take_along_axis(codes, indices, axis=1)
    overflow = jnp.sum(magnitude > 0, axis=1) > width
    return (
        jnp.where(nonzero, indices, -1).astype(jnp.int32),
        jnp.where(nonzero, values, 0.0),
        overflow,
    )
