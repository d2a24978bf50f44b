"""The engine around the methods: explicit precision, the bfloat16 scan made exact, execution
plans per backend, the Gram path chosen by memory, and the jittable entry point."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers import _dictionary, _scan
from tests.conftest import sparse_problem

METHOD_PARAMS = [
    ("omp", dict(k=6)),
    ("omp", dict(k=6, positive=True)),
    ("ista", dict(alpha=0.05, max_iter=20)),
    ("fista", dict(alpha=0.05, max_iter=20)),
    ("lasso", dict(alpha=0.05)),
]


def dot_precisions(jaxpr) -> list[tuple]:
    """(precision, operand dtypes) of every dot_general in `jaxpr` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.params["precision"], tuple(v.aval.dtype for v in eqn.invars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += dot_precisions(sub)
    return found


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
@pytest.mark.parametrize(("method", "params"), METHOD_PARAMS)
def test_every_product_states_strict_precision(method, params, gram):
    """No product runs at the backend's default precision (TF32 or bf16 passes on GPUs):
    every dot_general of every method asks for HIGHEST, the bfloat16 scan's aside."""
    dictionary, _, x = sparse_problem(256, 32, 4, 8, seed=1)
    prepared = solvers.prepare(dictionary, gram=gram, scan=None if gram else "bfloat16")
    settings = solvers.make_settings(method, prepared, **params)
    jaxpr = jax.make_jaxpr(lambda x: solvers.solve(settings, prepared, x))(x)
    products = dot_precisions(jaxpr.jaxpr)
    assert products, "no product found: the walk over the jaxpr is broken"
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for precision, dtypes in products:
        if dtypes == (jnp.bfloat16, jnp.bfloat16):
            assert method == "omp" and not params.get("positive") and not gram
            continue
        assert precision == highest, (precision, dtypes)
    scans = [p for p in products if p[1] == (jnp.bfloat16, jnp.bfloat16)]
    assert bool(scans) == (method == "omp" and not params.get("positive") and not gram)


# ------------------------------------------------------------------ the bfloat16 scan


def scan_problem(kind: str):
    rng = np.random.default_rng(3)
    dictionary, codes, x = sparse_problem(1536, 96, 12, 48, noise=0.01, seed=4)
    if kind == "scaled":  # rows of very different norms
        dictionary = dictionary * rng.uniform(0.05, 20.0, (dictionary.shape[0], 1))
        x = (codes @ dictionary).astype(np.float32)
    elif kind == "duplicates":  # exact ties, more of them than the candidates re-scored
        dictionary = np.concatenate([dictionary[:-40], np.repeat(dictionary[:1], 40, 0)])
        x = np.concatenate([x, dictionary[:4] * 3.0 + 0.01 * rng.standard_normal((4, 96))])
    elif kind == "noise":  # residuals that are pure noise: many near-equal scores
        x = rng.standard_normal((48, 96)).astype(np.float32)
    return dictionary.astype(np.float32), x.astype(np.float32)


@pytest.mark.parametrize("kind", ["gaussian", "scaled", "duplicates", "noise"])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_scan_selects_what_float32_selects(kind, bias):
    dictionary, x = scan_problem(kind)
    b = np.linspace(-0.5, 0.5, dictionary.shape[1]).astype(np.float32) if bias else None
    prepared = solvers.prepare(dictionary, b, gram=False, scan="bfloat16")
    assert prepared.scan_atoms is not None
    x = x + (0 if b is None else b)
    fast = solvers.unfold(x, prepared, k=24)
    strict = solvers.unfold(x, prepared, k=24, scan="float32")
    np.testing.assert_array_equal(fast.indices, strict.indices)
    np.testing.assert_array_equal(fast.status, strict.status)
    np.testing.assert_allclose(fast.values, strict.values, rtol=1e-5, atol=1e-6)


def test_bfloat16_alone_would_select_differently_and_the_rescoring_repairs_it():
    """Two atoms whose float32 scores differ by less than bfloat16 resolves: the low-precision
    argmax takes the wrong one (lowest index among its ties), `exact_select` the right one."""
    rng = np.random.default_rng(5)
    atoms = rng.standard_normal((600, 64)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    residual = (3.0 * atoms[17] + 0.05 * rng.standard_normal(64)).astype(np.float32)
    atoms[5] = atoms[17] + 1e-4 * rng.standard_normal(64)  # a near-twin, earlier index
    atoms[5] /= np.linalg.norm(atoms[5])
    prepared = solvers.prepare(atoms, gram=False, scan="bfloat16")
    inv_norms = 1.0 / prepared.norms
    r = jnp.asarray(residual)[None]
    strict_scores = np.abs(np.asarray(r @ prepared.atoms.T))[0] * np.asarray(inv_norms)
    scores, bound = _scan.scan(r, prepared.scan_atoms, prepared.scan_error, inv_norms)
    assert np.all(np.abs(np.abs(np.asarray(scores[0])) - strict_scores) <= float(bound[0]))
    low_choice = int(jnp.argmax(jnp.abs(scores[0])))
    index, settled = _scan.exact_select(scores, bound, r, prepared.atoms, inv_norms)
    assert bool(settled[0])
    assert int(index[0]) == int(np.argmax(strict_scores))
    assert {low_choice, int(index[0])} <= {5, 17}


def test_top_candidates_finds_every_score_over_a_threshold():
    rng = np.random.default_rng(6)
    scores = jnp.asarray(rng.standard_normal((8, 5000)).astype(np.float32))
    values, indices = _scan.top_candidates(scores, 16)
    expected = jax.lax.top_k(scores, 16)[0]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(scores), indices, 1), values)


