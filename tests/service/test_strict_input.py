"""Strict input and limits before work (issue 18): non-real dtypes, coerced types, repeated
parameters, names, metadata, the manifest's digest, row and size limits applied before the
data is read, parsing off the event loop, `Allow` on 405, and `/docs` without a CDN.

Each refusal is checked for its documented status and error code, and the service is checked
healthy after it (`/healthz`, the list of dictionaries, a correct unfold)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service import oip, parsing, unfolding
from service.demo import demo_dictionary
from service.registry import MAX_LABEL_CHARS, MAX_METADATA_BYTES, MAX_METADATA_DEPTH
from service.store import ARRAYS, MANIFEST, DictionaryRecord, DictionaryStore, content_id
from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes

SAELENS = Path(__file__).parent / "data" / "saelens" / "standard"
UNFOLD = "/v1/dictionaries/demo/unfold"
INFER = "/v2/models/demo/infer"
ROW = demo_dictionary()[0][3].tolist()  # feature 3 of the demo dictionary (32 x 16)
DIRECTIONS = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)


@pytest.fixture
def client(tmp_path):
    with running_client(tmp_path, warmup=False) as client:
        yield client


def assert_healthy(client) -> None:
    assert client.get("/healthz").status_code == 200
    listing = client.get("/v1/dictionaries")
    assert listing.status_code == 200, listing.text
    assert "demo" in {entry["name"] for entry in listing.json()["dictionaries"]}
    ok = client.post(UNFOLD, json={"activations": ROW, "k": 2})
    assert ok.status_code == 200, ok.text
    assert ok.json()["codes"][0]["indices"] == [3]


def assert_refused(client, response, status: int, code: str | None, *, says: str = "") -> None:
    """`response` is a `status` with error `code` (v1) or the protocol's `{"error": "..."}`
    (code None), whose message contains `says`; then the service is healthy."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error if code is None else error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert isinstance(message, str) and says in message, message
    assert_healthy(client)


