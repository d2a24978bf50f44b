"""OMP against scikit-learn's orthogonal_mp and against ground truth."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from scipy.optimize import nnls
from sklearn.linear_model import orthogonal_mp

import solvers
from solvers import Status, _api
from solvers._api import run_in_lanes
from solvers._omp import select
from solvers._plan import padded_rows, split_rows
from tests.conftest import sparse_problem


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_matches_sklearn_orthogonal_mp(gram, k):
    dictionary, _, activations = sparse_problem(300, 80, 16, 6, noise=0.05, seed=k)
    prepared = solvers.prepare(dictionary, gram=gram)
    result = solvers.unfold(activations, prepared, method="omp", k=k)
    reference = orthogonal_mp(dictionary.T, activations.T, n_nonzero_coefs=k).T
    for row, ref in zip(result.to_dense(), reference, strict=True):
        assert set(np.flatnonzero(row)) == set(np.flatnonzero(ref))
    np.testing.assert_allclose(result.to_dense(), reference, atol=2e-4)
    np.testing.assert_array_equal(result.l0, k)
    np.testing.assert_array_equal(result.n_iter, k)


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_exact_recovery_below_phase_transition(gram):
    # delta = 128/1024, rho = 10/128 = 0.08: far below the l1 transition, OMP recovers exactly.
    dictionary, codes, activations = sparse_problem(1024, 128, 32, 10, seed=1)
    result = solvers.unfold(activations, solvers.prepare(dictionary, gram=gram), k=10)
    np.testing.assert_allclose(result.to_dense(), codes, atol=1e-4)
    assert np.all(result.relative_error < 1e-4)
    assert np.all(result.status == Status.EXACT)


def test_codes_in_dictionary_units_with_bias():
    dictionary, codes, _ = sparse_problem(400, 100, 8, 5, seed=2, unit_norm=False)
    bias = np.linspace(-1, 1, 100)
    activations = codes @ dictionary + bias
    result = solvers.unfold(activations, dictionary, bias=bias, k=5)
    np.testing.assert_allclose(result.to_dense(), codes, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(result.to_dense() @ dictionary + bias, activations, atol=1e-3)


def test_noisy_recovery_within_noise_level():
    noise = 0.01
    dictionary, codes, activations = sparse_problem(2048, 256, 16, 16, noise=noise, seed=3)
    result = solvers.unfold(activations, dictionary, k=16)
    dense = result.to_dense()
    assert all(
        set(np.flatnonzero(d)) == set(np.flatnonzero(c)) for d, c in zip(dense, codes, strict=True)
    )
    # The residual is the noise projected off a 16-dimensional support: about noise*sqrt(d-k).
    assert np.all(result.residual_norm < 1.5 * noise * np.sqrt(256))
    assert np.max(np.abs(dense - codes)) < 10 * noise


def test_tol_stops_early_and_reports_residual():
    dictionary, codes, activations = sparse_problem(500, 120, 6, 4, seed=4)
    result = solvers.unfold(activations, dictionary, tol=1e-3)
    np.testing.assert_array_equal(result.l0, 4)
    assert np.all(result.residual_norm <= 1e-3)
    direct = np.linalg.norm(activations - result.to_dense() @ dictionary, axis=1)
    np.testing.assert_allclose(result.residual_norm, direct, atol=1e-5)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_status_says_which_rule_stopped_each_row(gram, positive):
    dictionary, _, activations = sparse_problem(300, 80, 3, 6, seed=9, positive=positive)
    noisy = activations + 0.05 * np.random.default_rng(99).standard_normal(activations.shape)
    x = np.concatenate([activations, noisy])
    dictionary = solvers.prepare(dictionary, gram=gram)
    exact = solvers.unfold(x, dictionary, k=12, positive=positive)
    np.testing.assert_array_equal(exact.status[:3], Status.EXACT)
    np.testing.assert_array_equal(exact.status[3:], Status.K_REACHED)  # noise left at k=12
    short = solvers.unfold(x, dictionary, k=3, positive=positive)
    np.testing.assert_array_equal(short.status, Status.K_REACHED)
    np.testing.assert_array_equal(short.l0, 3)
    met = solvers.unfold(noisy, dictionary, k=12, tol=1.0, positive=positive)
    np.testing.assert_array_equal(met.status, Status.CONVERGED)
    assert np.all(met.residual_norm <= 1.0) and np.all(met.l0 < 12)
    assert "raise k" in short.messages()[0]


def test_single_vector_and_zero_row():
    dictionary, _, activations = sparse_problem(200, 50, 3, 3, seed=5)
    batch = solvers.unfold(activations, dictionary, k=3)
    single = solvers.unfold(activations[1], dictionary, k=3)
    assert single.indices.shape == (3,) and single.to_dense().shape == (200,)
    np.testing.assert_allclose(single.to_dense(), batch.to_dense()[1], atol=1e-6)
    zero = solvers.unfold(np.zeros(50), dictionary, k=3)
    assert zero.l0 == 0 and zero.status == Status.EXACT and zero.residual_norm == 0


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 70])
def test_any_batch_size_matches_row_by_row(batch):
    dictionary, _, activations = sparse_problem(128, 40, batch, 3, noise=0.01, seed=batch)
    result = solvers.unfold(activations, dictionary, k=3, block_rows=32)
    assert result.indices.shape == (batch, 3)
    for i in range(0, batch, 11):
        one = solvers.unfold(activations[i], dictionary, k=3)
        np.testing.assert_allclose(one.to_dense(), result.to_dense()[i], atol=1e-6)


# ------------------------------------------------------------------ selection and execution


@pytest.mark.parametrize("n_features", [7, 64, 300, 1024])
def test_select_is_first_argmax(n_features):
    rng = np.random.default_rng(n_features)
    correlations = rng.standard_normal((6, n_features)).astype(np.float32)
    correlations[1] = 0.0  # all tied: the first index
    correlations[2, [3, n_features - 1]] = 9.0  # tie between two: the first
    correlations[3, n_features - 1] = -9.0  # the largest magnitude is negative
    inv_norms = rng.uniform(0.5, 2.0, n_features).astype(np.float32)
    for positive in (False, True):
        for inv in (inv_norms, None):
            index, best = jax.jit(select, static_argnums=2)(correlations, inv, positive)
            scores = (correlations if positive else np.abs(correlations)) * (
                1.0 if inv is None else inv
            )
            np.testing.assert_array_equal(index, np.argmax(scores, axis=1))
            np.testing.assert_allclose(best, np.max(scores, axis=1), rtol=1e-6)


def test_execution_settings_do_not_change_results():
    dictionary, _, activations = sparse_problem(256, 48, 40, 5, noise=0.01, seed=6)
    prepared = solvers.prepare(dictionary)
    reference = solvers.unfold(activations, prepared, k=6, chunk_rows=8, streams=1)
    for chunk_rows, streams, block_rows in [(4, 2, 1024), (8, 4, 16), (16, 2, 1024)]:
        other = solvers.unfold(
            activations,
            prepared,
            k=6,
            chunk_rows=chunk_rows,
            streams=streams,
            block_rows=block_rows,
        )
        np.testing.assert_array_equal(other.indices, reference.indices)
        np.testing.assert_allclose(other.values, reference.values, atol=1e-6)


def test_padded_rows_buckets():
    assert [padded_rows(n, 8, 1024) for n in (1, 2, 3, 5, 8, 9, 17, 1000, 5000)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        32,
        1024,
        1024,
    ]
    assert [padded_rows(n, 8, 1024, min_rows=2) for n in (1, 2, 3, 9)] == [2, 2, 4, 16]


def test_split_rows_covers_the_batch_in_calls_a_stream_each():
    def spans(*args):
        return [(r.start, r.stop) for r in split_rows(*args)]

    # Full calls of block_rows // streams rows, then the rest shared by up to `streams` calls.
    assert spans(2048, 8, 1024, 2) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]
    assert spans(1025, 8, 1024, 2) == [(0, 512), (512, 1024), (1024, 1025)]
    assert spans(64, 8, 1024, 2) == [(0, 32), (32, 64)]
    assert spans(9, 8, 1024, 4) == [(0, 4), (4, 9)]  # at most a call per chunk of rows
    assert spans(64, 64, 1024, 2) == [(0, 64)]
    assert spans(1, 8, 1024, 2) == [(0, 1)]
    assert spans(0, 8, 1024, 2) == [(0, 0)]  # one empty call: empty results
    for n_rows in range(0, 300, 7):
        calls = split_rows(n_rows, 8, 64, 3)
        assert [i for call in calls for i in call] == list(range(n_rows))
        assert all(len(call) <= 16 for call in calls)  # 64 // 3 rounded down to chunks


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_run_in_lanes_keeps_order_and_runs_that_many_calls_at_once(lanes):
    together = threading.Barrier(lanes)  # passed only with `lanes` calls in progress
    lock = threading.Lock()
    running = peak = 0
    threads = set()

    def square(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        if i < lanes:
            together.wait(timeout=30)
        with lock:
            running -= 1
        return i * i

    assert run_in_lanes(square, list(range(9)), lanes) == [i * i for i in range(9)]
    assert peak == lanes
    assert threading.get_ident() in threads  # the caller is one of the lanes
    assert run_in_lanes(abs, [-4], lanes + 1) == [4]  # more lanes than items
    assert run_in_lanes(abs, [], lanes) == []


def test_run_in_lanes_stops_at_an_error_and_raises_it_once_every_lane_has_stopped():
    done = []

    def fail_on_three(i):
        if i == 3:
            raise ValueError("three")
        threading.Event().wait(0.01)
        done.append(i)
        return i

    with pytest.raises(ValueError, match="three"):
        run_in_lanes(fail_on_three, list(range(40)), 2)
    finished = len(done)
    assert finished < 39  # the other lane took no new item after the error
    threading.Event().wait(0.05)
    assert len(done) == finished  # and nothing runs on after the error is raised


def test_float64_holds_in_every_thread_of_a_batch():
    """Calls run on threads of their own; JAX's 64-bit mode, thread-local, must hold in each:
    a float64 batch split into several calls gives the float64 answer of a single call."""
    dictionary, _, activations = sparse_problem(256, 48, 40, 5, noise=0.01, seed=3)
    prepared = solvers.prepare(dictionary, dtype="float64")
    alone = solvers.unfold(activations, prepared, k=6, streams=1, block_rows=64)
    assert len(split_rows(40, 8, 16, 2)) > 2
    split = solvers.unfold(activations, prepared, k=6, streams=2, block_rows=16)
    assert split.values.dtype == np.float64
    np.testing.assert_array_equal(split.indices, alone.indices)
    np.testing.assert_allclose(split.values, alone.values, rtol=1e-12, atol=1e-12)
    lasso = solvers.unfold(activations, prepared, method="lasso", alpha=0.01, block_rows=128)
    assert lasso.duality_gap.dtype == np.float64
    assert np.all(lasso.duality_gap <= 1e-6 * 0.5 * np.sum(activations**2, axis=1))


@pytest.mark.parametrize(
    "params",
    [
        dict(tol=1e-3, positive=True),  # k = d_model = 120: deadlocked when run alongside
        dict(k=8),
        dict(method="lasso", alpha=0.01, positive=True),
        dict(method="fista", alpha=0.01, max_iter=200),
    ],
)
def test_calls_from_two_threads_at_once_finish_with_the_answers_of_one(params):
    """The service solves from several threads. XLA's CPU runtime deadlocked with two
    non-negative OMP programs at once (their loops factor a Gram block with LAPACK); those run
    alone (the CPU plan's `run_alone`), and every method gives from two threads what it gives
    from one."""
    dictionary, _, activations = sparse_problem(500, 120, 6, 4, seed=10, positive=True)
    prepared = solvers.prepare(dictionary)
    expected = solvers.unfold(activations, prepared, streams=1, **params)
    results = {}

    def solve(name):
        results[name] = [solvers.unfold(activations, prepared, **params) for _ in range(3)]

    threads = [threading.Thread(target=solve, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    for result in (r for runs in results.values() for r in runs):
        np.testing.assert_array_equal(result.indices, expected.indices)
        np.testing.assert_allclose(result.values, expected.values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("positive", [False, True])
def test_a_lone_row_padded_on_the_gram_path_equals_its_row_in_a_batch(positive, monkeypatch):
    """On a CPU, OMP solves a lone row padded to two rows on the Gram path (the plan's
    `min_rows`): the answer is that row's, with nothing of the padding."""
    dictionary, _, activations = sparse_problem(512, 64, 5, 6, noise=0.01, seed=8)
    prepared = solvers.prepare(dictionary)
    assert prepared.gram is not None
    batch = solvers.unfold(activations, prepared, k=6, positive=positive)
    solved_rows = []
    solve_block = _api._solve_jit

    def spy(settings, dictionary, x, *args):
        solved_rows.append(x.shape[0])
        return solve_block(settings, dictionary, x, *args)

    monkeypatch.setattr(_api, "_solve_jit", spy)
    for i, row in enumerate(activations):
        alone = solvers.unfold(row[None], prepared, k=6, positive=positive)
        assert solved_rows.pop() == 2
        assert alone.indices.shape == (1, 6)
        np.testing.assert_array_equal(alone.indices[0], batch.indices[i])
        np.testing.assert_allclose(alone.values[0], batch.values[i], atol=1e-6)
        np.testing.assert_allclose(alone.residual_norm[0], batch.residual_norm[i], rtol=1e-5)


# ------------------------------------------------------------------ non-negative OMP


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_nonnegative_exact_recovery(gram):
    dictionary, codes, activations = sparse_problem(1024, 128, 24, 10, seed=7, positive=True)
    result = solvers.unfold(
        activations, solvers.prepare(dictionary, gram=gram), k=10, positive=True
    )
    np.testing.assert_allclose(result.to_dense(), codes, atol=1e-4)
    assert np.all(result.status == Status.EXACT)


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_nonnegative_codes_solve_nnls_on_their_support(gram):
    # Correlated atoms (a common offset) and generic targets: supports change as atoms are
    # added (Lawson-Hanson drops some), and rows run out of positive correlations.
    rng = np.random.default_rng(8)
    dictionary = rng.standard_normal((60, 20)) + 1.5
    activations = rng.standard_normal((32, 20)) + 2.0
    result = solvers.unfold(
        activations, solvers.prepare(dictionary, gram=gram), k=12, positive=True
    )
    assert np.all(result.values >= 0)
    assert np.any(result.n_iter > result.l0)  # some atoms were dropped on the way
    assert np.any(result.status == Status.NO_POSITIVE_CORRELATION)
    for row in range(len(activations)):
        support = result.indices[row][result.indices[row] >= 0]
        assert len(support) == result.l0[row] <= 12 and len(set(support)) == len(support)
        reference, _ = nnls(dictionary[support].T, activations[row])
        np.testing.assert_allclose(result.values[row][: len(support)], reference, atol=2e-4)


def test_nonnegative_stops_at_the_global_nnls_solution():
    # More dimensions than atoms: the NNLS over the whole dictionary is unique, and a row that
    # stops for lack of positive correlations satisfies its optimality conditions.
    rng = np.random.default_rng(9)
    dictionary = rng.standard_normal((30, 60))
    activations = rng.standard_normal((8, 60))
    result = solvers.unfold(activations, dictionary, k=30, positive=True)
    assert np.all(result.status == Status.NO_POSITIVE_CORRELATION)
    for row, x in zip(result.to_dense(), activations, strict=True):
        np.testing.assert_allclose(row, nnls(dictionary.T, x)[0], atol=2e-4)


def test_nonnegative_on_orthonormal_atoms_keeps_the_positive_part():
    activations = np.array([[-1.0, 2.0, -3.0, 0.5, 0.0, 4.0], [-1.0] * 6])
    result = solvers.unfold(activations, np.eye(6), k=6, positive=True)
    np.testing.assert_allclose(result.to_dense(), np.maximum(activations, 0), atol=1e-6)
    np.testing.assert_array_equal(result.status, Status.NO_POSITIVE_CORRELATION)
    np.testing.assert_array_equal(result.l0, [3, 0])


def test_nonnegative_tol_and_bad_positive():
    dictionary, _, activations = sparse_problem(500, 120, 6, 4, seed=10, positive=True)
    result = solvers.unfold(activations, dictionary, tol=1e-3, positive=True)
    np.testing.assert_array_equal(result.l0, 4)
    assert np.all(result.residual_norm <= 1e-3)
    with pytest.raises(ValueError, match="positive"):
        solvers.unfold(activations, dictionary, k=3, positive="yes")
