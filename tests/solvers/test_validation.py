"""Bad input becomes a ValueError that names the problem, before anything is compiled."""

from __future__ import annotations

import numpy as np
import pytest

import solvers

N_FEATURES, D_MODEL = 20, 6


@pytest.fixture
def dictionary():
    return np.random.default_rng(0).standard_normal((N_FEATURES, D_MODEL))


@pytest.fixture
def activations():
    return np.random.default_rng(1).standard_normal((3, D_MODEL))


def omp(activations, dictionary, **kwargs):
    return solvers.unfold(activations, dictionary, **{"method": "omp", "k": 2, **kwargs})


# Shapes


def test_activations_with_other_d_model(dictionary):
    with pytest.raises(ValueError, match=r"d_model=6.*\(3, 7\)"):
        omp(np.ones((3, 7)), dictionary)
    with pytest.raises(ValueError, match=r"d_model=6.*\(5,\)"):
        omp(np.ones(5), dictionary)


def test_activations_of_three_dimensions(dictionary):
    with pytest.raises(ValueError, match=r"activations must have shape.*\(2, 3, 6\)"):
        omp(np.ones((2, 3, D_MODEL)), dictionary)


def test_dictionary_not_two_dimensional(activations):
    with pytest.raises(ValueError, match=r"dictionary must be 2-D.*\(120,\)"):
        omp(activations, np.ones(120))


def test_empty_dictionary(activations):
    with pytest.raises(ValueError, match="non-empty"):
        omp(activations, np.ones((0, D_MODEL)))


@pytest.mark.parametrize("shape", [(5,), (D_MODEL, 1), (1, D_MODEL)])
def test_bias_of_wrong_shape(activations, dictionary, shape):
    with pytest.raises(ValueError, match=r"bias must have shape \(d_model,\) = \(6,\)"):
        omp(activations, dictionary, bias=np.zeros(shape))


def test_bias_twice_with_a_prepared_dictionary(activations, dictionary):
    prepared = solvers.prepare(dictionary, np.zeros(D_MODEL))
    with pytest.raises(ValueError, match="bias"):
        omp(activations, prepared, bias=np.zeros(D_MODEL))


# Values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("name", "where"), [("activations", (1, 2)), ("dictionary", (4, 0)), ("bias", (3,))]
)
def test_non_finite_input(activations, dictionary, name, where, bad):
    arrays = {"activations": activations, "dictionary": dictionary, "bias": np.zeros(D_MODEL)}
    arrays[name] = arrays[name].copy()
    arrays[name][where] = bad
    bias = arrays["bias"] if name == "bias" else None  # no bias unless it is the one spoiled
    with pytest.raises(ValueError, match=rf"{name} contains 1 non-finite"):
        omp(arrays["activations"], arrays["dictionary"], bias=bias)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_values_that_overflow_the_dtype(activations, dictionary):
    # Finite in float64, infinite once cast to float32.
    with pytest.raises(ValueError, match="activations contains .* non-finite"):
        omp(activations * 1e300, dictionary)


def test_zero_rows_in_dictionary(activations, dictionary):
    dictionary = dictionary.copy()
    dictionary[[3, 11]] = 0.0
    with pytest.raises(ValueError, match=r"2 all-zero row\(s\) \(first: \[3, 11\]\)"):
        omp(activations, dictionary)


def test_non_numeric_input(activations, dictionary):
    with pytest.raises(ValueError, match="activations must be numeric"):
        omp(np.full((3, D_MODEL), "a"), dictionary)
    with pytest.raises(ValueError, match="dictionary must be numeric"):
        omp(activations, np.full((N_FEATURES, D_MODEL), "a"))


# Parameters


@pytest.mark.parametrize("k", [0, -1, N_FEATURES + 1])
def test_k_out_of_range(activations, dictionary, k):
    with pytest.raises(
        ValueError, match=rf"k must be at least 1 and at most {N_FEATURES}, got {k}"
    ):
        omp(activations, dictionary, k=k)


@pytest.mark.parametrize("k", [2.5, "3", True, None])
def test_k_not_an_integer(activations, dictionary, k):
    with pytest.raises(ValueError, match="k"):
        solvers.unfold(activations, dictionary, method="omp", k=k)


@pytest.mark.parametrize("method", ["ista", "fista", "lasso"])
def test_negative_or_missing_alpha(activations, dictionary, method):
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got -0.1"):
        solvers.unfold(activations, dictionary, method=method, alpha=-0.1)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got nan"):
        solvers.unfold(activations, dictionary, method=method, alpha=float("nan"))
    with pytest.raises(ValueError, match=rf"{method} needs alpha"):
        solvers.unfold(activations, dictionary, method=method)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tol": -1e-3}, "tol must be a finite number >= 0"),
        ({"max_iter": 0}, "max_iter must be at least 1"),
        ({"max_iter": 10.0}, "max_iter must be an integer"),
        ({"positive": "yes"}, "positive must be True or False"),
        ({"max_nonzero": 0}, "max_nonzero must be at least 1"),
        (
            {"max_nonzero": N_FEATURES + 1},
            f"max_nonzero must be at least 1 and at most {N_FEATURES}",
        ),
    ],
)
@pytest.mark.parametrize("method", ["ista", "fista", "lasso"])
def test_bad_lasso_parameters(activations, dictionary, method, params, message):
    with pytest.raises(ValueError, match=message):
        solvers.unfold(activations, dictionary, method=method, alpha=0.1, **params)


