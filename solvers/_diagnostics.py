"""How far a dictionary lets sparse recovery be trusted: coherence against the Welch bound, and
empirical recovery curves against the theoretical l1 phase transition.

- Mutual coherence ``mu = max_{i != j} |<d_i, d_j>| / (||d_i|| ||d_j||)``. Any dictionary of
  N unit atoms in n < N dimensions has ``mu >= sqrt((N - n) / (n (N - 1)))`` (Welch 1974).
  Every k-sparse code with ``k < (1 + 1/mu) / 2`` is recovered exactly by OMP and by l1
  minimisation (Tropp 2004, Donoho & Elad 2003): a sufficient, pessimistic guarantee.
- The empirical recovery curve: for each k, the fraction of synthetic k-sparse codes (random
  support, values of random sign and magnitude in [0.5, 2]) that a method recovers exactly,
  simulated on the dictionary itself: what the dictionary supports in practice, typically far
  beyond the coherence bound. Exactly: the entries above 1% of a row's largest are the true
  support, and least squares on that support gives the true codes to 1e-3 (for the LASSO,
  which shrinks what it finds by about alpha, this judges the support it found).
- For a Gaussian random dictionary the l1 curve's transition is known: with N features in n
  dimensions, l1 minimisation recovers a k-sparse code with high probability when
  ``n > N psi(k / N)``, where ``psi`` is the normalised statistical dimension of the l1 norm's
  descent cone (Amelunxen, Lotz, McCoy & Tropp 2014, "Living on the edge", eq. (4.8) and
  Prop. 4.5), which equals Donoho & Tanner's weak threshold (Donoho & Tanner 2009, "Counting
  faces of randomly projected polytopes"; signed codes: the cross-polytope, non-negative codes:
  the simplex):

      psi(rho)  = inf_{tau >= 0}  rho (1 + tau^2) + (1 - rho) E[(|g| - tau)_+^2]     (signed)
      psi+(rho) = inf_{tau >= 0}  rho (1 + tau^2) + (1 - rho) E[(g - tau)_+^2]       (>= 0)

  with g standard normal; `l1_transition` solves ``n = N psi(k / N)`` for k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import optimize, special

RECOVERY_TOLERANCE = 1e-3
"""A code counts as recovered when its support is the true one and least squares on it gives
the true codes to this relative error."""
SUPPORT_THRESHOLD = 1e-2
"""Entries below this fraction of a row's largest |code| are not part of its support (true
codes are at least a quarter of their row's largest)."""


class Coherence(NamedTuple):
    """Pairwise similarity of a dictionary's normalised atoms.

    Attributes:
        mutual: the largest |cosine| between two different atoms.
        welch_bound: the smallest `mutual` any N atoms in n dimensions can have.
        histogram: counts of |cosine| over all pairs, in `bins` (edges from 0 to 1).
        bins: the histogram's edges.
        top_pairs: (i, j, cosine) of the most similar pairs, most similar first.
        guaranteed_k: the largest k that the coherence alone guarantees: the largest integer
            below ``(1 + 1/mu) / 2`` (Tropp 2004).
        sampled: number of atoms analysed (all of them, or a random sample of a large
            dictionary: then pairs and `mutual` are those of the sample).
    """

    mutual: float
    welch_bound: float
    histogram: np.ndarray
    bins: np.ndarray
    top_pairs: list[tuple[int, int, float]]
    guaranteed_k: int
    sampled: int


def welch_bound(n_features: int, d_model: int) -> float:
    """The smallest mutual coherence of `n_features` unit vectors in `d_model` dimensions."""
    if n_features <= d_model:
        return 0.0
    return math.sqrt((n_features - d_model) / (d_model * (n_features - 1)))


