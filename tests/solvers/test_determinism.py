"""A row's answer does not depend on the rows batched with it: the same support always, and
values equal up to float32 rounding (README, "Reproducibility")."""

from __future__ import annotations

import numpy as np
import pytest

import solvers


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("omp", {"k": 6}),
        ("omp", {"k": 6, "positive": True}),
        ("lasso", {"alpha": 0.05}),
        ("lasso", {"alpha": 0.05, "positive": True}),
        ("fista", {"alpha": 0.05, "max_iter": 200}),
    ],
)
def test_batching_changes_no_support_and_values_at_most_by_rounding(method, params):
    rng = np.random.default_rng(5)
    directions = rng.standard_normal((512, 64)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = np.zeros((24, 512), np.float32)
    for row in codes:
        row[rng.choice(512, 6, replace=False)] = rng.uniform(0.5, 2, 6)
    x = codes @ directions + 0.01 * rng.standard_normal((24, 64)).astype(np.float32)
    prepared = solvers.prepare(directions)

    def objective(codes: np.ndarray) -> np.ndarray:
        residual = x - codes @ directions
        return 0.5 * (residual**2).sum(axis=1) + params["alpha"] * np.abs(codes).sum(axis=1)

    whole = solvers.unfold(x, prepared, method, **params).to_dense()
    parts = [
        np.concatenate(
            [
                solvers.unfold(x[i : i + n], prepared, method, **params).to_dense()
                for i in range(0, 24, n)
            ]
        )
        for n in (1, 5)
    ]
    for part in parts:
        if method == "fista":
            # A row may stop one gap check apart (README: Reproducibility): the objectives
            # agree, the codes to what the tolerance allows.
            np.testing.assert_allclose(objective(part), objective(whole), rtol=1e-3)
            continue
        np.testing.assert_array_equal(part != 0, whole != 0)
        # OMP: a few float32 ulps at most (no difference at all at 8192 x 512, k=32).
        tolerance = 1e-6 if method == "omp" else 1e-5
        np.testing.assert_allclose(part, whole, rtol=0, atol=tolerance * np.abs(whole).max())
