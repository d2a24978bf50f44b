"""POST /v1/dictionaries/{ref}/unfold: correct codes, and a clear 4xx for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import orthogonal_mp

from service.demo import demo_dictionary
from tests.service.helpers import NPY_HEADERS, npy_bytes


def test_demo_example_from_the_readme(client):
    directions, labels = demo_dictionary()
    activation = 2 * directions[3] + 1 * directions[22]
    response = client.post(
        "/v1/dictionaries/demo/unfold", json={"activations": activation.tolist(), "k": 2}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["codes"][0]["indices"] == [3, 22]
    np.testing.assert_allclose(body["codes"][0]["values"], [2.0, 1.0], atol=1e-5)
    assert body["residual_norm"][0] < 1e-5 and body["l0"] == [2]


def test_batch_matches_sklearn_and_ground_truth(client, toy):
    directions, info = toy
    rng = np.random.default_rng(0)
    codes = np.zeros((5, 64))
    for row in codes:
        row[rng.choice(64, 3, replace=False)] = rng.uniform(0.5, 2, 3)
    activations = codes @ directions
    response = client.post(
        f"/v1/dictionaries/{info['id']}/unfold",
        json={"activations": activations.tolist(), "method": "omp", "k": 3},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    dense = np.zeros_like(codes)
    for row, code in zip(dense, body["codes"], strict=True):
        row[code["indices"]] = code["values"]
    np.testing.assert_allclose(dense, codes, atol=1e-4)
    reference = orthogonal_mp(directions.T.astype(float), activations.T, n_nonzero_coefs=3).T
    np.testing.assert_allclose(dense, reference, atol=1e-4)
    assert len(body["residual_norm"]) == 5 and max(body["relative_error"]) < 1e-4
    assert body["status"] == [2] * 5 and len(body["messages"]) == 5


def test_tol_only(client, toy):
    directions, _ = toy
    activation = 1.5 * directions[5] - 0.7 * directions[40]
    body = client.post(
        "/v1/dictionaries/toy/unfold",
        json={"activations": [activation.tolist()], "k": None, "tol": 1e-3},
    ).json()
    assert sorted(body["codes"][0]["indices"]) == [5, 40]


def post(client, body, ref="toy"):
    return client.post(f"/v1/dictionaries/{ref}/unfold", json=body)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"activations": [[0.0] * 23]}, 422, "shape_mismatch"),
        ({"activations": [[[0.0] * 24]]}, 422, "invalid_request"),
        ({"activations": [[0.0] * 24, [0.0] * 23]}, 422, "invalid_shape"),
        ({"activations": []}, 422, "shape_mismatch"),
        ({"activations": [[]]}, 422, "shape_mismatch"),
        ({"activations": [[0.0] * 24], "k": 0}, 422, "invalid_request"),
        ({"activations": [[0.0] * 24], "k": 65}, 422, "invalid_parameter"),
        ({"activations": [[0.0] * 24], "k": None}, 422, "invalid_parameter"),
        ({"activations": [[0.0] * 24], "tol": -1}, 422, "invalid_request"),
        ({"activations": [[0.0] * 24], "method": "magic"}, 422, "invalid_request"),
        ({"activations": [[0.0] * 24], "alpha": 0.1}, 422, "invalid_request"),
        ({"activations": [["a"] * 24]}, 422, "invalid_request"),
        ({"activations": [[1e39] * 24]}, 422, "non_finite"),
        ({"k": 3}, 422, "invalid_request"),
    ],
)
def test_bad_unfold_requests(client, toy, body, status, code):
    response = post(client, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_unknown_dictionary_is_404(client):
    response = post(client, {"activations": [[0.0]]}, ref="missing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_nan_activation_is_refused(client, toy):
    json_nan = client.post(
        "/v1/dictionaries/toy/unfold",
        content='{"activations": [' + ", ".join(["NaN"] + ["0"] * 23) + "]}",
        headers={"content-type": "application/json"},
    )
    assert json_nan.status_code == 422 and json_nan.json()["error"]["code"] == "invalid_request"
    activations = np.zeros((3, 24), np.float32)
    activations[1, 4] = np.inf
    binary_inf = client.post(
        "/v1/dictionaries/toy/unfold?k=2", content=npy_bytes(activations), headers=NPY_HEADERS
    )
    assert binary_inf.status_code == 422
    assert binary_inf.json()["error"]["code"] == "non_finite"
    assert "[1]" in binary_inf.json()["error"]["message"]


def test_malformed_json_is_422(client, toy):
    response = client.post(
        "/v1/dictionaries/toy/unfold", content="{", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_row_limit(tmp_path):
    from tests.service.conftest import running_client

    with running_client(tmp_path, max_rows=2) as client:
        response = client.post(
            "/v1/dictionaries/demo/unfold", json={"activations": [[0.0] * 16] * 3, "k": 1}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "too_many_rows"


def test_query_parameters_with_a_json_body_are_refused_not_ignored(client):
    activation = demo_dictionary()[0][3].tolist()
    response = client.post(
        "/v1/dictionaries/demo/unfold?method=lasso&alpha=0.01", json={"activations": activation}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "['alpha', 'method']" in error["message"] and "JSON object" in error["message"]


def test_an_empty_query_string_with_a_json_body_is_no_parameter(client):
    activation = demo_dictionary()[0][3].tolist()
    response = client.post("/v1/dictionaries/demo/unfold?&", json={"activations": activation})
    assert response.status_code == 200, response.text
    assert response.json()["codes"][0]["indices"] == [3]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_non_finite_row_is_named(client, bad):
    activations = np.ones((5, 16), np.float32)
    activations[[1, 4], [0, 15]] = bad
    response = client.post(
        "/v1/dictionaries/demo/unfold?k=2", content=npy_bytes(activations), headers=NPY_HEADERS
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "non_finite"
    assert "row(s) [1, 4]" in response.json()["error"]["message"]


def test_max_nonzero_bounds_the_lasso_answer_and_status_5_says_when_it_binds(client, toy):
    """The parameter status 5's message names is accepted (JSON and query string); a row
    whose solution needs more non-zeros says so, and one within the bound converges."""
    directions, info = toy
    rng = np.random.default_rng(3)
    codes = np.zeros((2, 64))
    codes[0, rng.choice(64, 6, replace=False)] = 1.0
    codes[1, 5] = 1.0
    activations = codes @ directions
    url = f"/v1/dictionaries/{info['id']}/unfold"
    body = {"activations": activations.tolist(), "method": "lasso", "alpha": 1e-3}
    response = client.post(url, json={**body, "max_nonzero": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == [5, 0]
    assert "max_nonzero" in answer["messages"][0]
    assert all(len(code["indices"]) <= 2 for code in answer["codes"])
    assert answer["codes"][1]["indices"] == [5]
    query = client.post(
        f"{url}?method=lasso&alpha=0.001&max_nonzero=2",
        content=npy_bytes(activations.astype(np.float32)),
        headers=NPY_HEADERS,
    )
    assert query.status_code == 200, query.text
    assert query.json()["status"] == [5, 0]
    too_many = client.post(url, json={**body, "max_nonzero": 65})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["code"] == "invalid_parameter"
    assert "max_nonzero" in too_many.json()["error"]["message"]


def test_one_method_table_names_every_method_everywhere():
    """The service's method table (`schemas.PARAMS`) is the solvers' (`solvers.METHODS`), and
    the query parameters, job parameters and CLI choices come from it."""
    import solvers
    from service import cli, schemas, unfolding
    from service.routes import jobs

    assert set(schemas.PARAMS) == set(solvers.METHODS)
    assert tuple(schemas.PARAMS) == cli.METHODS
    fields = {name for model in schemas.PARAMS.values() for name in model.model_fields}
    assert set(unfolding.QUERY_PARAMS) == fields
    assert set(jobs.JOB_FIELDS) == fields - {"output", "top"}
