"""The homotopy (LARS-lasso) path on a working set: the exact LASSO solution of a block of
features, followed from a known solution to a lower penalty.

Osborne, Presnell & Turlach (2000); Efron, Hastie, Johnstone & Tibshirani (2004), "the lasso
modification". For ``min 0.5 c^T G c - b.c + sum_j lam_j |c_j|`` the codes are piecewise
linear while the penalties move linearly: on the active set A the correlations ``b - G c``
equal ``lam_j * sign_j``, so the codes move along ``G[A, A]^-1 (sign * d lam / dt)`` until a
feature outside A reaches ``|correlation| = lam_j`` (it enters) or a code reaches zero (it
leaves). Each such event is one step. With all penalties equal this is the classic path down
to a level; unequal starting penalties let a solution computed on a smaller working set
continue on a larger one, its new features past the level entering as their penalties fall
(a weighted homotopy, as in Asif & Romberg's re-weighted l1 homotopy).

Batched over rows with static shapes. The active set lives in `capacity` slots, each holding a
feature's position in the block, its code and sign, its row of the block's Gram matrix, and
the *inverse* of the slots' Gram block (zero on free slots), which one symmetric rank-one
change updates when a feature enters (a bordering by its Schur complement) or leaves. A step
costs O(w * capacity + capacity^2) per row for a block of w features, and needs only the
entering feature's Gram row, never the w x w block. Correlations are recomputed from the codes
at every step (no drift by accumulation), so float32 paths stay on the exact one to rounding.

A row that cannot finish (a feature dependent on the active set, no free slot, or `max_steps`
reached) stops where it is and says so: the caller solves such rows by another method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._driver import RUNNING, iterate, stop_code
from ._products import einsum
from ._result import Status

PATH_CANCEL_EVERY = 64
"""Events between the questions whether the solve is cancelled (`iterate`; the refreshes
around a path ask before it)."""
DEPENDENT_SCHUR = 1e3
"""A feature whose Schur complement is under this many epsilons of its squared norm is
(numerically) dependent on the active set: the path stops there."""


class PathState(NamedTuple):
    """A point on the path: the solution at penalty `lam` of a block's problem."""

    positions: jax.Array  # (batch, capacity) int32 each slot's feature in the block, -1: free
    codes: jax.Array  # (batch, capacity) the slots' codes
    signs: jax.Array  # (batch, capacity) +1 / -1 on used slots, 0 on free ones
    inverse: jax.Array  # (batch, capacity, capacity) inverse of G[A, A], zero on free slots
    gram_rows: jax.Array  # (batch, capacity, w) the slots' rows of the block's Gram matrix


def empty_path(batch: int, capacity: int, width: int, dtype) -> PathState:
    """The zero solution (no feature active) on a block of `width` features."""
    return PathState(
        positions=jnp.full((batch, capacity), -1, jnp.int32),
        codes=jnp.zeros((batch, capacity), dtype),
        signs=jnp.zeros((batch, capacity), dtype),
        inverse=jnp.zeros((batch, capacity, capacity), dtype),
        gram_rows=jnp.zeros((batch, capacity, width), dtype),
    )


def _first_min(values: jax.Array):
    """(index, value) of the first minimum along the last axis of (batch, n), in two
    vectorised reductions (XLA's CPU argmin is a scalar loop)."""
    n = values.shape[1]
    best = jnp.min(values, axis=1)
    index = jnp.min(jnp.where(values == best[:, None], jnp.arange(n, dtype=jnp.int32), n), axis=1)
    return jnp.minimum(index, n - 1), best