def test_the_scan_needs_a_dictionary_prepared_for_it():
    dictionary, _, x = sparse_problem(256, 32, 4, 8, seed=1)
    strict = solvers.prepare(dictionary, gram=False, scan="float32")
    with pytest.raises(ValueError, match="bfloat16 scan"):
        solvers.unfold(x, strict, k=4, scan="bfloat16")
    with pytest.raises(ValueError, match="bfloat16 scan"):
        solvers.unfold(x, solvers.prepare(dictionary, gram=True), k=4, scan="bfloat16")
    with pytest.raises(ValueError, match="scan must be one of"):
        solvers.prepare(dictionary, scan="float16")
    with pytest.raises(ValueError, match="float32 dictionary"):
        solvers.prepare(dictionary, dtype="float64", gram=False, scan="bfloat16")


# ------------------------------------------------------------------ plans


def test_cpu_plan_keeps_the_measured_tuning():
    dictionary, _, _ = sparse_problem(512, 64, 4, 1, seed=2)
    gram = solvers.prepare(dictionary, gram=True)
    omp = solvers.plan_for(solvers.make_settings("omp", gram, k=4), gram, backend="cpu")
    assert (omp.chunk_rows, omp.min_rows, omp.run_alone, omp.native_argmax) == (4, 2, False, False)
    assert omp.streams >= 1 and omp.scan == "float32"
    nn = solvers.plan_for(
        solvers.make_settings("omp", gram, k=4, positive=True), gram, backend="cpu"
    )
    assert nn.run_alone and nn.streams == 1
    lasso = solvers.plan_for(solvers.make_settings("lasso", gram, alpha=0.1), gram, backend="cpu")
    assert lasso.chunk_rows == 64
    free = solvers.prepare(dictionary, gram=False)
    mf = solvers.plan_for(solvers.make_settings("omp", free, k=4), free, backend="cpu")
    assert mf.streams == 1 and mf.chunk_rows == 256


