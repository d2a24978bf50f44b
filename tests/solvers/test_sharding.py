"""Dictionaries on several devices give one device's answers.

JAX fixes the number of CPU devices when it starts, and the rest of the suite runs on one, so
the checks run in a subprocess with four simulated CPU devices: this module run as a script
(``python test_sharding.py CHECK``) prints a JSON report that the tests read.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 4
N_FEATURES = 203  # odd: the last feature shard is padded
D_MODEL = 32
ROWS = 13
METHODS = {
    "omp": {"k": 6},
    "positive omp": {"k": 6, "positive": True},
    "ista": {"alpha": 0.05, "tol": 1e-4, "max_iter": 300},
    "fista": {"alpha": 0.05, "tol": 1e-4},
    "lasso": {"alpha": 0.05},
    "positive lasso": {"alpha": 0.05, "positive": True},
}
CASES = {"matrix-free": (False, True), "gram": (True, False)}
"""(Gram path, with a bias) of each check: each path once, with and without a bias."""
BIG = (262144, 2304)
"""The large dictionary: 2.4 GB of float32, a quarter on each device."""


def run_check(check: str, timeout: float) -> dict:
    """The report of `check` run in a subprocess with `DEVICES` CPU devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run(
        [sys.executable, __file__, check],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def matrix_free_report() -> dict:
    return run_check("matrix-free", timeout=600)


@pytest.fixture(scope="module")
def gram_report() -> dict:
    return run_check("gram", timeout=600)


@pytest.mark.parametrize("shard", ["rows", "features"])
@pytest.mark.parametrize("method", list(METHODS))
def test_same_answers_as_one_device(matrix_free_report, method, shard):
    check_entry(matrix_free_report[f"{method}|{shard}"], shard, method)


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["rows", "features"])
@pytest.mark.parametrize("method", list(METHODS))
def test_same_answers_as_one_device_on_the_gram_path(gram_report, method, shard):
    check_entry(gram_report[f"{method}|{shard}"], shard, method)


def check_entry(entry: dict, shard: str, method: str) -> None:
    assert entry["shard"] == shard and entry["devices"] == DEVICES
    assert entry["status"] and entry["support"], entry
    if method in ("ista", "fista", "lasso"):
        # Stopped by a duality-gap tolerance: a rounding difference (XLA's kernels differ by
        # CPU and by call shape, and about one run in ten here differs between one device and
        # four) can move a row's gap across the tolerance at a check. The row then stops
        # there on one side and, the gap not being monotone, up to hundreds of steps later on
        # the other (seen: 780 FISTA steps, 121 LASSO steps); its values differ by what the
        # tolerance allows, not by rounding (README: Reproducibility).
        assert entry["max_difference"] <= 1e-3 * entry["scale"], entry
        return
    # OMP: the same atoms in the same order, the same stopping.
    assert entry["indices"] and entry["n_iter"], entry
    if shard == "rows":  # each device runs one device's program on its rows
        assert entry["max_difference"] == 0.0, entry
    else:  # sums across devices round differently
        assert entry["max_difference"] <= 1e-4 * entry["scale"], entry


def test_placement(matrix_free_report):
    placement = matrix_free_report["placement"]
    assert placement["features_padded_rows"] == 204
    # A quarter of the atoms on each device (the last padded), all of them for rows.
    assert placement["features_atoms_bytes"] == [51 * D_MODEL * 4] * DEVICES
    assert placement["rows_atoms_bytes"] == [N_FEATURES * D_MODEL * 4] * DEVICES
    assert placement["norms_difference"] <= 1e-6


@pytest.mark.slow
def test_gram_placement(gram_report):
    # Each device holds the Gram matrix's columns of its features.
    assert gram_report["placement"]["features_gram_bytes"] == [N_FEATURES * 51 * 4] * DEVICES


