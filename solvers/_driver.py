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

Cancellation: a solve traced within `cancellation(token)` asks the host every `cancel_every`
steps of each loop that allows it whether `token`'s `threading.Event` (`register`) is set, and
if so ends the loop at once (its rows keep the status of unfinished rows; the caller discards
them: `solvers.unfold` raises `Cancelled`). The question is a host callback, so a program that
asks it is not written to JAX's persistent compilation cache.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ._result import Status


class Cancelled(Exception):
    """The solve was stopped because its caller set the cancel event it was given."""


_FLAGS: dict[int, threading.Event] = {}
_TOKENS = itertools.count(1)
_SCOPE = threading.local()


@contextlib.contextmanager
def registered(event: threading.Event | None) -> Iterator[int]:
    """A token (an int, 0 for no event) by which programs ask whether `event` is set."""
    if event is None:
        yield 0
        return
    token = next(_TOKENS)
    _FLAGS[token] = event
    try:
        yield token
    finally:
        del _FLAGS[token]


def _is_set(token) -> np.bool_:
    flag = _FLAGS.get(int(token))
    return np.bool_(flag is not None and flag.is_set())


@contextlib.contextmanager
def cancellation(token: jax.Array | None) -> Iterator[None]:
    """While tracing: the loops of this solve ask whether `token` (a traced int32 scalar from
    `registered`) is cancelled; None: they never ask."""
    previous = getattr(_SCOPE, "token", None)
    _SCOPE.token = token
    try:
        yield
    finally:
        _SCOPE.token = previous


def _cancelled(token: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct((), jnp.bool_)
    return io_callback(_is_set, shape, token, ordered=False)


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
    *,
    cancel_every: int = 0,
    ask_first: bool = True,
):
    """Run ``state = step(state, running)`` while some row runs, at most `max_steps` times
    (a static or traced integer). `stop` (batch,) int32: the rows' stop codes so far (rows
    already stopped take no step). Within `cancellation`, every `cancel_every` steps (0: never)
    and, if `ask_first`, before the first step, the loop ends if the solve is cancelled (a
    loop nested in one that asks each step need not ask first). Returns (state, stop)."""
    token = getattr(_SCOPE, "token", None)
    asks = token is not None and cancel_every > 0

    def cond(carry):
        _, stop, count, halted = carry
        return (count < max_steps) & jnp.any(stop == RUNNING) & ~halted

    def body(carry):
        state, stop, count, halted = carry
        running = stop == RUNNING
        state = step(state, running)
        stop = jnp.where(running, terminate(state), stop).astype(jnp.int32)
        count = count + 1
        if asks:
            halted = jax.lax.cond(
                count % cancel_every == 0, lambda: _cancelled(token), lambda: jnp.bool_(False)
            )
        return state, stop, count, halted

    # Asked before the first step too: loops that follow one another (chunks, segments) stop
    # at once after a cancel, not after `cancel_every` steps each.
    halted = _cancelled(token) if asks and ask_first else jnp.bool_(False)
    start = (state, stop.astype(jnp.int32), 0, halted)
    state, stop, _, _ = jax.lax.while_loop(cond, body, start)
    return state, stop


def initial_stop(x_sq: jax.Array) -> jax.Array:
    """Stop codes before the first step, of shape (batch,): rows of centred activations whose
    squared norm `x_sq` is zero are `Status.EXACT` already."""
    return jnp.where(x_sq == 0, stop_code(Status.EXACT), RUNNING).astype(jnp.int32)


def final_status(stop: jax.Array, unfinished: Status) -> jax.Array:
    """`Status` codes, int32 of shape (batch,), from the final stop codes; rows still running
    when the loop ended get `unfinished`."""
    return jnp.where(stop == RUNNING, unfinished, stop - 1).astype(jnp.int32)
