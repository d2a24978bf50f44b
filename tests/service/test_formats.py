"""Binary transports and dictionary formats: .npy, safetensors, SAELens folders."""

from __future__ import annotations

import io
import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from service.store import content_id
from tests.service.helpers import NPY_HEADERS, from_npy, npy_bytes


def sae_files(d_sae=48, d_in=12, seed=0, cfg_overrides=None):
    rng = np.random.default_rng(seed)
    tensors = {
        "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32) * 0.3,
        "b_dec": rng.standard_normal(d_in).astype(np.float32),
        "W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
    }
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_pre"},
        **(cfg_overrides or {}),
    }
    return tensors, cfg


def register_sae(client, name, tensors, cfg):
    """POST a SAELens folder (weights and cfg.json) as multipart under `name`."""
    return client.post(
        "/v1/dictionaries",
        data={"name": name},
        files={
            "file": ("sae_weights.safetensors", save_safetensors(tensors)),
            "cfg": ("cfg.json", json.dumps(cfg).encode()),
        },
    )


def test_register_from_npy(client):
    directions = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    response = client.post(
        "/v1/dictionaries?name=from-npy", content=npy_bytes(directions), headers=NPY_HEADERS
    )
    assert response.status_code == 201, response.text
    assert response.json()["id"] == content_id(directions, None)
    assert (response.json()["n_features"], response.json()["d_model"]) == (30, 8)


def test_pickled_npy_is_refused(client):
    buffer = io.BytesIO()
    np.save(buffer, np.array([[object()]], dtype=object), allow_pickle=True)
    response = client.post(
        "/v1/dictionaries?name=evil", content=buffer.getvalue(), headers=NPY_HEADERS
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_npy"
    raw_pickle = client.post(
        "/v1/dictionaries?name=evil", content=pickle.dumps([[1.0]]), headers=NPY_HEADERS
    )
    assert raw_pickle.status_code == 422 and raw_pickle.json()["error"]["code"] == "invalid_npy"


def test_register_saelens_folder_and_unfold_with_bias(client):
    tensors, cfg = sae_files()
    response = register_sae(client, "gpt2-l0", tensors, cfg)
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"] == content_id(tensors["W_dec"], tensors["b_dec"]) and info["has_bias"]
    assert info["metadata"]["hook_name"] == "blocks.0.hook_resid_pre"
    assert info["metadata"]["source"] == "saelens"
    codes = np.zeros(48, np.float32)
    codes[[3, 30]] = [1.5, 0.8]
    activation = codes @ tensors["W_dec"] + tensors["b_dec"]
    body = client.post(
        "/v1/dictionaries/gpt2-l0/unfold", json={"activations": activation.tolist(), "k": 2}
    ).json()
    assert sorted(body["codes"][0]["indices"]) == [3, 30]
    assert body["residual_norm"][0] < 1e-4


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"normalize_activations": "expected_average_only_in"}, "unsupported_sae"),
        ({"d_in": 13}, "invalid_sae"),
        ({"d_sae": 1}, "invalid_sae"),
    ],
)
def test_saelens_configurations_we_cannot_honour(client, overrides, code):
    tensors, cfg = sae_files(cfg_overrides=overrides)
    response = register_sae(client, "sae", tensors, cfg)
    assert response.status_code == 422 and response.json()["error"]["code"] == code


def test_safetensors_with_named_tensor(client):
    directions = np.eye(5, dtype=np.float32)
    file = save_safetensors({"decoder": directions, "other": directions * 2})
    ambiguous = client.post("/v1/dictionaries", data={"name": "st"}, files={"file": ("a", file)})
    assert ambiguous.status_code == 422 and "tensor" in ambiguous.json()["error"]["message"]
    named = client.post(
        "/v1/dictionaries", data={"name": "st", "tensor": "decoder"}, files={"file": ("a", file)}
    )
    assert named.status_code == 201 and named.json()["n_features"] == 5
    missing = client.post(
        "/v1/dictionaries", data={"name": "st2", "tensor": "nope"}, files={"file": ("a", file)}
    )
    assert missing.status_code == 422


