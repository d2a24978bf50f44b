"""Properties every method must have, checked with hypothesis on random problems.

Shapes and settings are fixed (and shared with test_lasso.py) so that each method compiles a
few programs; hypothesis varies the data. Comparisons run in float64 unless they are about
float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from tests.conftest import sparse_problem
from tests.solvers.test_lasso import ALPHA, BATCH, D_MODEL, MAX_ITER, N_FEATURES, objective

K = 4
PARAMS = {
    "omp": {"k": K},
    "lasso": {"alpha": ALPHA, "max_iter": MAX_ITER["lasso"]},
    "fista": {"alpha": ALPHA, "max_iter": MAX_ITER["fista"]},
    "ista": {"alpha": ALPHA, "max_iter": MAX_ITER["ista"]},
}
METHODS = list(PARAMS)
LASSO_METHODS = ["lasso", "fista", "ista"]
# Agreement expected between two solves that each meet the relative gap tolerance 1e-6.
CODES_ATOL = {"omp": 1e-9, "lasso": 2e-3, "fista": 2e-3, "ista": 2e-3}

examples = settings(max_examples=4, deadline=None, derandomize=True)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def problem(seed: int, *, positive: bool = False):
    dictionary, _, activations = sparse_problem(
        N_FEATURES, D_MODEL, BATCH, K, noise=0.05, seed=seed, positive=positive
    )
    return dictionary, activations


def run(method, activations, dictionary, dtype="float64", **extra):
    return solvers.unfold(
        activations, dictionary, method=method, dtype=dtype, **PARAMS[method], **extra
    )


def assert_same_solution(method, codes, expected, activations, dictionary, alpha=ALPHA):
    if method == "omp":
        np.testing.assert_allclose(codes, expected, atol=CODES_ATOL[method], rtol=1e-7)
        return
    # Both solutions are certified to a relative gap of 1e-6: their objectives agree to that,
    # and (the minimiser being unique for a random dictionary) their codes nearly.
    ours = objective(codes, activations, dictionary, alpha)
    theirs = objective(expected, activations, dictionary, alpha)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    np.testing.assert_allclose(codes, expected, atol=CODES_ATOL[method])


@pytest.mark.parametrize("method", METHODS)
@examples
@given(seed=seeds, data=st.data())
def test_permuting_features_permutes_codes(method, seed, data):
    dictionary, activations = problem(seed)
    perm = np.array(data.draw(st.permutations(range(N_FEATURES)), label="permutation"))
    codes = run(method, activations, dictionary).to_dense()
    permuted = run(method, activations, dictionary[perm]).to_dense()
    assert_same_solution(method, permuted, codes[:, perm], activations, dictionary[perm])


@examples
@given(
    seed=seeds,
    scales=st.lists(
        st.floats(0.25, 4.0, allow_nan=False), min_size=N_FEATURES, max_size=N_FEATURES
    ),
)
def test_scaling_a_row_scales_its_omp_code_inversely(seed, scales):
    # OMP picks atoms by normalised correlation and fits by least squares: scale-free.
    dictionary, activations = problem(seed)
    scales = np.asarray(scales)
    codes = run("omp", activations, dictionary).to_dense()
    scaled = run("omp", activations, dictionary * scales[:, None]).to_dense()
    np.testing.assert_allclose(scaled * scales, codes, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", LASSO_METHODS)
@examples
@given(seed=seeds)
def test_scaling_dictionary_and_alpha_scales_lasso_codes_inversely(method, seed):
    # The l1 penalty is in the dictionary's units, so scaling one row alone changes the
    # problem. Scaling every row by s and alpha by s does not: codes scale by 1 / s.
    s = 2.0
    dictionary, activations = problem(seed)
    codes = run(method, activations, dictionary).to_dense()
    params = {**PARAMS[method], "alpha": s * ALPHA}
    scaled = solvers.unfold(
        activations, s * dictionary, method=method, dtype="float64", **params
    ).to_dense()
    assert_same_solution(method, s * scaled, codes, activations, dictionary)


@pytest.mark.parametrize("method", METHODS)
@examples
@given(seed=seeds, row=st.integers(0, BATCH - 1))
def test_batch_of_one_equals_single_vector(method, seed, row):
    dictionary, activations = problem(seed)
    batch = run(method, activations, dictionary)
    single = run(method, activations[row], dictionary)
    assert single.indices.ndim == 1 and np.ndim(single.status) == 0
    assert_same_solution(
        method, single.to_dense()[None], batch.to_dense()[row][None], activations[row], dictionary
    )
    assert single.status == batch.status[row]
    np.testing.assert_allclose(single.residual_norm, batch.residual_norm[row], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@examples
@given(seed=seeds)
def test_float32_agrees_with_float64(method, seed):
    dictionary, activations = problem(seed, positive=True)
    double = run(method, activations, dictionary)
    single = run(method, activations, dictionary, dtype="float32")
    assert single.values.dtype == np.float32 and double.values.dtype == np.float64
    np.testing.assert_array_equal(single.status, double.status)
    dense32 = single.to_dense().astype(np.float64)
    dense64 = double.to_dense()
    if method == "omp":
        np.testing.assert_array_equal(np.sign(dense32), np.sign(dense64))
        np.testing.assert_allclose(dense32, dense64, atol=1e-4)
    else:
        # float32 certifies its gap only to about 1e-4 of the objective (see gap_floor).
        ours = objective(dense32, activations, dictionary, ALPHA)
        theirs = objective(dense64, activations, dictionary, ALPHA)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
        np.testing.assert_allclose(dense32, dense64, atol=1e-2)
    np.testing.assert_allclose(single.residual_norm, double.residual_norm, rtol=1e-3, atol=1e-5)
