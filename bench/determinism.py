"""Whether a row's answer depends on the rows batched with it: 64 rows of an 8192 x 512
dictionary solved alone, in batches of 8 and in one batch, per method; prints whether the
supports are equal and the largest difference of the values."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers  # noqa: E402

CASES = [
    ("omp", {"k": 32}),
    ("lasso", {"alpha": 0.05}),
    ("lasso", {"alpha": 0.05, "positive": True}),
    ("fista", {"alpha": 0.05, "max_iter": 300}),
]


def batched(x: np.ndarray, prepared, size: int, method: str, params: dict) -> np.ndarray:
    """Dense codes of `x`, solved `size` rows at a time."""
    starts = range(0, len(x), size)
    parts = [solvers.unfold(x[i : i + size], prepared, method, **params) for i in starts]
    return np.concatenate([part.to_dense() for part in parts])


def main() -> None:
    rng = np.random.default_rng(0)
    n_features, d_model, rows, k = 8192, 512, 64, 32
    directions = rng.standard_normal((n_features, d_model)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = np.zeros((rows, n_features), np.float32)
    for row in codes:
        row[rng.choice(n_features, k, replace=False)] = rng.uniform(0.5, 2, k)
    x = codes @ directions + 0.01 * rng.standard_normal((rows, d_model)).astype(np.float32)
    prepared = solvers.prepare(directions)
    for method, params in CASES:
        batch, *others = (batched(x, prepared, size, method, params) for size in (rows, 1, 8))
        supports = all(((batch != 0) == (other != 0)).all() for other in others)
        difference = max(float(np.abs(batch - other).max()) for other in others)
        print(
            f"{method} {params}: supports equal {supports}, largest difference "
            f"{difference:.2e} ({difference / np.abs(batch).max():.1e} of the largest code)"
        )


if __name__ == "__main__":
    main()