def test_truncated_and_oversize_safetensors_headers(client):
    good = save_safetensors({"W_dec": np.eye(4, dtype=np.float32)})
    truncated = good[: len(good) // 2]
    oversize = struct.pack("<Q", 1 << 40) + good[8:]
    garbage_header = struct.pack("<Q", 4) + b"{{{{" + b"\0" * 16
    for body in (truncated, oversize, garbage_header, b"abc"):
        response = client.post(
            "/v1/dictionaries", data={"name": "bad"}, files={"file": ("w.safetensors", body)}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_safetensors"


def test_multipart_without_file_or_name(client):
    response = client.post("/v1/dictionaries", data={"name": "x"}, files={"other": ("a", b"1")})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_unsupported_content_type(client):
    response = client.post("/v1/dictionaries", content=b"a,b", headers={"content-type": "text/csv"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.fixture
def demo_batch():
    from service.demo import demo_dictionary

    directions, labels = demo_dictionary()
    codes = np.zeros((4, 32), np.float32)
    codes[0, [1, 20]] = [2.0, -1.0]
    codes[1, [5]] = [0.5]
    codes[2, [16, 31]] = [1.0, 1.5]
    codes[3, [7, 9]] = [-0.7, 1.1]
    return directions, labels, codes, codes @ directions


@pytest.mark.parametrize(
    ("query", "atol"),
    [
        ("method=omp&k=2", 1e-5),
        ("k=null&tol=0.001", 1e-4),  # null means the default: k = d_model, stopped by tol
    ],
)
def test_npy_in_npy_out(client, demo_batch, query, atol):
    _, _, codes, activations = demo_batch
    response = client.post(
        f"/v1/dictionaries/demo/unfold?{query}",
        content=npy_bytes(activations),
        headers={**NPY_HEADERS, "accept": "application/x-npy"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    dense = from_npy(response.content)
    assert dense.shape == (4, 32) and dense.dtype == np.float32
    np.testing.assert_allclose(dense, codes, atol=atol)


def test_safetensors_out(client, demo_batch):
    _, _, codes, activations = demo_batch
    response = client.post(
        "/v1/dictionaries/demo/unfold",
        json={"activations": activations.tolist(), "k": 2},
        headers={"accept": "application/vnd.safetensors"},
    )
    tensors = load_safetensors(response.content)
    assert tensors["indices"].shape == (4, 2) and tensors["values"].shape == (4, 2)
    assert set(tensors) >= {"residual_norm", "relative_error", "l0", "n_iter", "status"}
    dense = np.zeros_like(codes)
    for row, idx, val in zip(dense, tensors["indices"], tensors["values"], strict=True):
        row[idx[idx >= 0]] = val[idx >= 0]
    np.testing.assert_allclose(dense, codes, atol=1e-5)
    np.testing.assert_array_equal(tensors["l0"], [2, 1, 2, 2])


def test_dense_json_output_labels_and_top(client, demo_batch):
    _, labels, codes, activations = demo_batch
    dense = client.post(
        "/v1/dictionaries/demo/unfold",
        json={"activations": activations.tolist(), "k": 2, "output": "dense"},
    ).json()
    np.testing.assert_allclose(dense["dense"], codes, atol=1e-5)
    assert "codes" not in dense or dense["codes"] is None
    top = client.post(
        "/v1/dictionaries/demo/unfold",
        json={"activations": activations[:1].tolist(), "k": 2, "top": 1},
    ).json()
    assert top["codes"][0]["indices"] == [1] and top["codes"][0]["labels"] == [labels[1]]
    assert top["l0"] == [2]


def test_npy_bad_inputs(client):
    cases = [
        (b"not npy", {}, "invalid_npy"),
        (npy_bytes(np.zeros((2, 15), np.float32)), {}, "shape_mismatch"),
        (npy_bytes(np.zeros((0, 16), np.float32)), {}, "empty"),
        (npy_bytes(np.zeros((1, 16), np.float32)), {"k": "0"}, "invalid_request"),
        (npy_bytes(np.zeros((1, 16), np.float32)), {"k": "99"}, "invalid_parameter"),
        (npy_bytes(np.zeros((1, 16), np.float32)), {"bogus": "1"}, "invalid_request"),
        (npy_bytes(np.array([["a"] * 16])), {}, "invalid_npy"),
    ]
    for body, query, code in cases:
        response = client.post(
            "/v1/dictionaries/demo/unfold", params=query, content=body, headers=NPY_HEADERS
        )
        assert response.status_code == 422, (query, response.text)
        assert response.json()["error"]["code"] == code, (query, response.json())


def test_openapi_documents_every_route_and_body(client):
    spec = client.get("/openapi.json").json()
    unfold = spec["paths"]["/v1/dictionaries/{ref}/unfold"]["post"]
    assert set(unfold["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    register = spec["paths"]["/v1/dictionaries"]["post"]["requestBody"]["content"]
    assert set(register) == {
        "application/json",
        "application/x-npy",
        "application/vnd.safetensors",
        "multipart/form-data",
    }
    assert {"OMPRequest", "LassoRequest"} <= set(spec["components"]["schemas"])
    assert {"name", "directions"} <= set(register["application/json"]["schema"]["properties"])


def test_npy_garbage_is_not_called_pickle(client):
    garbage = client.post("/v1/dictionaries/demo/unfold", content=b"xyz", headers=NPY_HEADERS)
    assert garbage.status_code == 422
    assert "magic" in garbage.json()["error"]["message"]