def test_omp_needs_k_or_tol(activations, dictionary):
    with pytest.raises(ValueError, match="omp needs k"):
        solvers.unfold(activations, dictionary, method="omp")
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        solvers.unfold(activations, dictionary, method="omp", tol=-1.0)


def test_unknown_method(activations, dictionary):
    with pytest.raises(ValueError, match=r"unknown method 'lars'; choose one of \['fista', "):
        solvers.unfold(activations, dictionary, method="lars")


@pytest.mark.parametrize(("method", "params"), [("omp", {"k": 2}), ("lasso", {"alpha": 0.1})])
def test_unknown_parameter(activations, dictionary, method, params):
    with pytest.raises(ValueError, match=rf"bad parameters for method '{method}'.*'lambda1'"):
        solvers.unfold(activations, dictionary, method=method, lambda1=0.1, **params)


def test_parameter_of_another_method(activations, dictionary):
    with pytest.raises(ValueError, match=r"'alpha'"):
        solvers.unfold(activations, dictionary, method="omp", k=2, alpha=0.1)
    with pytest.raises(ValueError, match=r"'k'"):
        solvers.unfold(activations, dictionary, method="lasso", alpha=0.1, k=2)


@pytest.mark.parametrize("dtype", ["float16", "int32", "bfloat16", "double", ""])
def test_bad_dtype(activations, dictionary, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float64'\)"):
        omp(activations, dictionary, dtype=dtype)


def test_prepared_dictionary_of_other_dtype(activations, dictionary):
    prepared = solvers.prepare(dictionary)
    with pytest.raises(ValueError, match="prepared as float32, not float64"):
        omp(activations, prepared, dtype="float64")


@pytest.mark.parametrize("name", ["chunk_rows", "block_rows", "streams"])
def test_bad_execution_settings(activations, dictionary, name):
    with pytest.raises(ValueError, match=rf"{name} must be at least 1"):
        omp(activations, dictionary, **{name: 0})


def test_new_penalty_tolerance_or_budget_compiles_nothing_new():
    """Numeric settings are traced, so a service answering many alphas or budgets compiles
    once."""
    from solvers import _api

    rng = np.random.default_rng(11)
    dictionary = rng.standard_normal((96, 20))
    x = rng.standard_normal((4, 20))
    for method, first, second in [
        ("omp", {"k": 3, "tol": 0.0}, {"k": 3, "tol": 100.0}),
        ("fista", {"alpha": 0.1, "max_iter": 20}, {"alpha": 0.4, "max_iter": 20}),
        ("lasso", {"alpha": 0.1}, {"alpha": 0.25}),
        ("ista", {"alpha": 0.1, "max_iter": 20}, {"alpha": 0.1, "max_iter": 100}),
        ("fista", {"alpha": 0.01, "max_iter": 20}, {"alpha": 0.01, "max_iter": 30}),
        ("lasso", {"alpha": 0.01, "max_iter": 3}, {"alpha": 0.01, "max_iter": 40}),
    ]:
        a = solvers.unfold(x, dictionary, method=method, **first)
        compiled = _api._solve_jit._cache_size()
        b = solvers.unfold(x, dictionary, method=method, **second)
        assert _api._solve_jit._cache_size() == compiled, method
        used = not np.array_equal(a.to_dense(), b.to_dense()) or (a.n_iter != b.n_iter).any()
        assert used, method  # the new value was used


def test_a_prepared_dictionary_brings_its_dtype():
    dictionary = np.random.default_rng(12).standard_normal((50, 10))
    prepared = solvers.prepare(dictionary, dtype="float64")
    assert solvers.unfold(np.ones(10), prepared, k=2).values.dtype == np.float64
    assert solvers.unfold(np.ones(10), dictionary, k=2).values.dtype == np.float32
    with pytest.raises(ValueError, match="prepared as float64"):
        solvers.unfold(np.ones(10), prepared, k=2, dtype="float32")


def test_settings_from_make_settings_stand_for_a_method(activations, dictionary):
    prepared = solvers.prepare(dictionary)
    settings = solvers.make_settings("lasso", prepared, alpha=0.1, positive=True)
    by_settings = solvers.unfold(activations, prepared, method=settings)
    by_name = solvers.unfold(activations, prepared, method="lasso", alpha=0.1, positive=True)
    np.testing.assert_array_equal(by_settings.to_dense(), by_name.to_dense())
    with pytest.raises(ValueError, match="make_settings"):
        solvers.unfold(activations, prepared, method=settings, alpha=0.2)
    with pytest.raises(ValueError, match="make_settings"):
        solvers.unfold(activations, prepared, method=42)


def test_lasso_max_iter_bounds_the_homotopy_steps_too():
    rng = np.random.default_rng(11)
    dictionary, x = rng.standard_normal((96, 20)), rng.standard_normal((4, 20))
    for max_iter in (1, 3):
        result = solvers.unfold(x, dictionary, method="lasso", alpha=0.01, max_iter=max_iter)
        assert (result.n_iter <= max_iter).all()
        assert (result.status == solvers.Status.MAX_ITER).all()
