"""OMP's fast correlation scan: bfloat16 products whose selections are float32's.

Each step of matrix-free OMP picks the atom with the largest norm-scaled correlation
``s_j = |<r, d_j>| / ||d_j||`` with the residual ``r``: one product of the batch with the whole
dictionary, the bulk of the work. The scan computes it from ``bf16(r)`` and ``bf16(d_j)`` with
float32 accumulation (each product of two bfloat16 numbers is exact in float32), several times
faster on accelerators. Its scores ``s'_j`` are within

    B = ||r - bf16(r)|| + e ||bf16(r)||

of the float32 scores for every atom, where ``e`` (`Dictionary.scan_error`, computed once per
dictionary) bounds the atoms' rounding, float32 accumulation (with a 4x margin) and scaling.
So the float32 maximiser has ``s'_j >= max s' - 2 B``. Those candidates are found without a
full sort (block maxima, then the best blocks) and re-scored in strict float32 against the
gathered atoms; the best is taken, the lowest index on ties. A row with more than
`CANDIDATES` candidates (near-duplicate atoms, a residual at rounding level) cannot be settled
that way: when any running row of the batch has one, that step scans every row in float32.

The selections equal those of a float32 scan, except between atoms whose float32 scores are
equal to rounding (about 1e-7 relative): the re-scored dot products and the float32 product
round in different orders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._products import einsum, low_precision_scores

CANDIDATES = 16
"""Atoms re-scored in float32 per row and step."""
BLOCK = 128
"""Width of the blocks whose maxima narrow the search for candidates."""
BOUND_MARGIN = 1.0 + 2.0**-10
"""The bound is inflated this much against the rounding of its own computation."""


def scan(residual: jax.Array, scan_atoms: jax.Array, scan_error, inv_norms: jax.Array):
    """(scores, bound): the bfloat16 scan's norm-scaled signed correlations of `residual`
    (batch, d_model) with every atom, of shape (batch, n_features), and the bound ``B`` of
    their error, of shape (batch,)."""
    low = residual.astype(jnp.bfloat16)
    high = low.astype(residual.dtype)
    bound = jnp.linalg.norm(residual - high, axis=1) + scan_error * jnp.linalg.norm(high, axis=1)
    scores = low_precision_scores(low, scan_atoms) * inv_norms
    return scores, bound * BOUND_MARGIN


def top_candidates(scores: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of shape (batch, count): the `count` largest of `scores` (batch, n)
    when no more than `count` are at least any given threshold (the caller checks that), found
    from the best `count` blocks of `BLOCK` scores instead of a sort of all of them."""
    batch, n = scores.shape
    count = min(count, n)
    if n <= 4 * BLOCK:
        return jax.lax.top_k(scores, count)
    pad = -n % BLOCK
    blocks = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    blocks = blocks.reshape(batch, -1, BLOCK)
    n_blocks = blocks.shape[1]
    _, best_blocks = jax.lax.top_k(jnp.max(blocks, axis=2), min(count, n_blocks))
    gathered = jnp.take_along_axis(blocks, best_blocks[:, :, None], axis=1)
    values, positions = jax.lax.top_k(gathered.reshape(batch, -1), count)
    block = jnp.take_along_axis(best_blocks, positions // BLOCK, axis=1)
    return values, block * BLOCK + positions % BLOCK


def exact_select(
    scores: jax.Array,
    bound: jax.Array,
    residual: jax.Array,
    atoms: jax.Array,
    inv_norms: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(index, settled) of shape (batch,): the float32 maximiser of ``|<r, d_j>| / ||d_j||``
    among the candidates of the scan's signed `scores` (batch, n_features) within ``2 bound``
    of the best, and whether the row had at most `CANDIDATES` of them (else the index is not
    to be trusted). `residual` (batch, d_model) is r in float32."""
    magnitude = jnp.abs(scores)
    threshold = jnp.max(magnitude, axis=1) - 2 * bound
    settled = jnp.sum(magnitude >= threshold[:, None], axis=1) <= CANDIDATES
    values, indices = top_candidates(magnitude, CANDIDATES)
    exact = jnp.abs(einsum("bm,bkm->bk", residual, atoms[indices])) * inv_norms[indices]
    exact = jnp.where(values >= threshold[:, None], exact, -1.0)
    best = jnp.max(exact, axis=1)
    index = jnp.min(jnp.where(exact == best[:, None], indices, atoms.shape[0]), axis=1)
    return jnp.minimum(index, atoms.shape[0] - 1).astype(jnp.int32), settled
