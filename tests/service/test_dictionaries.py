"""Registering, listing, inspecting, deleting and persisting dictionaries."""

from __future__ import annotations

import json
import time

import numpy as np

from service.store import content_id
from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes, stable


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_demo_dictionary_is_seeded_on_an_empty_store(client):
    info = client.get("/v1/dictionaries/demo").json()
    assert (info["n_features"], info["d_model"], info["labels"]) == (32, 16, 32)
    assert info["path"] == "gram"
    assert info["warm"]  # ready means its default programs are compiled


def test_a_new_dictionary_is_warmed_in_the_background(client):
    created = client.post("/v1/dictionaries", json={"name": "w", "directions": [[1, 0], [0, 1]]})
    deadline = time.monotonic() + 120
    while not client.get("/v1/dictionaries/w").json()["warm"]:
        assert time.monotonic() < deadline, "never warmed"
        time.sleep(0.1)
    assert created.status_code == 201


def test_warm_stays_false_without_warm_up(tmp_path):
    with running_client(tmp_path, warmup=False) as client:
        assert client.get("/v1/dictionaries/demo").json()["warm"] is False


def test_no_demo_when_disabled(tmp_path):
    with running_client(tmp_path, demo=False) as client:
        assert client.get("/v1/dictionaries").json() == {"dictionaries": []}


def test_register_returns_content_addressed_id(client, toy):
    directions, info = toy
    assert info["id"] == content_id(directions, None)
    assert (info["name"], info["n_features"], info["d_model"]) == ("toy", 64, 24)
    assert info["has_bias"] is False and info["dtype"] == "float32"
    assert abs(info["norms"]["mean"] - 1) < 1e-6
    assert stable(client.get(f"/v1/dictionaries/{info['id']}").json()) == stable(info)
    assert stable(client.get("/v1/dictionaries/toy").json()) == stable(info)
    names = {d["name"] for d in client.get("/v1/dictionaries").json()["dictionaries"]}
    assert names == {"demo", "toy-model", "toy"}


def test_registering_again_is_idempotent(client, toy):
    directions, info = toy
    again = client.post("/v1/dictionaries", json={"name": "toy", "directions": directions.tolist()})
    assert again.status_code == 200 and again.json()["id"] == info["id"]


def test_conflicts(client, toy):
    directions, info = toy
    other_name = client.post(
        "/v1/dictionaries", json={"name": "copy", "directions": directions.tolist()}
    )
    assert other_name.status_code == 409
    assert other_name.json()["error"]["code"] == "duplicate_content"
    taken = client.post(
        "/v1/dictionaries", json={"name": "toy", "directions": (2 * directions).tolist()}
    )
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"


def test_bias_changes_the_id_and_is_reported(client):
    directions = np.eye(4).tolist()
    plain = client.post("/v1/dictionaries", json={"name": "a", "directions": directions}).json()
    biased = client.post(
        "/v1/dictionaries", json={"name": "b", "directions": directions, "bias": [1, 0, 0, 0]}
    ).json()
    assert plain["id"] != biased["id"] and biased["has_bias"] and not plain["has_bias"]


def test_delete(client, toy):
    _, info = toy
    assert client.delete("/v1/dictionaries/toy").status_code == 204
    assert client.get(f"/v1/dictionaries/{info['id']}").status_code == 404
    assert client.delete("/v1/dictionaries/toy").status_code == 404


def test_survives_restart_with_same_id(tmp_path):
    with running_client(tmp_path) as client:
        created = client.post(
            "/v1/dictionaries", json={"name": "keep", "directions": [[1, 0], [0, 1], [1, 1]]}
        ).json()
    with running_client(tmp_path) as client:
        assert stable(client.get("/v1/dictionaries/keep").json()) == stable(created)


def test_partial_write_is_invisible_and_damaged_entry_skipped(tmp_path):
    with running_client(tmp_path) as client:
        good = client.post(
            "/v1/dictionaries", json={"name": "good", "directions": [[1, 0], [0, 1]]}
        ).json()
        bad = client.post(
            "/v1/dictionaries", json={"name": "bad", "directions": [[1, 2], [3, 4]]}
        ).json()
    # A crash mid-write leaves only a staging folder behind; tamper with one stored manifest.
    (tmp_path / "staging" / "abc.partial").mkdir(parents=True)
    (tmp_path / "staging" / "abc.partial" / "manifest.json").write_text("{")
    manifest = tmp_path / "dictionaries" / bad["id"] / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "id": "0" * 24}))
    with running_client(tmp_path) as client:
        names = {d["name"] for d in client.get("/v1/dictionaries").json()["dictionaries"]}
        assert names == {"demo", "toy-model", "good"}  # demo: the store held no valid dictionary
        assert client.get(f"/v1/dictionaries/{good['id']}").status_code == 200
    assert not any((tmp_path / "staging").iterdir())


