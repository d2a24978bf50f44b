"""Against a real `unfold serve` process on 127.0.0.1: restart persistence and concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.service.helpers import free_port, serve, stable


def test_restart_keeps_dictionaries_and_ids(tmp_path):
    port = free_port()
    directions = np.random.default_rng(3).standard_normal((40, 10)).round(3).tolist()
    with serve(str(tmp_path), port) as client:
        created = client.post("/v1/dictionaries", json={"name": "kept", "directions": directions})
        assert created.status_code == 201
    with serve(str(tmp_path), port) as client:
        assert stable(client.get("/v1/dictionaries/kept").json()) == stable(created.json())
        again = client.post("/v1/dictionaries", json={"name": "kept", "directions": directions})
        assert again.status_code == 200 and again.json()["id"] == created.json()["id"]


def test_concurrent_requests_all_answered_correctly(tmp_path):
    from service.demo import demo_dictionary

    directions, _ = demo_dictionary()
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.choice(32, 2, replace=False)) for _ in range(32)]
    with serve(str(tmp_path), free_port()) as client:

        def call(pair):
            activation = 1.5 * directions[pair[0]] - 0.75 * directions[pair[1]]
            response = client.post(
                "/v1/dictionaries/demo/unfold", json={"activations": activation.tolist(), "k": 2}
            )
            return pair, response

        with ThreadPoolExecutor(max_workers=16) as pool:
            for pair, response in pool.map(call, pairs):
                assert response.status_code == 200, response.text
                code = response.json()["codes"][0]
                assert dict(zip(code["indices"], code["values"], strict=True)) == pytest.approx(
                    {int(pair[0]): 1.5, int(pair[1]): -0.75}, abs=1e-5
                )
