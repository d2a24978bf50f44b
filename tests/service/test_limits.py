"""Limits over HTTP: body size (413), queue depth (429 + Retry-After), timeout (504)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import Settings, create_app
from service.dependencies import BatcherDep
from service.limits import BodyLimitMiddleware
from tests.service.conftest import running_client

QUIET = {"demo": False, "warmup": False, "compilation_cache": False, "reports": False}


def test_job_uploads_have_their_own_limit(tmp_path):
    from tests.service.helpers import npy_bytes

    small = npy_bytes(np.zeros((40, 16), np.float32))  # 2.7 kB: over the body limit only
    large = npy_bytes(np.zeros((100, 16), np.float32))
    overrides = {"max_body_bytes": 1000, "max_job_input_bytes": 5000}
    with running_client(tmp_path, **overrides) as client:
        accepted = client.post(
            "/v1/jobs", files={"file": ("a.npy", small)}, data={"dictionary": "demo"}
        )
        assert accepted.status_code == 202, accepted.text
        refused = client.post(
            "/v1/jobs", files={"file": ("a.npy", large)}, data={"dictionary": "demo"}
        )
        assert refused.status_code == 413
        assert "UNFOLD_MAX_JOB_INPUT_BYTES" in refused.json()["error"]["message"]


def test_body_over_the_limit_by_content_length_is_413(tmp_path):
    with running_client(tmp_path, max_body_bytes=1000) as client:
        body = {"name": "big", "directions": [[1.0] * 20] * 20}
        response = client.post("/v1/dictionaries", json=body)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "body_too_large" and "1000 bytes" in error["message"]
        small = client.post("/v1/dictionaries", json={"name": "small", "directions": [[1, 0]]})
        assert small.status_code == 201, small.text


def test_chunked_body_over_the_limit_is_413(tmp_path):
    def chunks():  # no Content-Length: sent with Transfer-Encoding: chunked
        yield b'{"name": "big", "directions": ['
        for _ in range(100):
            yield b"[1.0, 2.0, 3.0, 4.0],"
        yield b"[1.0, 2.0, 3.0, 4.0]]}"

    with running_client(tmp_path, max_body_bytes=1000) as client:
        response = client.post(
            "/v1/dictionaries", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
        assert client.get("/v1/dictionaries/big").status_code == 404


def test_streamed_body_is_cut_off_as_soon_as_it_passes_the_limit():
    """At the ASGI level: the app's reads fail at the first chunk beyond the limit, and
    whatever the app answers, the client gets the 413."""
    chunk = b"x" * 100
    delivered = []

    async def app(scope, receive, send):
        try:
            while True:
                message = await receive()
                delivered.append(len(message["body"]))
                if not message.get("more_body"):
                    break
        except Exception:  # an app that swallows the error and answers something else
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"bad body"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(n_chunks: int, headers=()):
        messages = [{"type": "http.request", "body": chunk, "more_body": True}] * (n_chunks - 1)
        messages.append({"type": "http.request", "body": chunk, "more_body": False})
        inbox = iter(messages)
        sent = []

        async def receive():
            return next(inbox)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}
        limits = {"max_body_bytes": 250, "max_dictionary_bytes": 250, "max_job_input_bytes": 250}
        await BodyLimitMiddleware(app, **limits)(scope, receive, send)
        return sent

    delivered.clear()
    sent = asyncio.run(call(10))
    assert sent[0]["status"] == 413 and b"body_too_large" in sent[1]["body"]
    assert delivered == [100, 100]  # the third chunk (300 > 250 bytes) never reached the app
    delivered.clear()
    sent = asyncio.run(call(2))  # 200 bytes: within the limit
    assert sent[0]["status"] == 200 and delivered == [100, 100]
    delivered.clear()
    sent = asyncio.run(call(3, [(b"content-length", b"300")]))  # refused before any read
    assert sent[0]["status"] == 413 and delivered == []


class Blocking:
    """A solve function that blocks until released (counts its calls)."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, rows, cancel):
        self.calls += 1
        self.started.set()
        self.release.wait(timeout=30)
        return rows


@contextlib.contextmanager
def probe_client(tmp_path, solve, **overrides):
    """A client of an app with an extra route that submits one row to the batcher."""
    app = create_app(Settings(data_dir=tmp_path, **QUIET, **overrides))

    @app.post("/probe")
    async def probe(batcher: BatcherDep) -> dict:
        rows = await batcher.submit(
            ("probe",), np.zeros((1, 2)), solve, split=lambda result, part: result[part]
        )
        return {"rows": len(rows)}

    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("batching", [True, False])
def test_full_queue_is_429_with_retry_after(tmp_path, batching):
    solve = Blocking()
    with (
        probe_client(
            tmp_path, solve, batching=batching, max_queue_rows=1, retry_after_s=3
        ) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        try:
            first = pool.submit(client.post, "/probe")
            assert solve.started.wait(timeout=30)
            refused = client.post("/probe")
        finally:
            solve.release.set()
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["code"] == "overloaded"
        assert first.result(timeout=30).json() == {"rows": 1}
        assert client.post("/probe").status_code == 200  # room again
        assert solve.calls == 2


def test_slow_solve_is_504_timeout(tmp_path):
    solve = Blocking()
    with probe_client(tmp_path, solve, request_timeout_s=0.2) as client:
        try:
            response = client.post("/probe")
        finally:
            solve.release.set()
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "timeout"


def test_limit_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("UNFOLD_MAX_BODY_BYTES", "123")
    monkeypatch.setenv("UNFOLD_MAX_QUEUE_ROWS", "7")
    monkeypatch.setenv("UNFOLD_BATCHING", "false")
    monkeypatch.setenv("UNFOLD_REQUEST_TIMEOUT_S", "2.5")
    settings = Settings()
    assert (settings.max_body_bytes, settings.max_queue_rows) == (123, 7)
    assert settings.batching is False and settings.request_timeout_s == 2.5


@pytest.mark.parametrize(
    ("name", "value"), [("UNFOLD_OPENTELEMETRY", "maybe"), ("UNFOLD_MAX_BODY_BYTES", "-1")]
)
def test_serve_refuses_a_bad_setting_naming_it(tmp_path, monkeypatch, capsys, name, value):
    """`unfold serve` with a bad setting in the environment exits 1 with pydantic's message
    naming the setting, before anything listens."""
    from service.cli import main

    monkeypatch.setenv("UNFOLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(name, value)

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("uvicorn.run", started)
    assert main(["serve"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("unfold: error: ")
    assert name.removeprefix("UNFOLD_").lower() in error
    assert "serving on" not in error


def test_a_client_leaving_mid_request_is_not_a_server_error(tmp_path):
    """A body read that finds the client gone ends quietly (no exception escapes the app)."""
    import asyncio

    from tests.service.conftest import running_client

    with running_client(tmp_path) as client:
        app = client.app
        sent = []

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/dictionaries/demo/unfold",
            "raw_path": b"/v1/dictionaries/demo/unfold",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 499
