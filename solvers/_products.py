"""Every product the solvers compute, with its precision stated.

On accelerators a float32 product without a precision runs in a reduced-precision mode by
default (TF32 or bfloat16 passes on GPUs and TPUs), which would change atom selections, Gram
matrices and the Lipschitz bound. So every product goes through `matmul` or `einsum` here,
in strict float32 (or float64) arithmetic: ``Precision.HIGHEST``. On a CPU that is what
runs anyway. The one deliberate exception is `low_precision_scores`, whose errors
`solvers._omp` bounds and repairs (see `solvers._scan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRICT = jax.lax.Precision.HIGHEST
"""Full float32 (float64) products: no TF32 or bfloat16 passes on any backend."""


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in strict precision."""
    return jnp.matmul(a, b, precision=STRICT)


def einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum`` in strict precision."""
    return jnp.einsum(subscripts, *operands, precision=STRICT)


def low_precision_scores(residual_low: jax.Array, atoms_low: jax.Array) -> jax.Array:
    """``residual_low @ atoms_low.T`` of bfloat16 operands, of shapes (batch, d_model) and
    (n_features, d_model), accumulated in float32: a fast scan whose error the caller bounds.
    The operands are exact bfloat16 numbers, so each product is exact in float32 and only the
    accumulation rounds."""
    return jax.lax.dot_general(
        residual_low,
        atoms_low,
        (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.DEFAULT,
        preferred_element_type=jnp.float32,
    )
