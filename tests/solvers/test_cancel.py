"""A solve stops soon after its cancel event is set, in the middle of a compiled call too."""

from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers import _driver


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((2048, 128)).astype(np.float32)
    return dictionary, rng.standard_normal((64, 128)).astype(np.float32)


# Each would run for minutes (ISTA: 1e6 steps; LASSO: a path to a tiny penalty with no
# tolerance; OMP: k=120 on far more rows), far past the cancel; the short budgets compile the
# same programs first (max_iter is traced).
LONG = {
    "ista": ({"alpha": 1.0, "tol": 0.0, "max_iter": 10**6}, {"max_iter": 10}),
    "fista": ({"alpha": 1.0, "tol": 0.0, "max_iter": 10**5}, {"max_iter": 10}),
    "lasso": ({"alpha": 1e-3, "tol": 0.0, "max_iter": 10**5}, {"max_iter": 10}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(LONG))
def test_a_running_call_stops_within_a_second_of_its_cancel(problem, method):
    dictionary, x = problem
    prepared = solvers.prepare(dictionary)
    params, short = LONG[method]
    solvers.unfold(x, prepared, method, **{**params, **short})  # compiled, not timed
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    started = time.perf_counter()
    timer.start()
    with pytest.raises(solvers.Cancelled):
        solvers.unfold(x, prepared, method, cancel=cancel, **params)
    assert time.perf_counter() - started < 1.5
    assert not _driver._FLAGS  # the token is released


@pytest.mark.slow
@pytest.mark.parametrize("gram", [False, True])
def test_omp_with_a_large_k_stops_mid_call_and_a_small_k_asks_nothing(problem, gram):
    dictionary, x = problem
    prepared = solvers.prepare(dictionary, gram=gram)
    rows = np.tile(x, (16, 1))  # 1024 rows: one call of 120 steps
    run = functools.partial(solvers.unfold, rows, prepared, k=120, block_rows=1024)
    run()  # compiled, not timed
    started = time.perf_counter()
    assert (run().l0 > 64).all()
    whole = time.perf_counter() - started
    cancel = threading.Event()
    timer = threading.Timer(whole / 10, cancel.set)
    started = time.perf_counter()
    timer.start()
    with pytest.raises(solvers.Cancelled):
        run(cancel=cancel)
    assert time.perf_counter() - started < whole / 2
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(solvers.Cancelled):  # set before: no call starts
        run(cancel=cancel)

    plan = solvers.plan_for(solvers.make_settings("omp", prepared, k=120), prepared)
    program = jax.jit(solvers.solve, static_argnames="plan")

    def text(k: int) -> str:
        settings = solvers.make_settings("omp", prepared, k=k)
        return program.lower(settings, prepared, jnp.asarray(x), plan, jnp.int32(0)).as_text()

    assert "callback" in text(120)
    assert "callback" not in text(64)


def test_an_event_never_set_changes_no_answer(problem):
    dictionary, x = problem
    prepared = solvers.prepare(dictionary)
    cases = [("omp", {"k": 100}), ("lasso", {"alpha": 0.5}), ("fista", {"alpha": 1.0})]
    for method, params in cases:
        plain = solvers.unfold(x, prepared, method, **params)
        watched = solvers.unfold(x, prepared, method, cancel=threading.Event(), **params)
        np.testing.assert_array_equal(plain.indices, watched.indices)
        np.testing.assert_array_equal(plain.values, watched.values)
