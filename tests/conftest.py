"""Shared fixtures: seeded problems with known sparse ground truth."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Release each test module's compiled programs once it ends. Every XLA CPU program holds
    a few memory mappings of its machine code until JAX's caches drop it; a test run compiles
    tens of thousands of programs in one process, and past Linux's vm.max_map_count (65530)
    the next compilation crashes the process."""
    yield
    jax.clear_caches()
    gc.collect()


def sparse_problem(
    n_features: int,
    d_model: int,
    batch: int,
    k: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
    positive: bool = False,
    unit_norm: bool = True,
):
    """A Gaussian dictionary (n_features, d_model), k-sparse codes (batch, n_features) with
    magnitudes in [0.5, 2] (random signs unless `positive`), and activations codes @ dictionary."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_features, d_model))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    if not unit_norm:
        dictionary *= rng.uniform(0.2, 5.0, size=(n_features, 1))
    codes = np.zeros((batch, n_features))
    for row in codes:
        support = rng.choice(n_features, k, replace=False)
        signs = 1 if positive else rng.choice([-1, 1], k)
        row[support] = signs * rng.uniform(0.5, 2.0, k)
    activations = codes @ dictionary + noise * rng.standard_normal((batch, d_model))
    return dictionary, codes, activations


@pytest.fixture
def problem():
    return sparse_problem