def oip_body(data, shape=(1, 16), parameters=None) -> dict:
    body = {"inputs": [{"name": "activations", "shape": list(shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = data
    if parameters is not None:
        body["parameters"] = parameters
    return body


# Non-real dtypes.


@pytest.mark.parametrize(
    "array",
    [
        np.array([ROW], np.complex64) * (1 + 1j),
        np.array([ROW], np.complex128),
        np.ones((1, 16), bool),
        np.array([["1"] * 16]),
        np.zeros(1, dtype=[("a", "<f4", (16,))]),
        np.zeros((1, 16), "datetime64[s]"),
    ],
    ids=["complex64", "complex128", "bool", "str", "record", "datetime"],
)
def test_non_real_npy_activations_are_refused(client, array):
    response = client.post(UNFOLD, content=npy_bytes(array), headers=NPY_HEADERS)
    assert_refused(client, response, 422, "invalid_npy", says="not a real number type")


def test_complex_npy_registration_is_refused(client):
    response = client.post(
        "/v1/dictionaries?name=cplx",
        content=npy_bytes(DIRECTIONS.astype(np.complex64) * 1j),
        headers=NPY_HEADERS,
    )
    assert_refused(client, response, 422, "invalid_npy", says="complex")


def test_integer_and_float64_npy_activations_are_still_converted(client):
    for dtype in (np.float64, np.float16, np.int32):
        response = client.post(
            UNFOLD + "?k=2",
            content=npy_bytes(
                np.array([ROW], dtype) if dtype != np.int32 else np.eye(16, dtype=dtype)[:1]
            ),
            headers=NPY_HEADERS,
        )
        assert response.status_code == 200, (dtype, response.text)


# No coercion: numbers are JSON numbers, booleans are JSON booleans.


@pytest.mark.parametrize(
    "params",
    [{"k": True}, {"k": "8"}, {"k": 8.5}, {"positive": "yes"}, {"positive": 1},
     {"method": "lasso", "alpha": "0.1"}, {"method": "lasso", "alpha": True}, {"top": "1"}],
)  # fmt: skip
def test_json_parameters_are_not_coerced(client, params):
    response = client.post(UNFOLD, json={"activations": ROW, **params})
    assert_refused(client, response, 422, "invalid_request")


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], {"x": 1}])
def test_json_activations_hold_numbers_only(client, value):
    row = [*ROW[:5], value, *ROW[6:]]
    response = client.post(UNFOLD, json={"activations": [ROW, row]})
    assert_refused(client, response, 422, "invalid_request", says="activations.1.5")


def test_integer_activations_and_parameters_are_numbers(client):
    response = client.post(
        UNFOLD, json={"activations": [int(v) for v in np.eye(16)[3]], "method": "lasso", "alpha": 0}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "query", ["k=true", "k=%228%22", "k=8.5", "positive=yes", "positive=1", "method=8", "alpha=inf"]
)
def test_query_parameters_are_read_as_json_scalars(client, query):
    body = npy_bytes(np.array([ROW], np.float32))
    response = client.post(f"{UNFOLD}?{query}", content=body, headers=NPY_HEADERS)
    assert_refused(client, response, 422, "invalid_request")


def test_query_numbers_and_booleans_are_accepted(client):
    body = npy_bytes(np.array([ROW], np.float32))
    for query in ("k=2", "k=2&positive=true", "k=null&tol=0.001", "method=lasso&alpha=1e-3"):
        response = client.post(f"{UNFOLD}?{query}", content=body, headers=NPY_HEADERS)
        assert response.status_code == 200, (query, response.text)


@pytest.mark.parametrize(
    "path", [f"{UNFOLD}?k=8&k=9", f"{UNFOLD}?k=8&method=omp&k=8", "/v1/dictionaries?name=a&name=b"]
)
def test_repeated_query_parameters_are_refused(client, path):
    body = npy_bytes(np.array([ROW], np.float32) if "unfold" in path else DIRECTIONS)
    response = client.post(path, content=body, headers=NPY_HEADERS)
    assert_refused(client, response, 422, "invalid_request", says="more than once")


def test_unknown_registration_query_parameters_are_refused(client):
    response = client.post(
        "/v1/dictionaries?name=x&tensor=W_dec", content=npy_bytes(DIRECTIONS), headers=NPY_HEADERS
    )
    assert_refused(client, response, 422, "invalid_request", says="tensor")


def test_oip_data_and_parameters_are_not_coerced(client):
    for body in (
        oip_body([True] * 16),
        oip_body([str(v) for v in ROW]),
        oip_body([None] * 16),
        oip_body(ROW, parameters={"k": True}),
        oip_body(ROW, parameters={"k": "2"}),
        oip_body(ROW, parameters={"method": "lasso", "alpha": "0.1"}),
    ):
        assert_refused(client, client.post(INFER, json=body), 400, None)


def test_the_openapi_oip_example_fits_the_demo_dictionary(client):
    operation = client.get("/openapi.json").json()["paths"]["/v2/models/{model}/infer"]["post"]
    example = operation["requestBody"]["content"]["application/json"]["example"]
    assert example["inputs"][0]["shape"] == [1, 16]
    response = client.post(INFER, json=example)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    codes = dict(zip(outputs["indices"], outputs["values"], strict=True))
    assert codes == pytest.approx({0: 0.6, 1: 0.8})


# Names, labels, metadata.


@pytest.mark.parametrize("name", ["nl\n", "a\nb", "ok\r", " lead", "trail ", "a" * 129, ""])
def test_names_are_anchored(client, name):
    json_response = client.post(
        "/v1/dictionaries", json={"name": name, "directions": DIRECTIONS.tolist()}
    )
    code = "invalid_request" if name == "" else "invalid_name"
    if name:  # an empty name is 'give the dictionary a name' on the binary route
        assert_refused(client, json_response, 422, code)
    npy_response = client.post(
        "/v1/dictionaries",
        params={"name": name},
        content=npy_bytes(DIRECTIONS),
        headers=NPY_HEADERS,
    )
    assert_refused(client, npy_response, 422, code)


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "metadata",
    [nested(MAX_METADATA_DEPTH + 1), nested(260), {"list": [[[[[[[[[1]]]]]]]]]},
     {"big": "x" * MAX_METADATA_BYTES}],
    ids=["depth-9", "depth-260", "lists", "size"],
)  # fmt: skip
def test_metadata_is_limited_at_registration(client, metadata):
    body = {"name": "meta", "directions": DIRECTIONS.tolist(), "metadata": metadata}
    assert_refused(client, client.post("/v1/dictionaries", json=body), 422, "invalid_metadata")
    assert client.get("/v1/dictionaries/meta").status_code == 404


