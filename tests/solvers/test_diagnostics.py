"""Dictionary diagnostics against known values: the Welch bound, Donoho and Tanner's phase
transition, coherence of constructed frames."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from solvers._diagnostics import (
    coherence,
    l1_transition,
    recovered,
    recovery_curve,
    synthetic_codes,
    welch_bound,
)


def simplex_frame(d_model: int) -> np.ndarray:
    """d_model + 1 unit vectors in d_model dimensions with equal pairwise |cosine| 1/d_model:
    an equiangular tight frame, which meets the Welch bound."""
    vertices = np.eye(d_model + 1) - 1 / (d_model + 1)
    basis = np.linalg.svd(vertices)[2][:d_model]  # the plane the centred vertices span
    frame = vertices @ basis.T
    return frame / np.linalg.norm(frame, axis=1, keepdims=True)


def test_an_equiangular_frame_meets_the_welch_bound():
    frame = simplex_frame(7)
    result = coherence(frame)
    assert result.welch_bound == pytest.approx(1 / 7)
    assert result.mutual == pytest.approx(1 / 7, rel=1e-9)
    assert result.histogram.sum() == 8 * 7 // 2  # every pair once
    assert result.guaranteed_k == 3  # k < (1 + 7) / 2


def test_coherence_finds_the_most_similar_pair_in_blocks_and_samples():
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((600, 40))
    atoms[417] = atoms[12] + 0.01 * rng.standard_normal(40)  # a near duplicate
    result = coherence(atoms, top=3)
    assert result.top_pairs[0][:2] == (12, 417) and result.top_pairs[0][2] > 0.99
    assert result.sampled == 600 and result.mutual == pytest.approx(result.top_pairs[0][2])
    cosines = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    gram = np.abs(cosines @ cosines.T)[np.triu_indices(600, 1)]
    assert result.histogram.sum() == gram.size
    np.testing.assert_array_equal(result.histogram, np.histogram(gram, result.bins)[0])
    sampled = coherence(atoms, max_atoms=100)
    assert sampled.sampled == 100 and sampled.histogram.sum() == 100 * 99 // 2
    assert welch_bound(10, 20) == 0.0  # fewer atoms than dimensions: orthogonal is possible


@pytest.mark.parametrize(
    ("delta", "positive", "rho"),
    [(0.5, False, 0.3848), (0.5, True, 0.5581), (0.25, False, 0.2674), (0.75, True, 0.7659)],
)
def test_the_l1_transition_is_donoho_and_tanners(delta, positive, rho):
    """rho = k/n at the weak threshold (Donoho & Tanner 2009: rho_W(0.5) ~ 0.385 for the
    cross-polytope, ~ 0.558 for the simplex), here from the statistical dimension."""
    n_features = 10_000
    d_model = int(delta * n_features)
    assert l1_transition(n_features, d_model, positive=positive) / d_model == pytest.approx(
        rho, abs=2e-3
    )


def test_recovered_judges_the_support_and_the_refit():
    rng = np.random.default_rng(1)
    atoms = rng.standard_normal((30, 20))
    truth = synthetic_codes(3, 30, 4, positive=False, rng=rng)
    shrunk = truth * 0.9  # LASSO-like shrinkage: the support is right
    spurious = truth.copy()
    spurious[1, np.flatnonzero(truth[1] == 0)[0]] = 0.5  # one wrong feature
    assert recovered(shrunk, truth, atoms).all()
    assert list(recovered(spurious, truth, atoms)) == [True, False, True]


@pytest.mark.slow
@pytest.mark.parametrize("positive", [False, True])
def test_a_gaussian_dictionary_reproduces_the_l1_phase_transition(positive):
    """The LASSO (standing for l1 minimisation) on a Gaussian dictionary of 120 atoms in 60
    dimensions: the empirical 50% point lies within 12% of the asymptotic transition (about
    23 signed, 33.5 non-negative; here 22.8 and 32.8); OMP, told k, recovers less."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((120, 60))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    prepared = solvers.prepare(atoms, dtype="float64")
    theory = l1_transition(120, 60, positive=positive)
    ks = [round(theory * f) for f in (0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)]
    l1 = recovery_curve(prepared, "lasso", ks, trials=32, positive=positive)
    assert l1.recovered[0] >= 0.95 and l1.recovered[-1] <= 0.05
    assert abs(l1.crossing() - theory) <= 0.12 * theory
    assert l1.largest_k() >= ks[0]
    omp = recovery_curve(prepared, "omp", ks, trials=32, positive=positive)
    assert omp.crossing() <= l1.crossing()
