"""API keys, enumerated: every operation of the live OpenAPI document but the health probes
answers 401 without a key and with a wrong one (not a hand-written list that a new route could
slip past)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes

KEY = "the-right-key"
PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
WRONG = [
    None,
    "Bearer wrong-key",
    f"Bearer {KEY}x",
    f"Bearer {KEY[:-1]}",
    f"Basic {KEY}",
    KEY,
    "Bearer ",
]
# Bodies that would succeed with the right key, so a 401 cannot come from a failed parse.
BODIES = {
    ("POST", "/v1/dictionaries"): {"json": {"name": "auth", "directions": [[1, 0], [0, 1]]}},
    ("POST", "/v1/dictionaries/{ref}/unfold"): {
        "content": npy_bytes(np.eye(16, dtype=np.float32)[:1]),
        "headers": NPY_HEADERS,
    },
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with running_client(tmp_path_factory.mktemp("auth"), warmup=False, api_keys=KEY) as client:
        yield client


def operations(client) -> list[tuple[str, str]]:
    document = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert document.status_code == 200
    found = [
        (method.upper(), path)
        for path, item in document.json()["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    ]
    assert len(found) >= 15, found  # the document really lists the API
    return found


def concrete(path: str) -> str:
    """The path with its parameters filled in: a dictionary that exists (demo)."""
    return re.sub(r"\{[^}]+\}", lambda m: "demo" if m.group(0) != "{version}" else "1", path)


def request_kwargs(method: str, path: str, authorization: str | None) -> dict:
    kwargs = {**BODIES.get((method, path), {})}
    headers = dict(kwargs.pop("headers", {}))
    if authorization is not None:
        headers["Authorization"] = authorization
    return {**kwargs, "headers": headers}


def test_every_operation_but_the_health_probes_needs_a_key(keyed):
    checked = []
    for method, path in operations(keyed):
        if path in PROBES:
            continue
        for authorization in WRONG:
            response = keyed.request(
                method, concrete(path), **request_kwargs(method, path, authorization)
            )
            assert response.status_code == 401, (method, path, authorization, response.text)
            assert response.headers.get("www-authenticate") == "Bearer", (method, path)
            body = response.json()
            # v1 and the other routes: {"error": {"code": ...}}; the OIP: {"error": "..."}.
            error = body["error"]
            assert error["code"] == "unauthorized" if isinstance(error, dict) else error
        checked.append((method, path))
    paths = {path for _, path in checked}
    assert {"/v1/dictionaries", "/v1/dictionaries/{ref}/unfold", "/metrics", "/v1/info"} <= paths
    assert any(path.startswith("/v2/models") for path in paths)


def test_the_documents_themselves_need_a_key(keyed):
    for path in ("/openapi.json", "/docs", "/redoc"):
        for authorization in WRONG:
            headers = {} if authorization is None else {"Authorization": authorization}
            response = keyed.get(path, headers=headers)
            assert response.status_code in (401, 404), (path, authorization)
            if path != "/redoc":
                assert response.status_code == 401, (path, authorization)


def test_health_probes_answer_without_a_key(keyed):
    for path in operations(keyed):
        if path[1] in PROBES:
            assert keyed.request(*path).status_code == 200, path
    for path in PROBES:
        assert keyed.get(path).status_code == 200, path


def test_the_right_key_opens_every_operation(keyed):
    """The control: with the key, no operation answers 401 (so the 401s above are the key's)."""
    for method, path in operations(keyed):
        if method == "DELETE":
            continue  # would delete the demo dictionary the other operations use
        response = keyed.request(
            method, concrete(path), **request_kwargs(method, path, f"Bearer {KEY}")
        )
        assert response.status_code != 401, (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)
    deleted = keyed.delete("/v1/dictionaries/auth", headers={"Authorization": f"Bearer {KEY}"})
    assert deleted.status_code == 204