@pytest.mark.slow
def test_large_dictionary_split_by_features():
    report = run_check("large", timeout=1200)
    n_features, d_model = BIG
    assert report["atoms_bytes"] == [n_features // DEVICES * d_model * 4] * DEVICES
    assert report["device_bytes"] < n_features * d_model * 4 // DEVICES + (64 << 20)
    assert report["recovered"], report


# ------------------------------------------------------------------------------- checks


def _problem(n_features: int, d_model: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_features, d_model)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((rows, n_features), np.float32)
    for row in codes:
        row[rng.choice(n_features, 4, replace=False)] = rng.uniform(0.1, 0.3, 4)
    bias = rng.standard_normal(d_model).astype(np.float32)
    noise = 0.01 * rng.standard_normal((rows, d_model)).astype(np.float32)
    return atoms, bias, codes @ atoms + noise


def _shard_bytes(array) -> list[int]:
    return [piece.data.nbytes for piece in array.addressable_shards]


def check_methods(gram: bool, with_bias: bool) -> dict:
    import solvers

    atoms, bias, x = _problem(N_FEATURES, D_MODEL, ROWS)
    if with_bias:
        x = x + bias
    else:
        bias = None
    one = solvers.prepare(atoms, bias, gram=gram)
    placed = {
        shard: solvers.prepare(atoms, bias, gram=gram, devices=DEVICES, shard=shard)
        for shard in ("rows", "features")
    }
    report = {}
    for method, params in METHODS.items():
        name = method.split()[-1]
        expected = solvers.unfold(x, one, name, **params)
        dense = expected.to_dense()
        for shard, dictionary in placed.items():
            got = solvers.unfold(x, dictionary, name, **params)
            report[f"{method}|{shard}"] = {
                "shard": dictionary.shard,
                "devices": len(dictionary.devices),
                "indices": bool(np.array_equal(got.indices, expected.indices)),
                "support": bool(np.array_equal(got.to_dense() != 0, dense != 0)),
                "max_difference": float(np.max(np.abs(got.to_dense() - dense))),
                "scale": float(np.max(np.abs(dense))),
                "n_iter": bool(np.array_equal(got.n_iter, expected.n_iter)),
                "status": bool(np.array_equal(got.status, expected.status)),
            }
    features, rows = placed["features"], placed["rows"]
    report["placement"] = {
        "features_padded_rows": features.atoms.shape[0],
        "features_atoms_bytes": _shard_bytes(features.atoms),
        "features_gram_bytes": _shard_bytes(features.gram) if gram else None,
        "rows_atoms_bytes": _shard_bytes(rows.atoms),
        "norms_difference": float(np.max(np.abs(np.asarray(features.norms) - one.norms))),
    }
    return report


def check_large() -> dict:
    import solvers

    n_features, d_model = BIG
    rng = np.random.default_rng(0)
    atoms = np.empty(BIG, np.float32)
    for start in range(0, n_features, 16384):
        rng.standard_normal((16384, d_model), dtype=np.float32, out=atoms[start : start + 16384])
    dictionary = solvers.prepare(atoms, gram=False, devices=DEVICES, shard="features")
    chosen = np.array([[5, 70000, 140000, 262000], [1, 2, 131072, 200000]])
    weights = np.array([[1.0, -2.0, 1.5, 0.5], [2.0, 1.0, -1.0, 1.0]], np.float32)
    x = np.einsum("bk,bkm->bm", weights, atoms[chosen])
    result = solvers.unfold(x, dictionary, "omp", k=4)
    found = [
        sorted(zip(i.tolist(), v.tolist(), strict=True))
        for i, v in zip(result.indices, result.values, strict=True)
    ]
    recovered = all(
        [i for i, _ in row] == sorted(c.tolist())
        and np.allclose([v for _, v in row], w[np.argsort(c)], rtol=1e-4)
        for row, c, w in zip(found, chosen, weights, strict=True)
    )
    return {
        "atoms_bytes": _shard_bytes(dictionary.atoms),
        "device_bytes": dictionary.device_bytes,
        "recovered": bool(recovered),
        "found": found,
    }


if __name__ == "__main__":
    checks = {name: functools.partial(check_methods, *case) for name, case in CASES.items()}
    checks["large"] = check_large
    print(json.dumps(checks[sys.argv[1]]()))
