"""OMP against scikit-learn's orthogonal_mp and against ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import orthogonal_mp

import solvers
from solvers import Status
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
