"""The Open Inference Protocol routes: the real, unmodified `tritonclient.http` against a real
`unfold serve` process, then protocol edge cases through TestClient."""

from __future__ import annotations

import contextlib
import gzip
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.conftest import running_client
from tests.service.helpers import free_port, serve


def toy_problem(batch: int = 6, seed: int = 0):
    """A 64 x 24 unit-norm dictionary and 3-sparse codes OMP(k=3) recovers exactly."""
    rng = np.random.default_rng(7)
    directions = rng.standard_normal((64, 24))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    directions = directions.astype(np.float32)
    rng = np.random.default_rng(seed)
    codes = np.zeros((batch, 64), np.float32)
    for row in codes:
        row[rng.choice(64, 3, replace=False)] = rng.uniform(0.5, 2, 3) * rng.choice([-1, 1], 3)
    return directions, codes, (codes @ directions).astype(np.float32)


@contextlib.contextmanager
def lean_server(data_dir):
    """`unfold serve` on a free port without the demo dictionary and the start-up warm-up
    (they would compete with the tests for the CPU); yields (httpx client, port)."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNFOLD_DEMO", "false")
        patch.setenv("UNFOLD_WARMUP", "false")
        with serve(str(data_dir), port) as http:
            patch.undo()
            yield http, port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `unfold serve` process for the module, with the toy dictionary registered:
    (tritonclient, dictionary id)."""
    directions, _, _ = toy_problem()
    with lean_server(tmp_path_factory.mktemp("oip")) as (http, port):
        created = http.post(
            "/v1/dictionaries", json={"name": "toy", "directions": directions.tolist()}
        )
        assert created.status_code == 201, created.text
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60.0)
        try:
            yield client, created.json()["id"]
        finally:
            client.close()