def test_metadata_at_the_limits_is_stored_and_listed(client):
    metadata = {**nested(MAX_METADATA_DEPTH), "text": "y" * (MAX_METADATA_BYTES // 2)}
    body = {"name": "meta", "directions": DIRECTIONS.tolist(), "metadata": metadata}
    assert client.post("/v1/dictionaries", json=body).status_code == 201
    listed = {e["name"]: e for e in client.get("/v1/dictionaries").json()["dictionaries"]}
    assert listed["meta"]["metadata"] == metadata


def test_labels_are_strings_of_limited_length(client):
    labels = ["a"] * 5 + ["b" * (MAX_LABEL_CHARS + 1)]
    body = {"name": "lab", "directions": DIRECTIONS.tolist(), "labels": labels}
    assert_refused(client, client.post("/v1/dictionaries", json=body), 422, "invalid_labels")
    body["labels"] = [1, 2, 3, 4, 5, 6]
    assert_refused(client, client.post("/v1/dictionaries", json=body), 422, "invalid_request")


def saelens_parts(cfg: bytes | None = None) -> dict:
    return {
        "file": ("sae_weights.safetensors", (SAELENS / "sae_weights.safetensors").read_bytes()),
        "cfg": ("cfg.json", cfg or (SAELENS / "cfg.json").read_bytes()),
    }


def saelens_cfg(**changes) -> str:
    return json.dumps({**json.loads((SAELENS / "cfg.json").read_text()), **changes})


def test_saelens_cfg_as_a_text_field_is_checked_like_the_file(client):
    weights = {"file": saelens_parts()["file"]}
    wrong = client.post(
        "/v1/dictionaries", data={"name": "sae", "cfg": saelens_cfg(d_in=9)}, files=weights
    )
    assert_refused(client, wrong, 422, "invalid_sae", says="d_in=9")
    as_text = client.post(
        "/v1/dictionaries", data={"name": "sae", "cfg": saelens_cfg()}, files=weights
    )
    assert as_text.status_code == 201, as_text.text
    as_file = client.post("/v1/dictionaries", data={"name": "sae"}, files=saelens_parts())
    assert as_file.status_code == 200  # the same registration: same content, name and metadata
    assert as_file.json()["metadata"] == as_text.json()["metadata"]
    assert as_text.json()["metadata"]["source"] == "saelens"


def test_multipart_fields_are_known_single_and_of_their_kind(client):
    parts = saelens_parts()
    for data, files, says in (
        ({"name": "s", "config": "{}"}, parts, "unknown"),
        ({"name": ["s", "t"]}, parts, "more than once"),
        ({}, {**parts, "name": ("name.txt", b"s")}, "text field"),
    ):
        response = client.post("/v1/dictionaries", data=data, files=files)
        assert_refused(client, response, 422, "invalid_request", says=says)


def test_saelens_metadata_that_cannot_render_is_refused(client):
    cfg = saelens_cfg(metadata={"model_name": "gpt2", "context_size": 10**30})
    response = client.post(
        "/v1/dictionaries", data={"name": "big-int"}, files=saelens_parts(cfg.encode())
    )
    assert_refused(client, response, 422, "invalid_metadata", says="cannot be rendered")


# The stored manifest: covered by a digest; one that cannot render does not break the list.


def stored_folder(tmp_path, dictionary_id: str) -> Path:
    return tmp_path / "dictionaries" / dictionary_id


def test_a_tampered_manifest_is_skipped(tmp_path, caplog):
    with running_client(tmp_path, warmup=False) as client:
        info = client.post(
            "/v1/dictionaries", json={"name": "good", "directions": DIRECTIONS.tolist()}
        ).json()
    manifest = stored_folder(tmp_path, info["id"]) / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "demo"}))
    with caplog.at_level(logging.ERROR), running_client(tmp_path, warmup=False) as client:
        names = [e["name"] for e in client.get("/v1/dictionaries").json()["dictionaries"]]
        assert names == ["demo", "toy-model"]  # one demo of each (seeded on an empty store)
        assert_healthy(client)
    assert any("does not match the digest" in record.getMessage() for record in caplog.records)


