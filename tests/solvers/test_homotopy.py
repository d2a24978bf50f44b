"""The homotopy path on a Gram block (solvers._homotopy) against scikit-learn's Lasso."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from solvers._dictionary import precision
from solvers._homotopy import empty_path, follow_path

BATCH, WIDTH, D_MODEL, ALPHA = 6, 24, 32, 0.3


def block_problem(seed: int):
    """Per row: atoms (w, d_model) of varied norms, activations (d_model,)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((BATCH, WIDTH, D_MODEL))
    atoms *= rng.uniform(0.5, 2.0, (BATCH, WIDTH, 1))
    x = rng.standard_normal((BATCH, D_MODEL))
    gram = np.einsum("bwd,bvd->bwv", atoms, atoms)
    targets = np.einsum("bwd,bd->bw", atoms, x)
    return atoms, x, gram, targets


def run(gram, targets, penalties, level, start, positive, running=None, max_steps=500):
    gram = jnp.asarray(gram)
    rows = jnp.arange(gram.shape[0])
    running = jnp.ones(gram.shape[0], bool) if running is None else jnp.asarray(running)
    return follow_path(
        lambda j: gram[rows, j],
        jnp.diagonal(gram, axis1=1, axis2=2),
        jnp.asarray(targets),
        jnp.asarray(penalties),
        jnp.full(gram.shape[0], level, gram.dtype),
        start,
        positive=positive,
        running=running,
        max_steps=max_steps,
    )


def dense(state, width):
    """Slot codes as (batch, width) codes over the block."""
    codes = np.zeros((state.codes.shape[0], width))
    for i, (positions, values) in enumerate(
        zip(np.asarray(state.positions), state.codes, strict=True)
    ):
        for position, value in zip(positions, np.asarray(values), strict=True):
            if position >= 0:
                codes[i, position] += value
    return codes


def lasso_reference(atoms, x, positive):
    """scikit-learn's Lasso per row, its 1/n_samples scaling undone."""
    return np.stack(
        [
            Lasso(
                alpha=ALPHA / D_MODEL,
                fit_intercept=False,
                positive=positive,
                tol=1e-14,
                max_iter=200_000,
            )
            .fit(a.T, xi)
            .coef_
            for a, xi in zip(atoms, x, strict=True)
        ]
    )


def objective(codes, atoms, x):
    residual = x - np.einsum("bw,bwd->bd", codes, atoms)
    return 0.5 * np.sum(residual**2, axis=1) + ALPHA * np.abs(codes).sum(axis=1)


def cold_penalties(targets, positive):
    peak = np.max(targets if positive else np.abs(targets), axis=1, keepdims=True)
    return np.repeat(peak, targets.shape[1], axis=1)


@pytest.mark.parametrize("positive", [True, False])
def test_path_from_zero_matches_sklearn(positive):
    atoms, x, gram, targets = block_problem(1)
    with precision(np.float64):
        end, steps, finished, crowded = run(
            gram,
            targets,
            cold_penalties(targets, positive),
            ALPHA,
            empty_path(BATCH, WIDTH, WIDTH, jnp.float64),
            positive,
        )
        codes = dense(end, WIDTH)
    assert np.all(finished) and not np.any(crowded)
    assert np.all(np.asarray(steps) >= np.sum(codes != 0, axis=1))  # one step per entry
    reference = lasso_reference(atoms, x, positive)
    np.testing.assert_allclose(objective(codes, atoms, x), objective(reference, atoms, x), 1e-12)
    np.testing.assert_allclose(codes, reference, atol=1e-7)
    if positive:
        assert np.all(codes >= 0)