def test_cpu_plan_sizes_omps_gram_chunks_to_the_cache(monkeypatch):
    dictionary, _, _ = sparse_problem(4096, 64, 4, 1, seed=2)
    gram = solvers.prepare(dictionary, gram=True)
    settings = solvers.make_settings("omp", gram, k=15)
    row_bytes = settings.row_floats(4096, 64, True) * 4
    monkeypatch.setattr("solvers._plan._cpu_cores", lambda: 2)
    chunks = {}
    for rows_in_cache in (64, 16, 8, 4, 1, 0):
        cache = int(rows_in_cache * row_bytes / 0.5)
        monkeypatch.setattr("solvers._plan._cache_bytes", lambda cache=cache: cache)
        plan = solvers.plan_for(settings, gram, backend="cpu")
        chunks[rows_in_cache] = (plan.chunk_rows, plan.block_rows % plan.chunk_rows)
    # Two streams share the cache: chunks of at most 4, fewer when 2 x 4 rows do not fit,
    # never fewer than 2; a call still holds whole chunks.
    assert chunks == {64: (4, 0), 16: (4, 0), 8: (4, 0), 4: (2, 0), 1: (2, 0), 0: (2, 0)}
    lasso = solvers.plan_for(solvers.make_settings("lasso", gram, alpha=0.1), gram, backend="cpu")
    assert lasso.chunk_rows == 64  # not OMP: not sized by the cache


def test_accelerator_plan_solves_a_call_in_one_chunk_sized_by_memory(monkeypatch):
    dictionary, _, _ = sparse_problem(4096, 64, 4, 1, seed=2)
    prepared = solvers.prepare(dictionary, gram=False)
    settings = solvers.make_settings("omp", prepared, k=16)
    monkeypatch.setattr("solvers._plan.available_bytes", lambda device=None: 64 << 30)
    big = solvers.plan_for(settings, prepared, backend="gpu")
    assert big.chunk_rows == big.block_rows == 4096
    assert big.native_argmax and not big.run_alone and big.streams == 1
    monkeypatch.setattr("solvers._plan.available_bytes", lambda device=None: 256 << 20)
    small = solvers.plan_for(settings, prepared, backend="gpu")
    row_bytes = settings.row_floats(4096, 64, False) * 4
    assert small.chunk_rows * row_bytes <= (256 << 20) // 4 < 2 * small.chunk_rows * row_bytes


@pytest.mark.parametrize(("method", "params"), METHOD_PARAMS)
def test_an_accelerator_plan_gives_the_cpu_plans_answers(method, params, monkeypatch):
    """The accelerator plan's kernels (native argmax, one chunk per call) run on the CPU too,
    with the same answers."""
    dictionary, _, x = sparse_problem(512, 48, 5, 40, seed=9)
    for gram in (True, False):
        prepared = solvers.prepare(dictionary, gram=gram)
        settings = solvers.make_settings(method, prepared, **params)
        cpu = solvers.unfold(x, prepared, settings)
        plan = dataclasses.replace(
            solvers.plan_for(settings, prepared, backend="gpu"), block_rows=64, chunk_rows=64
        )
        accelerator = solvers.unfold(x, prepared, settings, plan=plan)
        if method in ("ista", "fista"):
            # Other call shapes round otherwise, and a row may then stop one gap check apart
            # (README: Reproducibility): the objectives agree, not the codes to rounding.
            np.testing.assert_allclose(
                lasso_objective(accelerator, dictionary, x, params["alpha"]),
                lasso_objective(cpu, dictionary, x, params["alpha"]),
                rtol=1e-3,
            )
            continue
        if method == "lasso":
            # Features that enter the path at the same event (to rounding) may be listed in
            # either order: the codes themselves are compared.
            np.testing.assert_allclose(accelerator.to_dense(), cpu.to_dense(), rtol=1e-4, atol=1e-5)
            continue
        np.testing.assert_array_equal(accelerator.indices, cpu.indices)
        np.testing.assert_allclose(accelerator.values, cpu.values, rtol=1e-4, atol=1e-5)


def lasso_objective(result, dictionary, x, alpha: float) -> np.ndarray:
    """0.5 ||x - codes D||^2 + alpha ||codes||_1 per row."""
    codes = result.to_dense()
    residual = x - codes @ dictionary
    return 0.5 * (residual**2).sum(axis=1) + alpha * np.abs(codes).sum(axis=1)