def test_bad_registrations(client):
    cases = [
        ({"name": "x", "directions": [[1, 0], [0, 0]]}, "invalid_dictionary"),
        ({"name": "x", "directions": [[1, 0], [0]]}, "invalid_dictionary"),
        ({"name": "x", "directions": []}, "invalid_dictionary"),
        ({"name": "x", "directions": [[1, 0]], "bias": [1, 2, 3]}, "invalid_dictionary"),
        ({"name": "x", "directions": [[1, 0]], "labels": ["a", "b"]}, "invalid_labels"),
        ({"name": "has space", "directions": [[1, 0]]}, "invalid_name"),
        ({"name": "x", "directions": [["a", 0]]}, "invalid_request"),
        ({"directions": [[1, 0]]}, "invalid_request"),
        ({"name": "x", "directions": [[1, 0]], "extra": 1}, "invalid_request"),
    ]
    for body, code in cases:
        response = client.post("/v1/dictionaries", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["code"] == code, (body, response.json())
        assert response.json()["error"]["message"]


def test_non_finite_directions_are_refused(client):
    # NaN is not JSON: strict parsing refuses the token itself.
    body = '{"name": "x", "directions": [[1, NaN], [0, 1]]}'
    response = client.post(
        "/v1/dictionaries", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert "not valid JSON" in response.json()["error"]["message"]
    # Binary formats can carry NaN: refused by value.
    directions = np.array([[1, np.nan], [0, 1]], np.float32)
    response = client.post(
        "/v1/dictionaries?name=x", content=npy_bytes(directions), headers=NPY_HEADERS
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_dictionary"
    assert "non-finite" in response.json()["error"]["message"]


def test_unknown_route_and_method_render_the_error_format(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.put("/v1/dictionaries")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_warm_up_asked_to_stop_compiles_nothing_and_is_not_warm(tmp_path):
    import threading

    from service.batching import warmup

    with running_client(tmp_path, warmup=False) as client:
        entry = client.app.state.registry.get("demo")
        stop = threading.Event()
        stop.set()
        assert warmup(entry, 16, stop=stop) == 0
        assert not entry.warm.is_set()
        assert warmup(entry, 16, stop=threading.Event()) == 5 and entry.warm.is_set()


def test_an_app_started_again_loads_and_warms_again(tmp_path):
    # Shutdown stops the app's batcher and background threads; a second start gets new ones.
    from fastapi.testclient import TestClient

    from service import Settings, create_app

    app = create_app(Settings(data_dir=tmp_path, reports=False, compilation_cache=False))
    for _ in range(2):
        with TestClient(app) as client:
            app.state.loader.join(timeout=60)
            assert not app.state.background.stopping.is_set()
            assert client.get("/readyz").status_code == 200
            assert client.get("/v1/dictionaries/demo").json()["warm"]
            response = client.post("/v1/dictionaries/demo/unfold", json={"activations": [1.0] * 16})
            assert response.status_code == 200, response.text
        assert app.state.background.stopping.is_set()


def test_unknown_names_are_404_once_loaded_even_while_warm_up_runs(tmp_path, monkeypatch):
    """Readiness waits for compilation; whether a dictionary exists does not."""
    import threading

    from fastapi.testclient import TestClient

    import service.app
    from service.app import create_app
    from service.settings import Settings

    release = threading.Event()
    monkeypatch.setattr(service.app, "warmup", lambda *args, **kwargs: release.wait(30))
    app = create_app(Settings(data_dir=tmp_path, compilation_cache=False, reports=False))
    try:
        with TestClient(app) as client:
            assert app.state.registry.loaded.wait(30)
            assert client.get("/readyz").status_code == 503  # still warming up
            missing = client.get("/v1/dictionaries/nope")
            assert missing.status_code == 404, missing.text
            assert missing.json()["error"]["code"] == "not_found"
            unfold = client.post("/v1/dictionaries/nope/unfold", json={"activations": [0.0]})
            assert unfold.status_code == 404
            assert client.get("/v1/dictionaries/demo").status_code == 200
            release.set()
            app.state.loader.join(timeout=30)
            assert client.get("/readyz").status_code == 200
    finally:
        release.set()