@pytest.mark.parametrize("positive", [True, False])
def test_path_continues_onto_a_larger_block(positive):
    """Solve on the first half of the features, then carry the solution to the whole block
    (penalties: the level, or a margin above the correlation of a feature past it): the
    same solution as from zero on the whole block."""
    atoms, x, gram, targets = block_problem(2)
    half = WIDTH // 2
    with precision(np.float64):
        first, _, finished, _ = run(
            gram[:, :half, :half],
            targets[:, :half],
            cold_penalties(targets[:, :half], positive),
            ALPHA,
            empty_path(BATCH, WIDTH, half, jnp.float64),
            positive,
        )
        assert np.all(finished)
        used = np.asarray(first.positions) >= 0
        rows = np.arange(BATCH)[:, None]
        gram_rows = np.where(used[:, :, None], gram[rows, np.maximum(first.positions, 0)], 0)
        moved = first._replace(gram_rows=jnp.asarray(gram_rows))
        before = dense(first, WIDTH)
        correlations = targets - np.einsum("bwv,bv->bw", gram, before)
        signed = correlations if positive else np.abs(correlations)
        penalties = np.where((before != 0) | (signed <= ALPHA), ALPHA, 1.1 * signed)
        end, _, finished, _ = run(gram, targets, penalties, ALPHA, moved, positive)
        codes = dense(end, WIDTH)
    assert np.all(finished)
    assert np.any(signed > ALPHA * (1 + 1e-6))  # the larger block had features past the level
    reference = lasso_reference(atoms, x, positive)
    np.testing.assert_allclose(objective(codes, atoms, x), objective(reference, atoms, x), 1e-12)


def test_path_in_segments_equals_one_path():
    atoms, x, gram, targets = block_problem(3)
    penalties = cold_penalties(targets, True)
    with precision(np.float64):
        start = empty_path(BATCH, WIDTH, WIDTH, jnp.float64)
        middle, first_steps, finished, _ = run(gram, targets, penalties, 3 * ALPHA, start, True)
        assert np.all(finished)
        end, _, finished, _ = run(
            gram, targets, np.full_like(penalties, 3 * ALPHA), ALPHA, middle, True
        )
        once, _, _, _ = run(gram, targets, penalties, ALPHA, start, True)
    assert np.all(finished)
    np.testing.assert_allclose(dense(end, WIDTH), dense(once, WIDTH), atol=1e-10)


def test_float32_path_agrees_with_float64():
    atoms, x, gram, targets = block_problem(4)
    penalties = cold_penalties(targets, False)
    end32, _, finished, _ = run(
        gram.astype(np.float32),
        targets.astype(np.float32),
        penalties.astype(np.float32),
        ALPHA,
        empty_path(BATCH, WIDTH, WIDTH, jnp.float32),
        False,
    )
    assert np.all(finished)
    reference = lasso_reference(atoms, x, False)
    relative = objective(dense(end32, WIDTH), atoms, x) / objective(reference, atoms, x) - 1
    assert np.all(np.abs(relative) < 1e-5)


def test_full_slots_and_stopped_rows_are_reported():
    _, _, gram, targets = block_problem(5)
    penalties = cold_penalties(targets, False)
    running = np.array([True] * (BATCH - 1) + [False])
    with precision(np.float64):
        end, steps, finished, crowded = run(
            gram,
            targets,
            penalties,
            1e-3,  # a small penalty: more active features than 3 slots hold
            empty_path(BATCH, 3, WIDTH, jnp.float64),
            False,
            running=running,
        )
    assert np.all(np.asarray(crowded)[:-1]) and not np.any(np.asarray(finished))
    assert int(steps[-1]) == 0 and not np.any(np.asarray(end.positions)[-1] >= 0)
    assert np.all(np.sum(np.asarray(end.positions) >= 0, axis=1)[:-1] == 3)
    with precision(np.float64):
        _, steps, finished, crowded = run(
            gram,
            targets,
            penalties,
            1e-3,
            empty_path(BATCH, WIDTH, WIDTH, jnp.float64),
            False,
            max_steps=2,
        )
    assert np.all(np.asarray(steps) == 2) and not np.any(finished) and not np.any(crowded)


def test_penalty_above_the_largest_correlation_gives_zero():
    _, _, gram, targets = block_problem(6)
    peak = np.max(np.abs(targets))
    end, steps, finished, _ = run(
        gram.astype(np.float32),
        targets.astype(np.float32),
        np.full(targets.shape, peak, np.float32),
        peak * 1.5,
        empty_path(BATCH, WIDTH, WIDTH, jnp.float32),
        False,
    )
    assert np.all(finished) and np.all(np.asarray(steps) == 0)
    assert not np.any(np.asarray(end.positions) >= 0)
