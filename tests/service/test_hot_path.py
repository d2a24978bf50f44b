"""The unfold hot path: served ahead of the router (`DirectRoutes`), without thread hops, with
solver settings remembered per dictionary; its contract is the one every other test checks."""

from __future__ import annotations

import inspect

from fastapi.testclient import TestClient

import solvers
from service import Settings, create_app, dependencies, unfolding
from service.demo import demo_dictionary
from service.routes._direct import DirectRoute, DirectRoutes
from tests.service.test_metrics_auth import UNFOLD, samples, value

ACTIVATION = demo_dictionary()[0][3].tolist()


def test_dependencies_are_coroutines_so_fastapi_runs_them_on_the_loop():
    # A plain `def` dependency costs every request a hop to FastAPI's thread pool.
    for getter in (dependencies.get_settings, dependencies.get_registry, dependencies.get_batcher):
        assert inspect.iscoroutinefunction(getter), getter.__name__


def test_the_unfold_route_is_served_directly(client):
    lanes = [m for m in client.app.user_middleware if m.cls is DirectRoutes]
    assert len(lanes) == 1
    routes = lanes[0].kwargs["routes"]
    assert [(r.path, r.methods) for r in routes] == [(UNFOLD, {"POST"})]
    assert all(isinstance(r, DirectRoute) for r in routes)
    response = client.post("/v1/dictionaries/demo/unfold", json={"activations": ACTIVATION})
    assert response.status_code == 200 and response.json()["codes"][0]["indices"] == [3]


def test_other_methods_on_the_unfold_path_still_reach_the_router(client):
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, "/v1/dictionaries/demo/unfold")
        assert response.status_code == 405, method
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"
    near = client.post("/v1/dictionaries/demo/unfold/more", json={"activations": ACTIVATION})
    assert near.status_code == 404 and near.json()["error"]["code"] == "not_found"


def test_the_unfold_route_keeps_its_openapi_description(client):
    operation = client.get("/openapi.json").json()["paths"][UNFOLD]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in operation["parameters"]] == [
        ("ref", "path", True)
    ]
    assert operation["summary"] == "Sparse codes of activations over the dictionary"
    assert "description" not in operation
    ok = operation["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/UnfoldResponse"}
    assert {"404", "422"} <= set(operation["responses"])


def test_an_unexpected_error_on_the_direct_route_is_a_500_and_counted(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(unfolding, "render", broken)
    app = create_app(
        Settings(data_dir=tmp_path, warmup=False, reports=False, compilation_cache=False)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.loader.join(timeout=60)
        response = client.post("/v1/dictionaries/demo/unfold", json={"activations": ACTIVATION})
        assert response.status_code == 500
        series = samples(client.get("/metrics").text)
    assert value(series, "unfold_requests_total", route=UNFOLD, method="POST", status="500") == 1


def test_solver_settings_are_remembered_per_dictionary_and_parameters(client):
    entry = client.app.state.registry.get("demo")
    first = unfolding.validate(unfolding.PARAMS_ADAPTER, {"k": 2})
    again = unfolding.validate(unfolding.PARAMS_ADAPTER, {"k": 2, "top": 1})
    other = unfolding.validate(unfolding.PARAMS_ADAPTER, {"k": 3})
    settings = unfolding.solver_settings(entry, first)
    assert settings == solvers.make_settings("omp", entry.prepared, k=2)
    assert unfolding.solver_settings(entry, again) is settings  # output options do not count
    assert unfolding.solver_settings(entry, other) != settings
    lasso = unfolding.validate(unfolding.PARAMS_ADAPTER, {"method": "lasso", "alpha": 0.1})
    expected = solvers.make_settings("lasso", entry.prepared, alpha=0.1)
    assert unfolding.solver_settings(entry, lasso) == expected
    assert len(entry.settings_cache) == 3


def test_refused_parameters_are_refused_every_time_and_the_cache_is_bounded(client):
    for _ in range(2):  # k > n_features (32) is the solver's refusal, not the schema's
        response = client.post(
            "/v1/dictionaries/demo/unfold", json={"activations": ACTIVATION, "k": 33}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_parameter"
    entry = client.app.state.registry.get("demo")
    assert entry.settings_cache == {}
    for k in range(1, 33):
        for tol in range(unfolding.SETTINGS_CACHE_SIZE // 16):
            params = unfolding.validate(unfolding.PARAMS_ADAPTER, {"k": k, "tol": tol / 100})
            unfolding.solver_settings(entry, params)
            assert len(entry.settings_cache) <= unfolding.SETTINGS_CACHE_SIZE
