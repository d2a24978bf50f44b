"""examples/toy_model.py: unfolding a toy model's hidden activations beats its own read-out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "toy_model.py"


@pytest.mark.slow
def test_unfolding_beats_the_models_relu_read_out():
    spec = importlib.util.spec_from_file_location("toy_model", EXAMPLE)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    w, b = toy.train(steps=3000)
    scores, mean_active = toy.compare(w, b, 2048)
    assert 3 < mean_active < 6  # density 0.05 of 80 features, rows with one active at least
    relu_error, relu_f1, _ = scores["model's ReLU read-out"]
    omp_error, omp_f1, omp_certified = scores["Unfold non-negative OMP, k=8"]
    lasso_error, lasso_f1, _ = scores["Unfold non-negative LASSO"]
    assert omp_error < 0.6 * relu_error and lasso_error < 0.6 * relu_error
    assert omp_f1 > relu_f1 + 0.2 and lasso_f1 > relu_f1 + 0.1