def activations_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("activations", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_and_server_metadata(server):
    client, _ = server
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "unfold" and "binary_tensor_data" in metadata["extensions"]


def test_model_ready_and_metadata(server):
    client, dictionary_id = server
    assert client.is_model_ready("toy")
    assert client.is_model_ready(dictionary_id)  # a model is a dictionary, by name or id
    assert client.is_model_ready("toy", model_version=dictionary_id)
    assert not client.is_model_ready("nope")
    metadata = client.get_model_metadata("toy")
    assert metadata["name"] == "toy" and metadata["versions"] == [dictionary_id]
    assert metadata["inputs"] == [{"name": "activations", "datatype": "FP32", "shape": [-1, 24]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["codes"] == ("FP32", [-1, 64])
    assert outputs["indices"] == ("INT32", [-1, -1]) and outputs["status"] == ("INT32", [-1])
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_model_metadata("toy", model_version="1")


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_recovers_ground_truth(server, binary_in, binary_out):
    client, dictionary_id = server
    _, codes, x = toy_problem()
    result = client.infer(
        "toy",
        [activations_input(x, binary_in)],
        outputs=[
            triton.InferRequestedOutput("codes", binary_data=binary_out),
            triton.InferRequestedOutput("indices", binary_data=binary_out),
            triton.InferRequestedOutput("l0", binary_data=binary_out),
            triton.InferRequestedOutput("duality_gap", binary_data=binary_out),
        ],
        parameters={"method": "omp", "k": 3},
        request_id="r1",
    )
    dense = result.as_numpy("codes")
    assert dense.dtype == np.float32 and dense.shape == (6, 64)
    np.testing.assert_allclose(dense, codes, atol=1e-4)
    indices = result.as_numpy("indices")
    assert indices.dtype == np.int32 and indices.shape == (6, 3)
    for row, truth in zip(indices, codes, strict=True):
        assert set(row.tolist()) == set(np.flatnonzero(truth).tolist())
    assert result.as_numpy("l0").tolist() == [3] * 6
    assert np.isnan(result.as_numpy("duality_gap")).all()  # OMP has none: NaN, null in JSON
    assert result.as_numpy("values") is None  # not requested
    response = result.get_response()
    assert response["model_name"] == "toy" and response["model_version"] == dictionary_id
    assert response["id"] == "r1"


def test_infer_without_outputs_returns_every_output_in_binary(server):
    client, _ = server
    _, codes, x = toy_problem(batch=2, seed=1)
    result = client.infer("toy", [activations_input(x, True)], parameters={"k": 3})
    for output in result.get_response()["outputs"]:
        assert "binary_data_size" in output["parameters"]  # tritonclient asked binary_data_output
    np.testing.assert_allclose(result.as_numpy("codes"), codes, atol=1e-4)
    assert result.as_numpy("residual_norm").max() < 1e-4
    assert result.as_numpy("status").dtype == np.int32
    assert np.isnan(result.as_numpy("duality_gap")).all()  # OMP has none


def test_infer_lasso_single_vector_versioned_and_compressed(server):
    client, dictionary_id = server
    _, codes, x = toy_problem(batch=1, seed=2)
    result = client.infer(
        "toy",
        [activations_input(x[0], True)],  # one vector, shape [d_model]
        model_version=dictionary_id,
        outputs=[
            triton.InferRequestedOutput("codes"),
            triton.InferRequestedOutput("duality_gap"),
        ],
        parameters={"method": "fista", "alpha": 1e-3},
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    dense = result.as_numpy("codes")
    assert dense.shape == (1, 64)
    np.testing.assert_allclose(dense[0], codes[0], atol=0.02)
    assert np.isfinite(result.as_numpy("duality_gap")).all()


def test_fp64_input_is_converted(server):
    client, _ = server
    _, codes, x = toy_problem(batch=2, seed=3)
    tensor = triton.InferInput("activations", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x.astype(np.float64))
    result = client.infer(
        "toy", [tensor], outputs=[triton.InferRequestedOutput("codes")], parameters={"k": 3}
    )
    np.testing.assert_allclose(result.as_numpy("codes"), codes, atol=1e-4)


def test_infer_errors_reach_tritonclient(server):
    client, _ = server
    x = np.zeros((2, 24), np.float32)
    with pytest.raises(InferenceServerException, match="no dictionary") as error:
        client.infer("nope", [activations_input(x, True)])
    assert error.value.status() == "404"
    with pytest.raises(InferenceServerException, match="needs") as error:
        client.infer("toy", [activations_input(np.zeros((2, 23), np.float32), True)])
    assert error.value.status() == "400"
    with pytest.raises(InferenceServerException, match="k") as error:
        client.infer("toy", [activations_input(x, False)], parameters={"k": 65})
    assert error.value.status() == "400"
    with pytest.raises(InferenceServerException, match="method") as error:
        client.infer("toy", [activations_input(x, True)], parameters={"method": "magic"})
    assert error.value.status() == "400"


# Protocol edge cases, in-process.


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    directions, _, _ = toy_problem()
    with running_client(tmp_path_factory.mktemp("oip-app"), warmup=False, demo=False) as client:
        created = client.post(
            "/v1/dictionaries", json={"name": "toy", "directions": directions.tolist()}
        )
        assert created.status_code == 201, created.text
        yield client


def infer_json(client, request: dict, model: str = "toy", **kwargs):
    return client.post(f"/v2/models/{model}/infer", content=orjson.dumps(request), **kwargs)


def binary_request(header: dict, payload: bytes, header_length: int | None = None) -> dict:
    head = orjson.dumps(header)
    length = len(head) if header_length is None else header_length
    return {"content": head + payload, "headers": {"Inference-Header-Content-Length": str(length)}}


def activations_tensor(shape, **fields) -> dict:
    return {"name": "activations", "shape": shape, "datatype": "FP32", **fields}


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_data_flat_or_nested(app_client, nested):
    _, codes, x = toy_problem(batch=3)
    data = x.tolist() if nested else x.ravel().tolist()
    response = infer_json(
        app_client,
        {
            "inputs": [activations_tensor([3, 24], data=data)],
            "outputs": [{"name": "codes"}, {"name": "status"}],
            "parameters": {"k": 3},
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert list(outputs) == ["codes", "status"] and outputs["codes"]["shape"] == [3, 64]
    np.testing.assert_allclose(np.reshape(outputs["codes"]["data"], (3, 64)), codes, atol=1e-4)


def test_binary_response_layout(app_client):
    _, codes, x = toy_problem(batch=2)
    header = {
        "inputs": [activations_tensor([2, 24], parameters={"binary_data_size": x.nbytes})],
        "outputs": [
            {"name": "l0", "parameters": {"binary_data": False}},  # overrides the request's
            {"name": "codes"},
            {"name": "values", "parameters": {"binary_data": True}},
        ],
        "parameters": {"k": 3, "binary_data_output": True},
    }
    response = app_client.post("/v2/models/toy/infer", **binary_request(header, x.tobytes()))
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    body = orjson.loads(response.content[:length])
    l0, dense, values = body["outputs"]
    assert l0["data"] == [3, 3] and "parameters" not in l0
    assert dense["parameters"] == {"binary_data_size": 2 * 64 * 4}
    assert values["parameters"] == {"binary_data_size": 2 * 3 * 4}
    binary = response.content[length:]
    assert len(binary) == 2 * 64 * 4 + 2 * 3 * 4
    np.testing.assert_allclose(
        np.frombuffer(binary[: 2 * 64 * 4], "<f4").reshape(2, 64), codes, atol=1e-4
    )


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
def test_compressed_request_body(app_client, encoding, compress):
    _, _, x = toy_problem(batch=1)
    body = orjson.dumps(
        {
            "inputs": [activations_tensor([1, 24], data=x.ravel().tolist())],
            "outputs": [{"name": "l0"}],
        }
    )
    response = app_client.post(
        "/v2/models/toy/infer", content=compress(body), headers={"Content-Encoding": encoding}
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [3]


def x_bytes(rows: int = 1) -> bytes:
    return np.zeros((rows, 24), np.float32).tobytes()


BINARY_INPUT = {"inputs": [activations_tensor([1, 24], parameters={"binary_data_size": 96})]}


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        (binary_request(BINARY_INPUT, x_bytes(), header_length=10_000), "Inference-Header"),
        (binary_request(BINARY_INPUT, x_bytes(), header_length=-3), "Inference-Header"),
        (binary_request(BINARY_INPUT, x_bytes()[:50]), "only 50 bytes"),
        (binary_request(BINARY_INPUT, x_bytes() + b"\0" * 8), "8 bytes of binary data follow"),
        (
            binary_request(
                {"inputs": [activations_tensor([2, 24], parameters={"binary_data_size": 96})]},
                x_bytes(),
            ),
            "needs 192",
        ),
        (
            binary_request(
                {
                    "inputs": [
                        activations_tensor([1, 24], parameters={"binary_data_size": 96}, data=[0])
                    ]
                },
                x_bytes(),
            ),
            "both",
        ),
        ({"content": orjson.dumps(BINARY_INPUT) + x_bytes()}, "Inference-Header-Content-Length"),
        ({"content": b"{not json"}, "not valid JSON"),
        ({"content": b"[1, 2]"}, "JSON object"),
        ({"content": orjson.dumps({"inputs": []})}, "needs `inputs`"),
        ({"content": orjson.dumps({})}, "needs `inputs`"),
        (
            {
                "content": orjson.dumps(
                    {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}
                )
            },
            "unknown input 'x'",
        ),
        (
            {
                "content": orjson.dumps(
                    {"inputs": [activations_tensor([1, 24], datatype="INT32", data=[0] * 24)]}
                )
            },
            "datatype 'INT32'; send FP32",
        ),
        (
            {
                "content": orjson.dumps(
                    {"inputs": [activations_tensor([1, 24], datatype="FP8", data=[0] * 24)]}
                )
            },
            "unknown datatype",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([1, 24], data=[0] * 23)]})},
            "holds 23 values",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([1, 24], data=["a"] * 24)]})},
            "must be numbers",
        ),
        ({"content": orjson.dumps({"inputs": [activations_tensor([1, 24])]})}, "neither"),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([1, 2, 12], data=[0] * 24)]})},
            "send [batch, d_model]",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([2, 12], data=[0] * 24)]})},
            "needs (batch, 24)",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([0, 24], data=[])]})},
            "empty",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor(["1", 24], data=[0] * 24)]})},
            "non-negative integers",
        ),
        (
            {"content": orjson.dumps({"inputs": [activations_tensor([1, 24], data=[0] * 24)] * 2})},
            "twice",
        ),
        (
            {
                "content": orjson.dumps(
                    {
                        "inputs": [activations_tensor([1, 24], data=[0] * 24)],
                        "outputs": [{"name": "labels"}],
                    }
                )
            },
            "unknown output 'labels'",
        ),
        (
            {
                "content": orjson.dumps(
                    {
                        "inputs": [activations_tensor([1, 24], data=[0] * 24)],
                        "parameters": {"output": "dense"},
                    }
                )
            },
            "outputs",
        ),
        (
            {
                "content": orjson.dumps(
                    {
                        "inputs": [activations_tensor([1, 24], data=[0] * 24)],
                        "parameters": {"k": 3, "colour": "blue"},
                    }
                )
            },
            "colour",
        ),
        (
            {"content": b"\x1f\x8b garbage", "headers": {"Content-Encoding": "gzip"}},
            "not valid gzip",
        ),
        ({"content": b"{}", "headers": {"Content-Encoding": "br"}}, "Content-Encoding"),
    ],
)
def test_bad_requests_get_400_with_protocol_error(app_client, request_kwargs, message):
    response = app_client.post("/v2/models/toy/infer", **request_kwargs)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert message in body["error"]