def test_a_plan_and_its_overrides_are_not_both_given():
    dictionary, _, x = sparse_problem(256, 32, 4, 8, seed=1)
    prepared = solvers.prepare(dictionary)
    plan = solvers.plan_for(solvers.make_settings("omp", prepared, k=4), prepared)
    with pytest.raises(ValueError, match="either a Plan"):
        solvers.unfold(x, prepared, k=4, plan=plan, streams=1)


# ------------------------------------------------------------------ the Gram path by memory


def test_the_gram_path_is_chosen_by_memory(monkeypatch):
    monkeypatch.setattr(_dictionary, "available_bytes", lambda device=None: 10 * 10**9)
    fits = solvers.choose_path(24576)  # 2.4 GB, under half of 10 GB
    assert fits.gram and fits.budget_bytes == 5 * 10**9
    assert "fits 50% of the 10.00 GB available" in fits.reason
    too_big = solvers.choose_path(65536)  # 17 GB
    assert not too_big.gram and "exceeds" in too_big.reason
    assert too_big.gram_bytes == 65536**2 * 4
    assert not solvers.choose_path(24576, gram_budget_bytes=10**9).gram
    assert solvers.choose_path(65536, gram=True).reason == "Gram path requested"
    assert solvers.available_bytes() > 0  # the host's, here


def test_the_gram_matrix_is_built_in_blocks_into_one_buffer(monkeypatch):
    monkeypatch.setattr(_dictionary, "GRAM_BLOCK_BYTES", 37 * 4 * 301)  # 37-row blocks
    rng = np.random.default_rng(4)
    atoms = rng.standard_normal((301, 17)).astype(np.float32)
    gram = np.asarray(_dictionary.gram_of(jnp.asarray(atoms)))
    expected = atoms.astype(np.float64) @ atoms.T.astype(np.float64)
    np.testing.assert_allclose(gram, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the jittable entry


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "matrix-free"])
def test_solve_runs_inside_the_callers_jit(gram):
    dictionary, _, x = sparse_problem(512, 48, 5, 13, seed=12)  # 13 rows: a partial chunk
    prepared = solvers.prepare(dictionary, gram=gram)
    settings = solvers.make_settings("omp", prepared, k=5)

    @jax.jit
    def reconstruct(x):
        solution = solvers.solve(settings, prepared, x)
        atoms = prepared.atoms[jnp.maximum(solution.indices, 0)]
        return jnp.einsum("bk,bkd->bd", solution.values, atoms), solution

    reconstruction, solution = reconstruct(jnp.asarray(x))
    assert isinstance(solution, solvers.Solution) and isinstance(solution.indices, jax.Array)
    expected = solvers.unfold(x, prepared, settings)
    np.testing.assert_array_equal(np.asarray(solution.indices), expected.indices)
    np.testing.assert_allclose(
        np.linalg.norm(x - np.asarray(reconstruction), axis=1), expected.residual_norm, atol=1e-4
    )
    with pytest.raises(ValueError, match=r"needs \(batch, 48\)"):
        solvers.solve(settings, prepared, jnp.zeros((2, 47)))


def test_unfold_remembers_a_plan_per_settings_and_dictionary():
    from solvers import _api

    dictionary, _, _ = sparse_problem(256, 32, 4, 1, seed=2)
    gram, free = solvers.prepare(dictionary, gram=True), solvers.prepare(dictionary, gram=False)
    settings = solvers.make_settings("omp", gram, k=4)
    first = _api._plan_of(settings, gram, streams=None)
    assert _api._plan_of(settings, gram, streams=None) is first
    assert _api._plan_of(settings, free, streams=None).chunk_rows != first.chunk_rows
    assert _api._plan_of(settings, gram, streams=1).streams == 1
    other = solvers.make_settings("omp", gram, k=5)
    assert _api._plan_of(other, gram, streams=None) is not first
