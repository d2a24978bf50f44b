"""GET /metrics, API keys, CORS, GET /v1/info, JSON logs; and a real uvicorn process showing
that concurrent requests are merged into fewer solver calls."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families

from service import Settings
from service.demo import demo_dictionary
from service.logs import JSONFormatter
from tests.service.conftest import running_client
from tests.service.helpers import read_log, serve

UNFOLD = "/v1/dictionaries/{ref}/unfold"


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: dict, name: str, **labels) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_by_route_template_and_solver_batches(client):
    activation = demo_dictionary()[0][3].tolist()
    for _ in range(3):
        ok = client.post("/v1/dictionaries/demo/unfold", json={"activations": activation, "k": 1})
        assert ok.status_code == 200, ok.text
    assert client.post("/v1/dictionaries/nothing/unfold", json={"activations": [1]}).status_code
    client.get("/nowhere")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    series = samples(response.text)
    assert value(series, "unfold_requests_total", route=UNFOLD, method="POST", status="200") == 3
    assert value(series, "unfold_requests_total", route=UNFOLD, method="POST", status="404") == 1
    assert value(series, "unfold_requests_total", route="unmatched", method="GET", status="404")
    assert value(series, "unfold_request_duration_seconds_count", route=UNFOLD) == 4
    assert value(series, "unfold_batch_size_count") == 3  # sequential requests: one call each
    assert value(series, "unfold_rows_total") == 3
    assert value(series, "unfold_solver_seconds_count") == 3
    demo_id = client.get("/v1/dictionaries/demo").json()["id"]
    assert ("unfold_queue_depth", frozenset({("dictionary", demo_id)})) in series
    assert value(series, "unfold_queue_depth", dictionary=demo_id) == 0
    # Raw paths never become labels (one series per route, not per dictionary name).
    assert not any("nothing" in str(labels) for _, labels in series)


def test_each_app_has_its_own_metrics(tmp_path):
    with running_client(tmp_path / "a", warmup=False) as first:
        first.get("/healthz")
        first.get("/healthz")
        with running_client(tmp_path / "b", warmup=False) as second:
            second.get("/healthz")
            counts = [
                value(
                    samples(c.get("/metrics").text),
                    "unfold_requests_total",
                    route="/healthz",
                    method="GET",
                    status="200",
                )
                for c in (first, second)
            ]
    assert counts == [2, 1]


KEYS = {"api_keys": "first-key,second-key"}


def test_api_keys_protect_everything_but_the_health_probes(tmp_path):
    with running_client(tmp_path, warmup=False, **KEYS) as client:
        for path in ("/healthz", "/readyz"):
            assert client.get(path).status_code == 200
        for method, path in [
            ("GET", "/v1/dictionaries"),
            ("POST", "/v1/dictionaries/demo/unfold"),
            ("GET", "/v1/info"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
        ]:
            missing = client.request(method, path)
            assert missing.status_code == 401, (path, missing.text)
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"]["code"] == "unauthorized"
        for header in (
            "Bearer wrong-key",
            "Bearer first-key-and-more",
            "Basic first-key",
            "first-key",
        ):
            wrong = client.get("/v1/dictionaries", headers={"Authorization": header})
            assert wrong.status_code == 401, header
        for key in ("first-key", "second-key"):
            ok = client.get("/v1/dictionaries", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.json()["dictionaries"]
        info = client.get("/v1/info", headers={"Authorization": "bearer first-key"}).json()
        assert info["auth"] is True and "first-key" not in json.dumps(info)


def test_api_keys_from_a_comma_separated_environment_variable(monkeypatch):
    monkeypatch.setenv("UNFOLD_API_KEYS", " alpha , beta,")
    monkeypatch.setenv("UNFOLD_CORS_ORIGINS", "https://a.example,https://b.example")
    settings = Settings()
    assert settings.api_keys == ["alpha", "beta"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("UNFOLD_API_KEYS", "")
    assert Settings().api_keys == []


def test_cors_is_off_by_default_and_preflight_needs_no_key_when_on(tmp_path):
    preflight = {
        "Origin": "https://notebook.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with running_client(tmp_path / "off", warmup=False) as client:
        response = client.get("/healthz", headers={"Origin": "https://notebook.example"})
        assert "access-control-allow-origin" not in response.headers
    with running_client(
        tmp_path / "on", warmup=False, cors_origins="https://notebook.example", **KEYS
    ) as client:
        answer = client.options("/v1/dictionaries/demo/unfold", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://notebook.example"
        simple = client.get(
            "/v1/dictionaries",
            headers={"Origin": "https://notebook.example", "Authorization": "Bearer first-key"},
        )
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == "https://notebook.example"
        other = client.options(
            "/v1/dictionaries", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_info_reports_backend_and_serving_settings(tmp_path):
    with running_client(
        tmp_path, warmup=False, batching=False, max_batch_size=32, max_body_bytes=1234
    ) as client:
        info = client.get("/v1/info").json()
    assert info["version"] and info["jax"]["backend"] == "cpu" and info["jax"]["devices"]
    assert info["batching"] == {"enabled": False, "max_batch_size": 32, "max_wait_ms": 0.0}
    assert info["limits"]["max_body_bytes"] == 1234 and info["auth"] is False
    assert info["gram_budget_bytes"] == Settings().gram_budget_bytes


class RecordingTracer(trace.NoOpTracer):
    """Records the names of the spans it starts in `spans`."""

    def __init__(self, spans: list[str]):
        self.spans = spans

    def start_span(self, name, *args, **kwargs):
        self.spans.append(name)
        return super().start_span(name, *args, **kwargs)


class RecordingTracerProvider(trace.TracerProvider):
    """A configured OpenTelemetry tracer provider (not the API's default) whose tracers record
    the names of the spans started."""

    def __init__(self):
        self.spans: list[str] = []

    def get_tracer(self, *args, **kwargs):
        return RecordingTracer(self.spans)


@pytest.mark.parametrize("enabled", [False, True])
def test_opentelemetry_spans_only_when_enabled(tmp_path, monkeypatch, enabled):
    provider = RecordingTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with running_client(tmp_path, opentelemetry=enabled) as client:
        ref = client.get("/v1/dictionaries").json()["dictionaries"][0]["id"]
        response = client.post(UNFOLD.format(ref=ref), json={"activations": [1.0] * 16, "k": 2})
        assert response.status_code == 200, response.text
    # A server span per request, named by its method (the route is added when it ends).
    assert provider.spans.count("POST") == (1 if enabled else 0)
    assert bool(provider.spans) is enabled


def test_json_log_formatter():
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v1/dictionaries/demo/unfold", "1.1", 200),
        None,
    )
    line = json.loads(JSONFormatter().format(record))
    assert line["logger"] == "uvicorn.access" and line["level"] == "info"
    assert (line["method"], line["path"], line["status"]) == (
        "POST",
        "/v1/dictionaries/demo/unfold",
        200,
    )
    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord(
            "service.app", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    line = json.loads(JSONFormatter().format(failure))
    assert line["message"] == "failed x" and "ValueError: boom" in line["exception"]


# A real server process.


def test_real_server_merges_concurrent_requests(tmp_path):
    """32 single-vector requests from 16 threads: every answer is right, and /metrics shows
    fewer solver calls than requests. The batch window is long (500 ms) and a batch fires as
    soon as 16 rows are queued, so merging does not depend on the machine's speed."""
    env = {
        "UNFOLD_MAX_WAIT_MS": "500",
        "UNFOLD_MAX_BATCH_SIZE": "16",
        "UNFOLD_WARMUP": "false",
        "UNFOLD_API_KEYS": "secret",
        "UNFOLD_LOG_FORMAT": "json",
    }
    directions, _ = demo_dictionary()
    rng = np.random.default_rng(0)
    pairs = [tuple(int(i) for i in rng.choice(32, 2, replace=False)) for _ in range(32)]
    with serve(tmp_path, env=env, headers={"Authorization": "Bearer secret"}) as client:
        unauthorized = client.get("/v1/info", headers={"Authorization": "Bearer nope"})
        assert unauthorized.status_code == 401

        def call(pair):
            activation = 1.5 * directions[pair[0]] - 0.75 * directions[pair[1]]
            return client.post(
                "/v1/dictionaries/demo/unfold", json={"activations": activation.tolist(), "k": 2}
            )

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(call, pairs))
        for pair, response in zip(pairs, responses, strict=True):
            assert response.status_code == 200, response.text
            code = response.json()["codes"][0]
            assert dict(zip(code["indices"], code["values"], strict=True)) == pytest.approx(
                {pair[0]: 1.5, pair[1]: -0.75}, abs=1e-5
            )
        series = samples(client.get("/metrics").text)
    calls = value(series, "unfold_batch_size_count")
    assert value(series, "unfold_rows_total") == 32
    assert value(series, "unfold_batch_size_sum") == 32
    assert 1 <= calls < 32, f"{calls} solver calls for 32 requests: nothing was merged"
    assert value(series, "unfold_requests_total", route=UNFOLD, method="POST", status="200") == 32
    access = []
    for line in read_log(tmp_path).splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("logger") == "uvicorn.access":
                access.append(entry)
    assert any(e.get("path") == "/v1/dictionaries/demo/unfold" for e in access), access[:3]


def test_openapi_declares_the_bearer_scheme_when_api_keys_are_set(tmp_path):
    headers = {"Authorization": "Bearer first-key"}
    with running_client(tmp_path / "keys", warmup=False, **KEYS) as client:
        spec = client.get("/openapi.json", headers=headers).json()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and scheme["description"]
    assert spec["security"] == [{"apiKey": []}]
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert spec["paths"][path]["get"]["security"] == [], path
    unfold = spec["paths"]["/v1/dictionaries/{ref}/unfold"]["post"]
    assert "security" not in unfold  # the document's default: a key
    with running_client(tmp_path / "open", warmup=False) as client:
        open_spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_spec["components"] and "security" not in open_spec
    assert all(
        "security" not in operation
        for operations in open_spec["paths"].values()
        for operation in operations.values()
    )
