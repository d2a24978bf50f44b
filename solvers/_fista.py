"""Proximal gradient on the LASSO objective, on the driver: restarted FISTA, or plain ISTA.

The one implementation behind `ista` and `fista` (on all features) and behind `lasso` (on a
working set's block, for the rows its homotopy cannot finish). FISTA restarts its momentum
when a step points uphill (the gradient scheme of O'Donoghue & Candes 2015). Each driver step
is `CHECK_EVERY` proximal steps, then a convergence check (a duality gap, which costs a
product with the dictionary); a row stops when the check says so (CONVERGED) or when its
budget of proximal steps is spent (MAX_ITER).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._driver import RUNNING, iterate, stop_code
from ._proximal import soft_threshold
from ._result import Status

CHECK_EVERY = 10
"""Proximal steps between two convergence checks."""


class FISTAState(NamedTuple):
    codes: jax.Array  # (batch, m)
    momentum_point: jax.Array  # (batch, m) y
    momentum: jax.Array  # (batch,) t
    n_iter: jax.Array  # (batch,) int32 proximal steps taken
    gap: jax.Array  # (batch,) at the last check
    met: jax.Array  # (batch,) bool: the last check said converged


def restarted_momentum(codes, point, new, momentum):
    """FISTA's next (momentum, point) after the step ``point -> new`` from `codes`, restarted
    (momentum 1, no extrapolation) when the step points uphill. Shapes (batch, m) and (batch,)."""
    uphill = jnp.sum((point - new) * (new - codes), axis=1) > 0
    t_next = jnp.where(uphill, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum**2)))
    beta = jnp.where(uphill, 0.0, (momentum - 1.0) / t_next)
    return t_next, new + beta[:, None] * (new - codes)


def proximal_gradient(
    codes: jax.Array,
    correlations: Callable[[jax.Array], jax.Array],
    step,
    alpha,
    positive: bool,
    check: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    budget,
    stop: jax.Array,
    *,
    accelerated: bool = True,
    cancel_rounds: int = 1,
    ask_first: bool = True,
) -> tuple[FISTAState, jax.Array]:
    """Minimise ``0.5 ||x - c D||^2 + alpha ||c||_1`` (``c >= 0`` if `positive`) per row from
    `codes` (batch, m).

    Args:
        correlations: ``c -> D (x - c D)`` of shape (batch, m), the negative gradient.
        step: the step size, a scalar or of shape (batch,) (at most 1 / Lipschitz).
        check: ``c -> (gap, met)``, each of shape (batch,).
        budget: most proximal steps per row (an integer, or of shape (batch,)).
        stop: the rows' stop codes before the first step (rows already stopped stay so).
        accelerated: FISTA with restart; False: ISTA.
        cancel_rounds, ask_first: how often (in rounds of `CHECK_EVERY` steps) and whether
            before the first, the loop asks whether the solve is cancelled (`iterate`).

    Returns:
        (final state, final stop codes).
    """
    batch = codes.shape[0]
    step = jnp.broadcast_to(jnp.asarray(step, codes.dtype), (batch,))[:, None]
    threshold = alpha * step
    budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), (batch,))

    def proximal_step(running: jax.Array, s: FISTAState) -> FISTAState:
        moving = running & (s.n_iter < budget)
        y = s.momentum_point
        new = soft_threshold(y + step * correlations(y), threshold, positive)
        if accelerated:
            momentum, point = restarted_momentum(s.codes, y, new, s.momentum)
        else:
            momentum, point = s.momentum, new
        keep = moving[:, None]
        return s._replace(
            codes=jnp.where(keep, new, s.codes),
            momentum_point=jnp.where(keep, point, s.momentum_point),
            momentum=jnp.where(moving, momentum, s.momentum),
            n_iter=s.n_iter + moving.astype(jnp.int32),
        )

    def driver_step(s: FISTAState, running: jax.Array) -> FISTAState:
        s = jax.lax.fori_loop(0, CHECK_EVERY, lambda _, s: proximal_step(running, s), s)
        gap, met = check(s.codes)
        return s._replace(gap=jnp.where(running, gap, s.gap), met=met)

    def terminate(s: FISTAState) -> jax.Array:
        return jnp.where(
            s.met,
            stop_code(Status.CONVERGED),
            jnp.where(s.n_iter >= budget, stop_code(Status.MAX_ITER), RUNNING),
        )

    gap, met = check(codes)
    start = FISTAState(
        codes=codes,
        momentum_point=codes,
        momentum=jnp.ones((batch,), codes.dtype),
        n_iter=jnp.zeros((batch,), jnp.int32),
        gap=gap,
        met=met,
    )
    stop = jnp.where(stop == RUNNING, terminate(start), stop)
    rounds = jnp.max(budget) // CHECK_EVERY + 1
    return iterate(
        driver_step,
        terminate,
        start,
        stop,
        rounds,
        cancel_every=cancel_rounds,
        ask_first=ask_first,
    )
