"""`certify` on every unfold entry point: the same certificates as `solvers.certify`."""

from __future__ import annotations

import numpy as np
import orjson
from safetensors.numpy import load as load_safetensors

import solvers
from tests.service.helpers import NPY_HEADERS, npy_bytes


def rows(directions, n=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, len(directions)))
    for row in codes:
        row[rng.choice(len(directions), k, replace=False)] = rng.uniform(0.5, 2, k)
    noise = 0.05 * rng.standard_normal((n, directions.shape[1]))
    return (codes @ directions + noise).astype(np.float32)


def expected(directions, x, **params):
    prepared = solvers.prepare(directions)
    return solvers.certify(solvers.unfold(x, prepared, **params), prepared)


def test_json_answer_carries_the_certificates_of_solvers_certify(client, toy):
    directions, _ = toy
    x = rows(directions)
    x[5] = 0  # an empty support: stability is null, the empty support certified
    body = client.post(
        "/v1/dictionaries/toy/unfold", json={"activations": x.tolist(), "k": 4, "certify": True}
    ).json()
    reference = expected(directions, x, k=4)
    assert body["certified"] == reference.certified.tolist()
    np.testing.assert_allclose(body["erc"], reference.erc, rtol=1e-5)
    np.testing.assert_allclose(body["erc_margin"], 1 - reference.erc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["support_stability"][:5], reference.support_stability[:5])
    assert body["support_stability"][5] is None and body["certified"][5] is True
    plain = client.post("/v1/dictionaries/toy/unfold", json={"activations": x.tolist()}).json()
    assert "certified" not in plain and "erc" not in plain


def test_lasso_answers_are_certified_too(client, toy):
    directions, _ = toy
    x = rows(directions, seed=1)
    body = client.post(
        "/v1/dictionaries/toy/unfold",
        json={"activations": x.tolist(), "method": "lasso", "alpha": 0.05, "certify": True},
    ).json()
    reference = expected(directions, x, method="lasso", alpha=0.05)
    np.testing.assert_allclose(body["erc"], reference.erc, rtol=1e-4)
    assert all(gap is not None for gap in body["duality_gap"])


def test_npy_request_with_certify_in_the_query_and_a_safetensors_answer(client, toy):
    directions, _ = toy
    x = rows(directions, seed=2)
    response = client.post(
        "/v1/dictionaries/toy/unfold?k=3&certify=true",
        content=npy_bytes(x),
        headers={**NPY_HEADERS, "Accept": "application/vnd.safetensors"},
    )
    assert response.status_code == 200, response.text
    tensors = load_safetensors(response.content)
    reference = expected(directions, x, k=3)
    assert tensors["certified"].dtype == np.bool_
    np.testing.assert_array_equal(tensors["certified"], reference.certified)
    np.testing.assert_allclose(tensors["erc"], reference.erc, rtol=1e-5)
    bad = client.post(
        "/v1/dictionaries/toy/unfold?certify=yes", content=npy_bytes(x), headers=NPY_HEADERS
    )
    assert bad.status_code == 422 and "certify" in bad.text


def test_open_inference_protocol_outputs_certificates_when_asked(client, toy):
    directions, _ = toy
    x = rows(directions, seed=3)
    request = {
        "inputs": [{"name": "activations", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.ravel().tolist()}],
        "parameters": {"k": 3, "certify": True},
    }  # fmt: skip
    response = client.post("/v2/models/toy/infer", content=orjson.dumps(request))
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    reference = expected(directions, x, k=3)
    assert outputs["certified"]["datatype"] == "BOOL"
    assert outputs["certified"]["data"] == reference.certified.tolist()
    np.testing.assert_allclose(outputs["erc"]["data"], reference.erc, rtol=1e-5)
    # Asked by name without `certify`: a clear 4xx.
    del request["parameters"]["certify"]
    request["outputs"] = [{"name": "erc"}]
    refused = client.post("/v2/models/toy/infer", content=orjson.dumps(request))
    assert refused.status_code == 400 and "certify" in refused.json()["error"]
    metadata = client.get("/v2/models/toy").json()
    assert "support_stability" in [output["name"] for output in metadata["outputs"]]
