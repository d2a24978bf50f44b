"""One driver for the methods' iterations: it owns the loop, the per-row stop codes and the
status every row ends with.

A method gives a `step` and a `terminate` over its batched state (a NamedTuple of arrays):

- ``step(state, running) -> state``: one iteration; `running` (batch,) bool says which rows
  are still going, and rows that are not must come out unchanged (the step masks what it
  writes: masking here, over every array of the state, would double the memory traffic of the
  methods whose state is large);
- ``terminate(state) -> stop``: (batch,) int32, a `Status` + 1 for each row that stops after
  this step, 0 for a row that goes on.

Rows stop once and for all (their first stop code is kept); the loop ends when every row has
stopped or after `max_steps` steps. `final_status` turns the codes into `Status`, with the one
the method names for rows still running at the end (OMP: `k` atoms reached, K_REACHED; LASSO
methods: the budget ran out, MAX_ITER).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._result import Status

RUNNING = 0
"""The stop code of a row that goes on."""


def stop_code(status: Status | jax.Array) -> jax.Array:
    """The stop code of a row that stops with `status`."""
    return jnp.asarray(status, jnp.int32) + 1


def iterate(
    step: Callable,
    terminate: Callable,
    state,
    stop: jax.Array,
    max_steps,
):
    """Run ``state = step(state, running)`` while some row runs, at most `max_steps` times
    (a static or traced integer). `stop` (batch,) int32: the rows' stop codes so far (rows
    already stopped take no step). Returns (state, stop)."""

    def cond(carry):
        _, stop, count = carry
        return (count < max_steps) & jnp.any(stop == RUNNING)

    def body(carry):
        state, stop, count = carry
        running = stop == RUNNING
        state = step(state, running)
        stop = jnp.where(running, terminate(state), stop).astype(jnp.int32)
        return state, stop, count + 1

    state, stop, _ = jax.lax.while_loop(cond, body, (state, stop.astype(jnp.int32), 0))
    return state, stop


def initial_stop(x_sq: jax.Array) -> jax.Array:
    """Stop codes before the first step, of shape (batch,): rows of centred activations whose
    squared norm `x_sq` is zero are `Status.EXACT` already."""
    return jnp.where(x_sq == 0, stop_code(Status.EXACT), RUNNING).astype(jnp.int32)


def final_status(stop: jax.Array, unfinished: Status) -> jax.Array:
    """`Status` codes, int32 of shape (batch,), from the final stop codes; rows still running
    when the loop ended get `unfinished`."""
    return jnp.where(stop == RUNNING, unfinished, stop - 1).astype(jnp.int32)
