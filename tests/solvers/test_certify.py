"""Certificates against their definitions computed with numpy's pinv, and their guarantees."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from tests.conftest import sparse_problem


def reference(indices, values, residual, dictionary):
    """ERC and support stability of one row, straight from the definitions."""
    support = indices[indices >= 0]
    if len(support) == 0:
        return 0.0, np.nan
    unit = dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)
    d_s = unit[support].T  # (d_model, |S|)
    outside = np.setdiff1d(np.arange(len(dictionary)), support)
    erc = np.abs(np.linalg.pinv(d_s) @ unit[outside].T).sum(axis=0).max() if len(outside) else 0
    sigma_min = np.linalg.svd(d_s, compute_uv=False).min()
    scaled = np.abs(values[indices >= 0]) * np.linalg.norm(dictionary[support], axis=1)
    return erc, scaled.min() * sigma_min / residual if residual > 0 else np.inf


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
@pytest.mark.parametrize("method", ["omp", "lasso"])
def test_matches_the_definitions(gram, method):
    dictionary, _, x = sparse_problem(
        150, 40, 12, 5, noise=0.02, seed=3, unit_norm=False
    )  # scaled atoms: normalisation matters
    prepared = solvers.prepare(dictionary, gram=gram)
    params = {"k": 6} if method == "omp" else {"alpha": 0.05}
    result = solvers.unfold(x, prepared, method=method, **params)
    certificate = solvers.certify(result, prepared)
    for row in range(len(x)):
        erc, stability = reference(
            result.indices[row], result.values[row], result.residual_norm[row], dictionary
        )
        np.testing.assert_allclose(certificate.erc[row], erc, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(certificate.support_stability[row], stability, rtol=2e-3)
    np.testing.assert_array_equal(certificate.certified, certificate.erc < 1)
    np.testing.assert_allclose(certificate.erc_margin, 1 - certificate.erc)


def test_blocks_and_chunks_do_not_change_the_answer(monkeypatch):
    dictionary, _, x = sparse_problem(301, 50, 300, 4, noise=0.01, seed=5)  # 301: ragged blocks
    prepared = solvers.prepare(dictionary, gram=False)
    result = solvers.unfold(x, prepared, k=4)
    whole = solvers.certify(result, prepared)
    monkeypatch.setattr("solvers._certify.BLOCK_BYTES", 7 * 256 * 4 * 4)  # blocks of 7 features
    monkeypatch.setattr("solvers._certify.CHUNK_ROWS", 64)
    pieces = solvers.certify(result, prepared)
    np.testing.assert_allclose(pieces.erc, whole.erc, rtol=1e-5)
    np.testing.assert_allclose(pieces.support_stability, whole.support_stability, rtol=1e-5)
    single = solvers.certify(solvers.unfold(x[7], prepared, k=4), prepared)
    assert np.ndim(single.erc) == 0
    np.testing.assert_allclose(single.erc, whole.erc[7], rtol=1e-5)


def test_orthonormal_atoms_are_always_certified_and_exact_rows_very_stable():
    dictionary = np.linalg.qr(np.random.default_rng(0).standard_normal((30, 30)))[0] * 3.0
    codes = np.zeros((2, 30))
    codes[0, [1, 5, 9]] = [1.0, -2.0, 0.5]
    result = solvers.unfold(codes @ dictionary, dictionary, k=3)
    certificate = solvers.certify(result, solvers.prepare(dictionary))
    np.testing.assert_allclose(certificate.erc, 0, atol=1e-5)
    assert certificate.certified.all()
    assert certificate.support_stability[0] > 1e5  # residual at rounding level
    assert np.isnan(certificate.support_stability[1])  # zero row: empty support


def given(indices, values, n_features, residual=0.1):
    """An `UnfoldResult` of one row with this support and these codes."""
    return solvers.UnfoldResult(
        indices=np.array([indices], np.int32),
        values=np.array([values], np.float32),
        residual_norm=np.array([residual], np.float32),
        relative_error=np.array([residual], np.float32),
        l0=np.array([len(indices)], np.int32),
        n_iter=np.array([len(indices)], np.int32),
        status=np.array([0], np.int32),
        duality_gap=np.array([np.nan], np.float32),
        n_features=n_features,
    )


def test_a_support_whose_sum_is_another_atom_is_not_certified_and_that_atom_is():
    rng = np.random.default_rng(1)
    dictionary = rng.standard_normal((40, 60))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    both = dictionary[0] + dictionary[1]
    dictionary[39] = both / np.linalg.norm(both)
    prepared = solvers.prepare(dictionary)
    # pinv(D_S) d_39 = (1, 1) / ||d_0 + d_1||: l1 norm about sqrt(2) > 1.
    pair = solvers.certify(given([0, 1], [1.0, 1.0], 40), prepared)
    assert not pair.certified[0]
    np.testing.assert_allclose(pair.erc[0], 2 / np.linalg.norm(both), rtol=1e-4)
    # What OMP finds instead: atom 39 alone, the sparser and l1-smaller code, certified.
    found = solvers.unfold(both, prepared, k=2)
    assert found.l0 == 1 and found.indices[0] == 39
    assert solvers.certify(found, prepared).certified


def test_linearly_dependent_support_is_never_certified():
    dictionary = np.eye(4, 6).T.copy()  # 6 atoms in 4 dimensions
    dictionary[4] = [1, 1, 0, 0]
    dictionary[5] = [2, 2, 0, 0]  # atom 5 is twice atom 4
    certificate = solvers.certify(given([4, 5], [1.0, 1.0], 6), solvers.prepare(dictionary))
    assert np.isnan(certificate.erc[0]) and not certificate.certified[0]


def test_certified_supports_below_the_coherence_bound_are_the_true_ones():
    """Below the coherence bound every support satisfies ERC (Tropp 2004, Theorem 3.5), so
    every exactly recovered row must be certified; and certification must not be vacuous:
    on this dictionary it fails for large supports."""
    dictionary, codes, x = sparse_problem(600, 400, 40, 2, seed=11)
    prepared = solvers.prepare(dictionary)
    result = solvers.unfold(x, prepared, k=2)
    certificate = solvers.certify(result, prepared)
    mu = solvers.coherence(dictionary).mutual
    assert (1 + 1 / mu) / 2 > 2
    assert certificate.certified.all()
    found = result.to_dense()
    np.testing.assert_array_equal(found != 0, codes != 0)
    _, _, dense_x = sparse_problem(600, 400, 20, 150, seed=12)
    wide = solvers.certify(solvers.unfold(dense_x, prepared, k=150), prepared)
    assert not wide.certified.any()


def test_float64_dictionary():
    dictionary, _, x = sparse_problem(80, 30, 4, 3, noise=0.01, seed=2)
    prepared = solvers.prepare(dictionary, dtype="float64")
    result = solvers.unfold(x, prepared, k=3)
    certificate = solvers.certify(result, prepared)
    assert certificate.erc.dtype == np.float64
    for row in range(len(x)):
        erc, _ = reference(result.indices[row], result.values[row], 1.0, dictionary)
        np.testing.assert_allclose(certificate.erc[row], erc, rtol=1e-9)
