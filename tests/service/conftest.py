"""Service fixtures: an app on a temporary data directory, driven by TestClient."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import Settings, create_app


@contextlib.contextmanager
def running_client(data_dir, **overrides):
    """A TestClient whose app has finished loading its stored dictionaries. Reports are
    computed only when asked for (tests/service/test_reports.py), and JAX's persistent
    compilation cache, a process-wide setting, stays off in the test process (servers started
    as processes use it), unless `overrides` say."""
    defaults = {"reports": False, "compilation_cache": False}
    app = create_app(Settings(data_dir=data_dir, **{**defaults, **overrides}))
    with TestClient(app) as client:
        app.state.loader.join(timeout=60)
        assert app.state.registry.ready.is_set()
        yield client


@pytest.fixture
def client(tmp_path):
    with running_client(tmp_path) as client:
        yield client


@pytest.fixture
def toy(client):
    """A registered 3-sparse-friendly dictionary: (directions, info)."""
    rng = np.random.default_rng(7)
    directions = rng.standard_normal((64, 24))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    response = client.post(
        "/v1/dictionaries", json={"name": "toy", "directions": directions.tolist()}
    )
    assert response.status_code == 201, response.text
    return directions.astype(np.float32), response.json()