def follow_path(
    gram_row: Callable[[jax.Array], jax.Array],
    squared_norms: jax.Array,
    targets: jax.Array,
    penalties: jax.Array,
    level: jax.Array,
    start: PathState,
    *,
    positive: bool,
    running: jax.Array,
    max_steps,
):
    """Follow, per row, the solutions of ``min 0.5 c^T G c - b.c + sum_j lam_j |c_j|``
    (optionally ``c >= 0``) while every penalty moves linearly from ``penalties[j]`` to
    `level`: ``lam_j(t) = penalties[j] - t (penalties[j] - level)`` for t from 0 to 1.

    `start` must solve the problem at t = 0: that holds for any solution at a common penalty
    L with ``penalties[j] = max(L, |b - G c|_j)`` (the features past L then enter at once), and
    for zero codes with every penalty at ``max_j |b_j|``; with equal penalties this is the
    classic homotopy down to `level`.

    Args:
        gram_row: maps features of the block, one per row (batch,) int32, to their rows of
            the block's Gram matrix G, (batch, w). Only the active features' rows are used
            (kept in the slots), so the w x w block itself is never needed.
        squared_norms: the diagonal of G, of shape (batch, w).
        targets: b, the correlations of the activations with the block's features, (batch, w).
        penalties: the penalties at t = 0, of shape (batch, w), each >= `level`.
        level: the common penalty at t = 1, of shape (batch,), >= 0.
        start: the solution at t = 0, its slots' positions and Gram rows referring to this
            block.
        positive: constrain codes to be >= 0.
        running: (batch,) bool: the rows to solve (others come back unchanged, not finished).
        max_steps: at most this many events (entries or exits) per row: an integer, or one
            per row of shape (batch,).

    Returns:
        (end, steps, finished, crowded): the `PathState` where each row stopped; steps (batch,)
        int32; finished (batch,) bool, True for the rows that reached t = 1 (their codes solve
        the problem at `level`, up to rounding); crowded (batch,) bool, True for the rows that
        stopped because a feature had to enter and no slot was free.
    """
    batch, width = targets.shape
    capacity = start.codes.shape[1]
    dtype = targets.dtype
    eps = jnp.finfo(dtype).eps
    features = jnp.arange(width, dtype=jnp.int32)
    slots = jnp.arange(capacity, dtype=jnp.int32)
    rows = jnp.arange(batch)
    level = jnp.broadcast_to(jnp.asarray(level, dtype), (batch,))
    speed = jnp.maximum(penalties - level[:, None], 0.0)  # (batch, w) -d lam_j / dt
    # A boundary approached this slowly (relative to the fastest penalty) is never reached.
    tiny = 100 * eps * jnp.max(speed, axis=1, keepdims=True)
    go = running & jnp.any(speed > 0, axis=1)
    used = start.positions >= 0
    safe = jnp.maximum(start.positions, 0)
    carry = (
        start,
        jnp.zeros((batch, width), bool).at[rows[:, None], safe].max(used),  # active features
        jnp.where(used, jnp.take_along_axis(speed, safe, axis=1), 0.0),  # the slots' speeds
        jnp.zeros((batch,), dtype),  # t
        # The feature that just left, not back at once across the bound it left by, stored
        # as its position + 1, negated when it left by -lam (0: none).
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.int32),  # the last step's outcome: a stop code, or RUNNING
        jnp.zeros((batch,), jnp.int32),  # steps
    )
    # Rows not to solve stop at once as MAX_ITER (neither finished nor crowded); rows where
    # nothing moves are finished (CONVERGED).
    stop = jnp.where(
        running, jnp.where(go, RUNNING, stop_code(Status.CONVERGED)), stop_code(Status.MAX_ITER)
    )

    def step(carry, go):
        s, active, slot_speed, t, barred, _, steps = carry
        used = s.signs != 0
        # d codes / dt on the active set keeps each active correlation at +-lam_j(t).
        direction = einsum("bij,bj->bi", s.inverse, s.signs * slot_speed)
        # One pass over the slots' Gram rows: the correlations and their rate of change.
        both = einsum("bkm,bmw->bkw", jnp.stack([s.codes, direction], 1), s.gram_rows)
        correlations = targets - both[:, 0]
        rate = both[:, 1]  # c(t + dt) = c - dt * rate
        lam = penalties - t[:, None] * speed  # (batch, w) lam_j(t)

        # Entry: an inactive feature's correlation reaches +lam_j (or -lam_j).
        candidate = ~active
        upward = jnp.where(
            candidate & (features + 1 != barred[:, None]) & (speed - rate > tiny),
            (lam - correlations) / (speed - rate),
            jnp.inf,
        )
        if positive:
            downward = jnp.full_like(upward, jnp.inf)
        else:
            downward = jnp.where(
                candidate & (-features - 1 != barred[:, None]) & (speed + rate > tiny),
                (lam + correlations) / (speed + rate),
                jnp.inf,
            )
        entering, dt_in = _first_min(jnp.maximum(jnp.minimum(upward, downward), 0.0))
        entering_sign = jnp.where((upward <= downward)[rows, entering], 1.0, -1.0).astype(dtype)
        # Exit: an active code reaches zero (at once for a zero code heading the wrong way).
        shrinking = used & (
            (s.codes * direction < 0) | ((s.codes == 0) & (s.signs * direction < 0))
        )
        leaving, dt_out = _first_min(
            jnp.where(shrinking, -s.codes / jnp.where(shrinking, direction, 1.0), jnp.inf)
        )
        dt_out = jnp.maximum(dt_out, 0.0)
        dt_stop = 1.0 - t

        stop = dt_stop <= jnp.minimum(dt_in, dt_out)
        leave = ~stop & (dt_out < dt_in)
        enter = ~stop & ~leave
        dt = jnp.where(stop, dt_stop, jnp.minimum(dt_in, dt_out))
        dt = jnp.where(go, dt, 0.0)
        codes = s.codes + dt[:, None] * direction
        codes = jnp.where(leave[:, None] & (slots == leaving[:, None]), 0.0, codes)

        # The entering feature against the active set: its Schur complement, and a free slot.
        column = jnp.where(used, s.gram_rows[rows, :, entering], 0.0)  # G[A, j]
        overlap = einsum("bij,bj->bi", s.inverse, column)  # G[A, A]^-1 G[A, j]
        norm_sq = squared_norms[rows, entering]
        schur = norm_sq - jnp.sum(column * overlap, axis=1)
        free = jnp.min(jnp.where(used, capacity, slots), axis=1)  # first free slot
        no_slot = go & enter & (free >= capacity)
        dependent = go & enter & (schur <= DEPENDENT_SCHUR * eps * norm_sq)
        blocked = no_slot | dependent
        free = jnp.minimum(free, capacity - 1)

        # Rank-one updates: entering borders the inverse with (overlap - e_free) / schur;
        # leaving slot p removes it with - inverse[:, p] inverse[p, :] / inverse[p, p].
        leaving_column = s.inverse[rows, :, leaving]
        pivot = leaving_column[rows, leaving]
        entering_slot = slots == free[:, None]
        leaving_slot = slots == leaving[:, None]
        vector = jnp.where(enter[:, None], overlap - entering_slot.astype(dtype), leaving_column)
        weight = jnp.where(
            enter,
            1.0 / jnp.where(blocked | ~enter, 1.0, schur),
            -1.0 / jnp.where(leave, pivot, 1.0),
        )
        update = go & ~stop & ~blocked
        weight = jnp.where(update, weight, 0.0)
        enters = (update & enter)[:, None] & entering_slot
        leaves = (update & leave)[:, None] & leaving_slot
        signs = jnp.where(enters, entering_sign[:, None], jnp.where(leaves, 0.0, s.signs))
        positions = jnp.where(enters, entering[:, None], jnp.where(leaves, -1, s.positions))
        left = update & leave
        left_feature = s.positions[rows, leaving]
        active = jnp.where(
            (update & enter)[:, None] & (features == entering[:, None]),
            True,
            jnp.where(left[:, None] & (features == left_feature[:, None]), False, active),
        )
        slot_speed = jnp.where(
            enters, speed[rows, entering][:, None], jnp.where(leaves, 0.0, slot_speed)
        )
        now_used = signs != 0
        inverse = s.inverse + weight[:, None, None] * vector[:, :, None] * vector[:, None, :]
        inverse = jnp.where(now_used[:, :, None] & now_used[:, None, :], inverse, 0.0)

        steps = steps + go.astype(jnp.int32)
        keep = go[:, None]
        entered = update & enter
        gram_rows = s.gram_rows.at[rows, jnp.where(entered, free, capacity)].set(
            gram_row(entering), mode="drop"
        )
        moved = PathState(
            positions=positions,
            codes=jnp.where(keep, codes, s.codes),
            signs=signs,
            inverse=inverse,
            gram_rows=gram_rows,
        )
        return (
            moved,
            active,
            slot_speed,
            jnp.where(go, jnp.where(stop, 1.0, t + dt), t),
            jnp.where(
                go & leave,
                (left_feature + 1) * s.signs[rows, leaving].astype(jnp.int32),
                0,
            ),
            jnp.where(
                stop,
                stop_code(Status.CONVERGED),
                jnp.where(
                    no_slot,
                    stop_code(Status.TOO_MANY_NONZEROS),
                    jnp.where(
                        dependent,
                        stop_code(Status.DEPENDENT),
                        jnp.where(steps >= max_steps, stop_code(Status.MAX_ITER), RUNNING),
                    ),
                ),
            ),
            steps,
        )

    def terminate(carry) -> jax.Array:
        return carry[5]

    (end, *_, steps), stop = iterate(
        step,
        terminate,
        carry,
        stop,
        jnp.max(max_steps),
        cancel_every=PATH_CANCEL_EVERY,
        ask_first=False,
    )
    finished = stop == stop_code(Status.CONVERGED)
    crowded = stop == stop_code(Status.TOO_MANY_NONZEROS)
    return end, steps, finished, crowded