def test_non_finite_activations_refused(app_client):
    x = np.zeros((1, 24), np.float32)
    x[0, 3] = np.nan
    response = app_client.post(
        "/v2/models/toy/infer",
        **binary_request(
            {"inputs": [activations_tensor([1, 24], parameters={"binary_data_size": 96})]},
            x.tobytes(),
        ),
    )
    assert response.status_code == 400 and "NaN" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/models/nope", 404, "no dictionary"),
        ("GET", "/v2/models/nope/ready", 404, "no dictionary"),
        ("POST", "/v2/models/nope/infer", 404, "no dictionary"),
        ("GET", "/v2/models/toy/versions/7", 404, "no version '7'"),
        ("POST", "/v2/models/toy/versions/7/infer", 404, "no version '7'"),
        ("GET", "/v2/models/toy/config", 404, "no route"),
        ("POST", "/v2/repository/index", 404, "no route"),
    ],
)
def test_not_found_in_protocol_format(app_client, method, path, status, message):
    response = app_client.request(method, path, content=b"{}")
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and message in body["error"]


def test_health_bodies(app_client):
    assert app_client.get("/v2/health/live").json() == {"live": True}
    assert app_client.get("/v2/health/ready").json() == {"ready": True}
    assert app_client.get("/v2/models/toy/ready").json() == {"name": "toy", "ready": True}


def test_middleware_errors_use_the_protocol_format_under_v2(tmp_path):
    from tests.service.conftest import running_client

    with running_client(tmp_path, api_keys=["secret"], max_body_bytes=64) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        denied = client.get("/v2/models/demo")
        assert denied.status_code == 401 and isinstance(denied.json()["error"], str)
        assert client.get("/v1/dictionaries").json()["error"]["code"] == "unauthorized"
        big = client.post(
            "/v2/models/demo/infer", content=b"x" * 100, headers={"authorization": "Bearer secret"}
        )
        assert big.status_code == 413 and isinstance(big.json()["error"], str)
