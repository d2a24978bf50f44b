"""The LASSO methods (ista, fista, lasso) against scikit-learn and against ground truth.

Tight comparisons run in float64 (`dtype="float64"`, JAX's 64-bit mode enabled only for the
call); float32 is checked to the precision float32 allows. Shapes are shared between tests so
that each (method, settings, shape) compiles once.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.linear_model import Lasso, LassoLars

import solvers
from solvers import Status
from tests.conftest import sparse_problem

LASSO_METHODS = ["lasso", "fista", "ista"]
ALPHA = 0.05
N_FEATURES, D_MODEL, BATCH = 256, 64, 8
MAX_ITER = {"lasso": 10000, "fista": 20000, "ista": 200000}


def objective(codes, activations, dictionary, alpha, bias=0.0):
    residual = activations - bias - codes @ dictionary
    return 0.5 * np.sum(residual**2, axis=-1) + alpha * np.sum(np.abs(codes), axis=-1)


def sklearn_lasso(dictionary, activations, alpha, positive, lars=False):
    """scikit-learn's solution of 0.5||x - c D||^2 + alpha ||c||_1, row by row.

    scikit-learn minimises (1 / (2 n_samples)) ||y - X w||^2 + a ||w||_1 with n_samples =
    d_model here, hence a = alpha / d_model.
    """
    d_model = dictionary.shape[1]
    if lars:
        model = LassoLars(alpha=alpha / d_model, fit_intercept=False, positive=positive)
    else:
        model = Lasso(
            alpha=alpha / d_model, fit_intercept=False, positive=positive, tol=1e-14, max_iter=10**6
        )
    return np.array([model.fit(dictionary.T, x).coef_ for x in activations])


def reference_gap(codes, activations, dictionary, alpha, positive):
    """The duality gap of DESIGN.md, computed independently in numpy (float64)."""
    residual = activations - codes @ dictionary
    corr = residual @ dictionary.T
    peak = np.max(corr if positive else np.abs(corr), axis=1)
    scale = np.minimum(1.0, alpha / np.maximum(peak, 1e-300))
    theta = scale[:, None] * residual
    dual = 0.5 * np.sum(activations**2, 1) - 0.5 * np.sum((activations - theta) ** 2, 1)
    return objective(codes, activations, dictionary, alpha) - dual


@pytest.fixture(scope="module")
def noisy():
    return sparse_problem(N_FEATURES, D_MODEL, BATCH, 6, noise=0.05, seed=11)


@pytest.fixture(scope="module")
def noisy_positive():
    return sparse_problem(N_FEATURES, D_MODEL, BATCH, 6, noise=0.05, seed=12, positive=True)


@pytest.mark.parametrize(
    ("method", "positive"),
    [("lasso", False), ("lasso", True), ("fista", False), ("fista", True), ("ista", False)],
)
def test_matches_sklearn_lasso_float64(method, positive, noisy, noisy_positive):
    dictionary, _, activations = noisy_positive if positive else noisy
    result = solvers.unfold(
        activations,
        dictionary,
        method=method,
        alpha=ALPHA,
        positive=positive,
        max_iter=MAX_ITER[method],
        dtype="float64",
    )
    assert result.values.dtype == np.float64
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    codes = result.to_dense()
    reference = sklearn_lasso(dictionary, activations, ALPHA, positive)
    ours = objective(codes, activations, dictionary, ALPHA)
    theirs = objective(reference, activations, dictionary, ALPHA)
    assert np.all(np.abs(ours - theirs) <= 1e-6 * theirs), (ours - theirs) / theirs
    np.testing.assert_allclose(codes, reference, atol=2e-3)
    if positive:
        assert np.all(codes >= 0)
    # The reported gap is the gap of the returned codes, and certifies them.
    np.testing.assert_allclose(
        result.duality_gap,
        reference_gap(codes, activations, dictionary, ALPHA, positive),
        rtol=1e-4,
        atol=1e-12,
    )
    assert np.all(result.duality_gap <= 1e-6 * ours)
    assert np.all(result.n_iter >= 1) and np.all(result.n_iter <= MAX_ITER[method])


@pytest.mark.parametrize("positive", [False, True], ids=["signed", "positive"])
def test_lasso_matches_lasso_lars(positive, noisy, noisy_positive):
    dictionary, _, activations = noisy_positive if positive else noisy
    result = solvers.unfold(
        activations,
        dictionary,
        method="lasso",
        alpha=ALPHA,
        positive=positive,
        max_iter=MAX_ITER["lasso"],
        dtype="float64",
    )
    reference = sklearn_lasso(dictionary, activations, ALPHA, positive, lars=True)
    codes = result.to_dense()
    ours = objective(codes, activations, dictionary, ALPHA)
    theirs = objective(reference, activations, dictionary, ALPHA)
    assert np.all(ours <= theirs * (1 + 1e-6)), (ours - theirs) / theirs
    for row, ref in zip(codes, reference, strict=True):
        assert set(np.flatnonzero(np.abs(row) > 1e-6)) == set(np.flatnonzero(np.abs(ref) > 1e-6))


@pytest.mark.parametrize("method", ["lasso", "fista"])
def test_float32_converges_to_float32_precision(method, noisy):
    dictionary, _, activations = noisy
    result = solvers.unfold(
        activations, dictionary, method=method, alpha=ALPHA, max_iter=MAX_ITER[method]
    )
    assert result.values.dtype == np.float32
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    reference = sklearn_lasso(dictionary, activations, ALPHA, False)
    ours = objective(result.to_dense().astype(np.float64), activations, dictionary, ALPHA)
    theirs = objective(reference, activations, dictionary, ALPHA)
    assert np.all(np.abs(ours - theirs) <= 1e-5 * theirs), (ours - theirs) / theirs
    assert np.all(result.duality_gap <= 1e-3 * ours)


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_lasso_units_and_bias_match_sklearn(gram):
    # Rows of very different norms: codes come back in the dictionary's own units.
    dictionary, codes, _ = sparse_problem(N_FEATURES, D_MODEL, BATCH, 6, seed=13, unit_norm=False)
    bias = np.linspace(-0.5, 0.5, D_MODEL)
    rng = np.random.default_rng(0)
    activations = codes @ dictionary + bias + 0.05 * rng.standard_normal((BATCH, D_MODEL))
    prepared = solvers.prepare(dictionary, bias, dtype="float64", gram=gram)
    assert (prepared.gram is not None) == gram
    result = solvers.unfold(
        activations, prepared, method="lasso", alpha=ALPHA, dtype="float64", max_iter=10000
    )
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    reference = sklearn_lasso(dictionary, activations - bias, ALPHA, False)
    ours = objective(result.to_dense(), activations, dictionary, ALPHA, bias)
    theirs = objective(reference, activations, dictionary, ALPHA, bias)
    assert np.all(np.abs(ours - theirs) <= 1e-6 * theirs)
    residual = activations - bias - result.to_dense() @ dictionary
    np.testing.assert_allclose(result.residual_norm, np.linalg.norm(residual, axis=1), rtol=1e-8)


def test_fista_on_the_gram_path_matches_sklearn():
    # n_features <= 2 d_model: ISTA/FISTA take their products with the Gram matrix.
    dictionary, _, activations = sparse_problem(96, D_MODEL, BATCH, 5, noise=0.05, seed=14)
    result = solvers.unfold(activations, dictionary, method="fista", alpha=ALPHA, dtype="float64")
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    reference = sklearn_lasso(dictionary, activations, ALPHA, False)
    ours = objective(result.to_dense(), activations, dictionary, ALPHA)
    theirs = objective(reference, activations, dictionary, ALPHA)
    assert np.all(np.abs(ours - theirs) <= 1e-6 * theirs)


# --------------------------------------------------------------------------------------------
# Ground truth: l1 recovery around the Donoho-Tanner phase transition.
# delta = d_model / n_features = 0.25: 50% success at rho = k / d_model = 0.267 (signed).
# alpha is small against the codes (0.5 to 2): LASSO shrinks each code by about alpha.

PT_FEATURES, PT_MODEL, PT_BATCH, PT_ALPHA = 512, 128, 8, 1e-3


def test_lasso_recovers_below_phase_transition():
    # rho = 13 / 128 = 0.10, well below 0.267: the codes are found up to the shrinkage.
    dictionary, codes, activations = sparse_problem(PT_FEATURES, PT_MODEL, PT_BATCH, 13, seed=21)
    result = solvers.unfold(
        activations, dictionary, method="lasso", alpha=PT_ALPHA, dtype="float64"
    )
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    np.testing.assert_allclose(result.to_dense(), codes, atol=3 * PT_ALPHA)
    np.testing.assert_array_equal(np.sum(np.abs(result.values) > 10 * PT_ALPHA, axis=1), 13)
    assert np.all(result.relative_error < 2e-3)


def test_lasso_fails_above_phase_transition():
    # rho = 77 / 128 = 0.60, far above 0.267: the true codes are not the minimiser. The
    # solver returns codes far from them with a strictly smaller objective, which proves it
    # whatever the solver's own convergence.
    dictionary, codes, activations = sparse_problem(PT_FEATURES, PT_MODEL, PT_BATCH, 77, seed=22)
    result = solvers.unfold(
        activations, dictionary, method="lasso", alpha=PT_ALPHA, dtype="float64"
    )
    found = result.to_dense()
    truth_objective = objective(codes, activations, dictionary, PT_ALPHA)
    beats_truth = objective(found, activations, dictionary, PT_ALPHA) < 0.9 * truth_objective
    wrong = np.max(np.abs(found - codes), axis=1) > 0.5
    assert np.mean(beats_truth & wrong) >= 0.75


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_lasso_grows_its_working_set_for_large_supports(gram):
    # About d_model non-zeros: more than the first working set (128) holds, so the rows move
    # on to a working set of 2 * max_nonzero = 256 features (matrix-free: with products
    # through the whole dictionary); the answer must not change.
    dictionary, _, activations = sparse_problem(
        PT_FEATURES, PT_MODEL, PT_BATCH, 40, noise=0.05, seed=5
    )
    alpha = 0.01
    prepared = solvers.prepare(dictionary, dtype="float64", gram=gram)
    result = solvers.unfold(activations, prepared, method="lasso", alpha=alpha, dtype="float64")
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    assert np.all(result.l0 > 7 / 8 * 128)
    ours = objective(result.to_dense(), activations, dictionary, alpha)
    theirs = objective(
        sklearn_lasso(dictionary, activations, alpha, False), activations, dictionary, alpha
    )
    assert np.all(np.abs(ours - theirs) <= 1e-6 * theirs)


def test_lasso_noisy_recovery_within_noise_level():
    # alpha = ALPHA is about 4 times the noise's largest correlation with an atom
    # (noise * sqrt(2 log n_features)).
    alpha = ALPHA
    noise = alpha / (4 * np.sqrt(2 * np.log(N_FEATURES)))
    dictionary, codes, activations = sparse_problem(
        N_FEATURES, D_MODEL, BATCH, 4, noise=noise, seed=23
    )
    result = solvers.unfold(
        activations,
        dictionary,
        method="lasso",
        alpha=alpha,
        max_iter=MAX_ITER["lasso"],
        dtype="float64",
    )
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    found = result.to_dense()
    for row, truth in zip(found, codes, strict=True):
        assert set(np.flatnonzero(row)) == set(np.flatnonzero(truth))
    # LASSO shrinks each code by about alpha; beyond that the error is at the noise level.
    assert np.max(np.abs(found - codes)) < 2 * alpha
    assert np.all(result.residual_norm < noise * np.sqrt(D_MODEL) + 2 * alpha * np.sqrt(4))


# --------------------------------------------------------------------------------------------
# Statuses and edge cases


@pytest.mark.parametrize("method", ["lasso", "fista"])
def test_alpha_above_alpha_max_gives_zero_codes(method, noisy):
    dictionary, _, activations = noisy
    # Scale the activations so that alpha_max = max |D x| falls just under alpha.
    activations = activations * (0.99 * ALPHA / np.max(np.abs(activations @ dictionary.T)))
    result = solvers.unfold(
        activations, dictionary, method=method, alpha=ALPHA, max_iter=MAX_ITER[method]
    )
    assert np.all(result.l0 == 0) and np.all(result.indices == -1)
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    np.testing.assert_array_equal(result.duality_gap, 0.0)


def test_max_iter_reached_is_reported(noisy):
    dictionary, _, activations = noisy
    result = solvers.unfold(
        activations, dictionary, method="ista", alpha=ALPHA, max_iter=3, max_nonzero=N_FEATURES
    )
    np.testing.assert_array_equal(result.status, Status.MAX_ITER)
    np.testing.assert_array_equal(result.n_iter, 3)
    assert np.all(result.duality_gap > 0)
    assert result.messages()[0].startswith("maximum number of iterations")


@pytest.mark.parametrize("method", ["fista", "lasso"])
def test_too_many_nonzeros_is_reported_not_dropped_silently(method, noisy):
    dictionary, _, activations = noisy
    result = solvers.unfold(
        activations,
        dictionary,
        method=method,
        alpha=ALPHA,
        max_nonzero=2,
        max_iter=MAX_ITER[method],
    )
    assert result.indices.shape == (BATCH, 2)
    np.testing.assert_array_equal(result.status, Status.TOO_MANY_NONZEROS)
    assert "max_nonzero" in result.messages()[0]
    # The largest codes are the ones kept.
    full = solvers.unfold(
        activations, dictionary, method=method, alpha=ALPHA, max_iter=MAX_ITER[method]
    )
    for kept, dense in zip(result.values, full.to_dense(), strict=True):
        np.testing.assert_allclose(np.abs(kept), np.sort(np.abs(dense))[::-1][:2], rtol=1e-3)


def test_default_width_and_sorted_output(noisy):
    dictionary, _, activations = noisy
    result = solvers.unfold(
        activations, dictionary, method="fista", alpha=ALPHA, max_iter=MAX_ITER["fista"]
    )
    assert result.indices.shape == (BATCH, min(N_FEATURES, D_MODEL))
    magnitudes = np.abs(result.values)
    assert np.all(np.diff(magnitudes, axis=1) <= 0)
    assert np.all((result.indices >= 0) == (result.values != 0))
    np.testing.assert_array_equal(result.l0, np.sum(result.indices >= 0, axis=1))


def test_zero_activation_and_single_vector(noisy):
    dictionary, _, activations = noisy
    zero = solvers.unfold(np.zeros(D_MODEL), dictionary, method="lasso", alpha=ALPHA)
    assert zero.l0 == 0 and zero.status == Status.CONVERGED and zero.duality_gap == 0
    one = solvers.unfold(activations[3], dictionary, method="lasso", alpha=ALPHA)
    batch = solvers.unfold(activations, dictionary, method="lasso", alpha=ALPHA)
    np.testing.assert_allclose(one.to_dense(), batch.to_dense()[3], atol=1e-6)


def test_float64_needs_no_global_config(noisy):
    dictionary, _, activations = noisy
    assert not jax.config.x64_enabled
    prepared = solvers.prepare(dictionary, dtype="float64")
    assert prepared.dtype == np.float64 and prepared.gram.dtype == np.float64
    result = solvers.unfold(activations, prepared, method="omp", k=4, dtype="float64")
    assert result.values.dtype == np.float64 and result.residual_norm.dtype == np.float64
    assert not jax.config.x64_enabled
    with pytest.raises(ValueError, match="prepared as float64"):
        solvers.unfold(activations, prepared, method="omp", k=4, dtype="float32")


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_diagnostics_of_wide_codes_match_a_direct_computation(gram):
    # Width min(n_features, d_model) = 100 > GATHER_WIDTH: the dense reconstruction path.
    rng = np.random.default_rng(21)
    dictionary = rng.standard_normal((400, 100))
    bias = rng.standard_normal(100)
    activations = rng.standard_normal((5, 100)) + bias
    prepared = solvers.prepare(dictionary, bias, gram=gram)
    result = solvers.unfold(activations, prepared, method="lasso", alpha=0.05)
    assert result.indices.shape[1] > solvers._api.GATHER_WIDTH
    residual = activations - bias - result.to_dense() @ dictionary
    np.testing.assert_allclose(result.residual_norm, np.linalg.norm(residual, axis=1), rtol=1e-4)
    norms = np.linalg.norm(activations - bias, axis=1)
    np.testing.assert_allclose(result.relative_error, result.residual_norm / norms, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Working-set selection


def reference_smallest(priority, forced, width, block, per_block):
    """`_lasso.smallest` in numpy: the forced features, then the smallest priorities among the
    `per_block` smallest of each block (forced ones excluded; ties by index)."""
    chosen = []
    for p, f in zip(priority, forced, strict=True):
        f = [int(i) for i in f if i >= 0]
        p = p.astype(np.float64).copy()
        p[f] = np.inf
        candidates = []
        for start in range(0, len(p), block):
            order = np.argsort(p[start : start + block], kind="stable")[:per_block]
            candidates += [start + int(i) for i in order if p[start + i] < np.inf]
        candidates.sort(key=lambda i: (p[i], i))
        chosen.append(set(f) | set(candidates[: width - len(f)]))
    return chosen


@pytest.mark.parametrize("n_features", [8192, 512], ids=["blocks", "top_k"])
def test_working_set_holds_the_forced_and_the_best_features(n_features):
    from solvers import _lasso

    rng = np.random.default_rng(3)
    batch, width, slots = 6, 128, 64
    priority = rng.standard_normal((batch, n_features)).astype(np.float32)
    priority[:, :40] = -np.inf  # a support outside the slots: ranked first
    forced = np.full((batch, slots), -1, np.int32)
    for row, n_used in enumerate([0, 13, 26, 39, 52, 64]):  # slots in use, anywhere
        used = rng.choice(n_features, n_used, replace=False)
        forced[row, rng.choice(slots, len(used), replace=False)] = used
    # A crowded block: its 10 smallest priorities are the row's best, more than PER_BLOCK.
    priority[:, 128:138] = -10.0 - np.arange(10)
    got = np.asarray(_lasso.smallest(jax.numpy.asarray(priority), jax.numpy.asarray(forced), width))
    for row in range(batch):
        assert len(set(got[row])) == width  # no repeats
        assert set(forced[row][forced[row] >= 0]) <= set(got[row])
    if n_features == 512:  # too few blocks: exact top_k
        for row in range(batch):
            f = set(forced[row][forced[row] >= 0])
            p = priority[row].copy()
            p[list(f)] = -np.inf
            assert set(got[row]) == set(np.argsort(p, kind="stable")[:width])
    else:
        want = reference_smallest(priority, forced, width, _lasso.BLOCK, _lasso.PER_BLOCK)
        assert [set(g) for g in got] == want


@pytest.mark.parametrize("positive", [False, True])
def test_lasso_on_a_dictionary_large_enough_for_block_selection(positive):
    # 6144 features: the working sets come from the per-block candidates (see
    # `_lasso.smallest`); the solution must still be sklearn's.
    dictionary, _, activations = sparse_problem(
        6144, 128, 4, 12, noise=0.02, seed=31, positive=positive
    )
    result = solvers.unfold(
        activations, dictionary, method="lasso", alpha=ALPHA, positive=positive, dtype="float64"
    )
    np.testing.assert_array_equal(result.status, Status.CONVERGED)
    ours = objective(result.to_dense(), activations, dictionary, ALPHA)
    theirs = objective(
        sklearn_lasso(dictionary, activations, ALPHA, positive, lars=True),
        activations,
        dictionary,
        ALPHA,
    )
    assert np.all(ours <= theirs + 1e-6 * theirs)
