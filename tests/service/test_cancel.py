"""A request that times out stops its solve: the worker thread is free for the next caller."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes

ROWS = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
# Proximal steps that go nowhere near convergence: 10**6 of them on 64 rows of a 2048 x 128
# dictionary run for an hour on this machine.
ENDLESS = {"method": "ista", "alpha": 1.0, "tol": 0.0, "max_iter": 10**6}


def cancelled_solves(client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "unfold_cancelled_solves":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError("no unfold_cancelled_solves metric")


def test_a_timed_out_solve_is_stopped_and_the_only_solver_thread_serves_the_next(tmp_path):
    directions = np.random.default_rng(4).standard_normal((2048, 128)).astype(np.float32)
    with running_client(tmp_path, request_timeout_s=2, solver_threads=1, warmup=False) as client:
        registered = client.post(
            "/v1/dictionaries", content=npy_bytes(directions), headers=NPY_HEADERS,
            params={"name": "wide"},
        )  # fmt: skip
        assert registered.status_code == 201, registered.text
        path = "/v1/dictionaries/wide/unfold"
        activations = ROWS.tolist()
        warm = client.post(path, json={"activations": activations, **ENDLESS, "max_iter": 10})
        assert warm.status_code == 200, warm.text  # compiled: max_iter is traced
        assert client.post(path, json={"activations": ROWS[0].tolist(), "k": 2}).status_code == 200
        started = time.perf_counter()
        endless = client.post(path, json={"activations": activations, **ENDLESS})
        assert endless.status_code == 504, endless.text
        after = client.post(path, json={"activations": ROWS[0].tolist(), "k": 2})
        took = time.perf_counter() - started
        assert after.status_code == 200, after.text
        assert took < 4, f"the next request was answered {took:.1f} s after the endless one"
        assert cancelled_solves(client) == 1