def coherence(
    atoms: np.ndarray, *, top: int = 10, max_atoms: int = 8192, bins: int = 50, seed: int = 0
) -> Coherence:
    """The `Coherence` of `atoms` (n_features, d_model), on a random sample of `max_atoms` of
    them when there are more, a block of rows of the Gram matrix at a time."""
    atoms = np.asarray(atoms, np.float64)
    n_features, d_model = atoms.shape
    index = np.arange(n_features)
    if n_features > max_atoms:
        index = np.sort(np.random.default_rng(seed).choice(n_features, max_atoms, replace=False))
    unit = atoms[index] / np.linalg.norm(atoms[index], axis=1, keepdims=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    histogram = np.zeros(bins, np.int64)
    best: list[tuple[float, int, int]] = []
    block = max(1, (1 << 22) // len(unit))
    for start in range(0, len(unit), block):
        cosines = unit[start : start + block] @ unit.T
        rows = np.arange(start, min(start + block, len(unit)))
        upper = np.arange(len(unit))[None, :] > rows[:, None]  # each pair once
        values = np.abs(cosines[upper])
        histogram += np.histogram(np.minimum(values, 1.0), edges)[0]
        local_rows, local_cols = np.nonzero(upper)
        if values.size:
            keep = np.argsort(-values, kind="stable")[:top]
            best.extend(
                (float(cosines[local_rows[p], local_cols[p]]), int(rows[local_rows[p]]),
                 int(local_cols[p]))
                for p in keep
            )  # fmt: skip
    best.sort(key=lambda pair: -abs(pair[0]))
    top_pairs = [(int(index[i]), int(index[j]), cosine) for cosine, i, j in best[:top]]
    mutual = abs(top_pairs[0][2]) if top_pairs else 0.0
    guaranteed = math.ceil((1 + 1 / mutual) / 2) - 1 if mutual > 0 else len(unit)
    return Coherence(
        mutual, welch_bound(n_features, d_model), histogram, edges, top_pairs, guaranteed,
        len(unit),
    )  # fmt: skip


def l1_statistical_dimension(rho: float, *, positive: bool = False) -> float:
    """``psi(rho)`` (or ``psi+`` for non-negative codes): the statistical dimension of the l1
    norm's descent cone at a point with a fraction `rho` of non-zeros, divided by the
    dimension (module docstring)."""
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return 1.0

    def tail(tau: float) -> float:  # E[(g - tau)_+^2]
        return (1 + tau**2) * special.ndtr(-tau) - tau * math.exp(-(tau**2) / 2) / math.sqrt(
            2 * math.pi
        )

    def bound(tau: float) -> float:
        return rho * (1 + tau**2) + (1 - rho) * (tail(tau) * (1 if positive else 2))

    return float(optimize.minimize_scalar(bound, bounds=(0.0, 20.0), method="bounded").fun)


def l1_transition(n_features: int, d_model: int, *, positive: bool = False) -> float:
    """The sparsity k at which l1 minimisation over a Gaussian dictionary of `n_features` atoms
    in `d_model` dimensions passes from success to failure: the k solving
    ``d_model = n_features psi(k / n_features)``."""
    target = d_model / n_features

    def gap(rho: float) -> float:
        return l1_statistical_dimension(rho, positive=positive) - target

    return float(optimize.brentq(gap, 1e-9, 1 - 1e-9)) * n_features


def synthetic_codes(
    n_rows: int, n_features: int, k: int, *, positive: bool, rng: np.random.Generator
) -> np.ndarray:
    """`n_rows` k-sparse codes: uniform random supports, magnitudes uniform in [0.5, 2], signs
    random (positive only when `positive`)."""
    codes = np.zeros((n_rows, n_features))
    for row in codes:
        support = rng.choice(n_features, k, replace=False)
        values = rng.uniform(0.5, 2.0, k)
        row[support] = values if positive else values * rng.choice((-1.0, 1.0), k)
    return codes


def recovered(found: np.ndarray, truth: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Per row: the support of `found` (entries above `SUPPORT_THRESHOLD` of its largest) is
    that of `truth`, and least squares of ``truth @ atoms`` on it is `truth` to within
    `RECOVERY_TOLERANCE`."""
    result = np.zeros(len(truth), bool)
    for row, (codes, true) in enumerate(zip(found, truth, strict=True)):
        support = np.abs(codes) > SUPPORT_THRESHOLD * np.max(np.abs(codes), initial=0.0)
        if not np.array_equal(support, true != 0):
            continue
        refit = np.linalg.lstsq(atoms[support].T, true @ atoms, rcond=None)[0]
        result[row] = np.linalg.norm(refit - true[support]) < RECOVERY_TOLERANCE * np.linalg.norm(
            true
        )
    return result


L1_ALPHA = 1e-4
"""The LASSO penalty standing for l1 minimisation in `recovery_curve`: this fraction of the
batch's typical largest correlation ``max_j |<x, d_j>|`` (the penalty at which every code is
zero), small enough for the LASSO's support to be the l1 minimiser's (solved to `L1_TOL`, at
most `L1_MAX_ITER` iterations)."""
L1_TOL = 1e-10
L1_MAX_ITER = 50_000


class RecoveryCurve(NamedTuple):
    """Fraction of synthetic k-sparse codes recovered exactly, for each k of `ks`."""

    method: str
    positive: bool
    ks: list[int]
    recovered: list[float]
    trials: int

    def largest_k(self, fraction: float = 0.95) -> int:
        """The largest k (of `ks`) up to which at least `fraction` are recovered; 0 if none."""
        best = 0
        for k, share in zip(self.ks, self.recovered, strict=True):
            if share < fraction:
                break
            best = k
        return best

    def crossing(self, fraction: float = 0.5) -> float:
        """The k at which the curve crosses `fraction`, linearly interpolated between ks."""
        points = list(zip(self.ks, self.recovered, strict=True))
        for (k0, s0), (k1, s1) in zip(points, points[1:], strict=False):
            if s0 >= fraction > s1:
                return k0 + (s0 - fraction) / (s0 - s1) * (k1 - k0)
        return float(self.ks[-1] if points and points[-1][1] >= fraction else self.ks[0])


def recovery_curve(
    dictionary,
    method: str,
    ks,
    *,
    trials: int = 64,
    positive: bool = False,
    seed: int = 0,
) -> RecoveryCurve:
    """The empirical `RecoveryCurve` of `method` ("omp": told the true k; "lasso": standing for
    l1 minimisation, `L1_ALPHA`) on a prepared `dictionary`, `trials` codes per k."""
    from ._api import unfold

    rng = np.random.default_rng(seed)
    atoms = np.asarray(dictionary.unpadded().atoms, np.float64)
    shares = []
    for k in ks:
        truth = synthetic_codes(trials, dictionary.n_features, k, positive=positive, rng=rng)
        x = (truth @ atoms).astype(dictionary.dtype)
        if method == "omp":
            params = {"k": k, "positive": positive}
        else:
            alpha = L1_ALPHA * float(np.median(np.max(np.abs(x @ atoms.T), axis=1)))
            params = {"alpha": alpha, "positive": positive, "tol": L1_TOL, "max_iter": L1_MAX_ITER}
        result = unfold(x, dictionary, method, **params)
        found = np.asarray(result.to_dense(), np.float64)
        shares.append(float(np.mean(recovered(found, truth, atoms))))
    return RecoveryCurve(method, positive, [int(k) for k in ks], shares, trials)