def strip_digest(path: Path) -> None:
    """Rewrite a stored arrays file as it was written before manifests had a digest."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    assert header.pop("__metadata__")["manifest_sha256"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


def test_a_store_written_before_manifest_digests_still_loads(tmp_path, caplog):
    with running_client(tmp_path, warmup=False) as client:
        info = client.post(
            "/v1/dictionaries", json={"name": "old", "directions": DIRECTIONS.tolist()}
        ).json()
    strip_digest(stored_folder(tmp_path, info["id"]) / ARRAYS)
    with caplog.at_level(logging.WARNING), running_client(tmp_path, warmup=False) as client:
        again = client.get("/v1/dictionaries/old")
        assert again.status_code == 200 and again.json()["id"] == info["id"]
    assert any("predates manifest digests" in record.getMessage() for record in caplog.records)


def test_the_id_is_still_the_content_hash(client):
    body = {"name": "same", "directions": DIRECTIONS.tolist()}
    info = client.post("/v1/dictionaries", json=body).json()
    assert info["id"] == content_id(DIRECTIONS, None)


def test_a_stored_manifest_that_cannot_render_does_not_break_the_list(tmp_path, caplog):
    store = DictionaryStore(tmp_path)  # written as a store before metadata was limited
    for name, metadata in (("deep", nested(300)), ("fine", {"ok": 1})):
        directions = DIRECTIONS * (2 if name == "deep" else 1)
        record = DictionaryRecord(
            content_id(directions, None), name, directions, None, metadata=metadata
        )
        store.save(record)
    with caplog.at_level(logging.ERROR), running_client(tmp_path, warmup=False) as client:
        listing = client.get("/v1/dictionaries")
        assert listing.status_code == 200
        assert [e["name"] for e in listing.json()["dictionaries"]] == ["fine"]
        assert client.delete("/v1/dictionaries/deep").status_code == 204
    assert any("cannot be rendered" in record.getMessage() for record in caplog.records)


# Limits before work.


def test_too_many_json_rows_are_refused_before_the_rows_are_read(tmp_path):
    with running_client(tmp_path, warmup=False, max_rows=4) as client:
        # Row 5 is not even numbers: the row count is refused first, nothing is converted.
        body = {"activations": [ROW] * 4 + [["x"] * 16]}
        assert_refused(client, client.post(UNFOLD, json=body), 422, "too_many_rows")
        assert client.post(UNFOLD, json={"activations": [ROW] * 4}).status_code == 200


def npy_with_header(shape: tuple[int, ...], payload: bytes, dtype: str = "<f4") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def test_npy_rows_and_sizes_are_checked_from_the_header(tmp_path):
    with running_client(tmp_path, warmup=False, max_rows=4) as client:
        five = npy_with_header((5, 16), np.zeros((5, 16), np.float32).tobytes())
        response = client.post(UNFOLD, content=five, headers=NPY_HEADERS)
        assert_refused(client, response, 422, "too_many_rows", says="5 rows")
        lying = npy_with_header((10**9, 16), b"\0" * 64)
        response = client.post(UNFOLD, content=lying, headers=NPY_HEADERS)
        assert_refused(client, response, 422, "invalid_npy", says="bytes follow")
        trailing = npy_bytes(np.array([ROW], np.float32)) + b"\0" * 4
        response = client.post(UNFOLD, content=trailing, headers=NPY_HEADERS)
        assert_refused(client, response, 422, "invalid_npy")


def test_oip_rows_are_checked_from_the_declared_shape(tmp_path):
    with running_client(tmp_path, warmup=False, max_rows=4) as client:
        body = oip_body(["not", "read"], shape=(5, 16))
        assert_refused(client, client.post(INFER, json=body), 400, None, says="5 rows")


def gzip_of(size: int) -> bytes:
    return gzip.compress(b"0" * size, compresslevel=9)


def test_decompressed_bodies_are_capped(tmp_path):
    with running_client(tmp_path, warmup=False, max_body_bytes=1 << 20) as client:
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        bomb = client.post(INFER, content=gzip_of(8 << 20), headers=headers)
        assert_refused(client, bomb, 413, None, says="expands beyond the limit of 1048576")
        truncated = gzip.compress(json.dumps(oip_body(ROW)).encode())[:-12]
        assert_refused(client, client.post(INFER, content=truncated, headers=headers), 400, None)
        fine = client.post(
            INFER, content=gzip.compress(json.dumps(oip_body(ROW)).encode()), headers=headers
        )
        assert fine.status_code == 200, fine.text


def test_oip_decompression_never_allocates_past_the_limit(monkeypatch):
    limit = 1000
    with pytest.raises(Exception, match="expands beyond"):
        oip.decompress(gzip_of(10**7), "gzip", limit)
    assert oip.decompress(gzip_of(limit), "gzip", limit) == b"0" * limit


def blocking(monkeypatch, module, name: str):
    """Patch `module.name` to wait, once called, until `release` is set: (entered, release,
    threads it ran on)."""
    original = getattr(module, name)
    entered, release, threads = threading.Event(), threading.Event(), []

    def wrapper(*args, **kwargs):
        threads.append(threading.get_ident())
        entered.set()
        assert release.wait(30), "the request was not released"
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return entered, release, threads


def blocking_child_parse(monkeypatch):
    """Patch `JsonParser.run` to wait, once called, until `release` is set, then parse in the
    child: (entered, release, names of the functions sent to the child)."""
    original = parsing.JsonParser.run
    entered, release, functions = threading.Event(), threading.Event(), []

    async def wrapper(self, function, *args):
        functions.append(function.__name__)
        entered.set()
        assert await asyncio.to_thread(release.wait, 30), "the request was not released"
        return await original(self, function, *args)

    monkeypatch.setattr(parsing.JsonParser, "run", wrapper)
    return entered, release, functions


@pytest.mark.parametrize("route", ["json", "npy", "oip-gzip"])
def test_large_bodies_are_parsed_while_the_event_loop_serves_others(client, monkeypatch, route):
    """A large body is parsed off the event loop (JSON in the child process, `.npy` and the
    expansion of compressed bodies on a worker thread): while its parse is held, /healthz is
    answered (were the parse on the event loop, /healthz would wait for it, and the parse for
    /healthz: the release below would never come)."""
    rows = parsing.OFFLOAD_BYTES // (16 * 4) + 1  # past the offload size in any format
    activations = np.tile(np.array(ROW, np.float32), (rows, 1))
    if route == "json":
        entered, release, threads = blocking_child_parse(monkeypatch)
        kwargs = {"json": {"activations": activations.tolist(), "k": 2}}
        path = UNFOLD
    elif route == "npy":
        entered, release, threads = blocking(monkeypatch, unfolding, "read_npy")
        kwargs = {"content": npy_bytes(activations), "headers": NPY_HEADERS, "params": {"k": 2}}
        path = UNFOLD
    else:
        entered, release, threads = blocking(monkeypatch, oip, "decompress")
        body = json.dumps(oip_body(activations.ravel().tolist(), shape=activations.shape))
        kwargs = {
            "content": gzip.compress(body.encode(), compresslevel=1),
            "headers": {"content-type": "application/json", "content-encoding": "gzip"},
        }
        path = INFER
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, path, **kwargs)
        assert entered.wait(60), "the parse did not start"
        health = client.get("/healthz")  # answered while the parse is held
        release.set()
        response = pending.result(timeout=120)
    assert health.status_code == 200
    assert response.status_code == 200, response.text[:500]
    if route == "json":
        assert threads == ["_json_request"]
    else:
        assert threads and threads[0] != threading.get_ident()
    assert_healthy(client)


def test_small_bodies_stay_on_the_event_loop(client, monkeypatch):
    threads = []
    original = unfolding.activations_array

    def recording(*args):
        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(unfolding, "activations_array", recording)
    assert client.post(UNFOLD, json={"activations": ROW}).status_code == 200
    assert len(threads) == 1 and not threads[0].startswith("AnyIO worker thread")


# Conformance: 405 with every allowed method, codes, schema, offline docs.


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/dictionaries", "GET, POST"),
        ("PATCH", "/v1/dictionaries/demo", "DELETE, GET"),
        ("GET", UNFOLD, "POST"),
        ("POST", "/healthz", "GET"),
        ("PUT", INFER, "POST"),
        ("DELETE", "/v2/models/demo", "GET"),
        ("OPTIONS", "/v2/models/demo/versions/abc/infer", "POST"),
        ("POST", "/v2/health/live", "GET"),
    ],
)
def test_wrong_methods_are_405_with_every_allowed_method(client, method, path, allow):
    response = client.request(method, path)
    code = None if path.startswith("/v2") else "method_not_allowed"
    assert_refused(client, response, 405, code, says=allow)
    assert response.headers["allow"] == allow


def test_unknown_oip_paths_are_still_404(client):
    response = client.put("/v2/repository/index")
    assert_refused(client, response, 404, None, says="no route")


def test_a_malformed_multipart_body_is_a_422(client):
    response = client.post(
        "/v1/dictionaries",
        content=b"--x\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--x--\r\n",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code in (422,), response.text
    assert response.json()["error"]["code"] in ("invalid_multipart", "invalid_request")
    assert_healthy(client)


def test_the_schema_says_min_items_where_the_server_refuses_empty_arrays(client):
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    register = document["paths"]["/v1/dictionaries"]["post"]["requestBody"]["content"]
    directions = register["application/json"]["schema"]["properties"]["directions"]
    assert directions["minItems"] == 1 and directions["items"]["minItems"] == 1
    activations = schemas["OMPRequest"]["properties"]["activations"]["anyOf"]
    assert [variant["minItems"] for variant in activations] == [1, 1]
    for body in ({"activations": []}, {"activations": [[]]}):
        assert client.post(UNFOLD, json=body).status_code == 422


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_this_server(client, page):
    html = client.get(page)
    assert html.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html.text)
    urls += re.findall(r"""url:\s*["']([^"']+)""", html.text)
    assert urls and not re.search(r"https?://", html.text), urls
    for url in urls:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url
