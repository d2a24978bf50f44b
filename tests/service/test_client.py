"""`service.client` against a real `unfold serve` process, and its retries with a mock
transport."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from service.client import (
    AsyncUnfoldClient,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    UnfoldClient,
    UnfoldConnectionError,
    UnfoldResult,
    UnfoldTimeoutError,
)
from tests.service.helpers import free_port
from tests.service.test_oip import lean_server, toy_problem


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with lean_server(tmp_path_factory.mktemp("client")) as (http, _):
        yield str(http.base_url).rstrip("/")


@pytest.fixture(scope="module")
def toy(url):
    """The toy dictionary registered from a numpy array: (directions, info)."""
    directions, _, _ = toy_problem()
    with UnfoldClient(url) as client:
        return directions, client.register("toy", directions)


@pytest.fixture
def client(url):
    with UnfoldClient(url) as client:
        yield client


def test_register_list_get_delete(client, toy):
    directions, info = toy
    assert info["name"] == "toy" and (info["n_features"], info["d_model"]) == (64, 24)
    assert client.register("toy", directions)["id"] == info["id"]  # idempotent
    assert "toy" in [d["name"] for d in client.list()]
    assert client.get(info["id"])["name"] == "toy"
    with pytest.raises(ConflictError) as error:
        client.register("toy", directions[:32])
    assert error.value.status == 409 and error.value.code == "name_taken"
    extra = client.register("tmp", directions[:10], labels=[f"f{i}" for i in range(10)])
    assert extra["labels"] == 10
    client.delete("tmp")
    with pytest.raises(NotFoundError) as error:
        client.get("tmp")
    assert error.value.code == "not_found" and "tmp" in error.value.message


def test_register_with_bias_and_from_files(client, tmp_path):
    rng = np.random.default_rng(1)
    directions = rng.standard_normal((20, 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    with_bias = client.register("biased", directions, bias=bias, metadata={"layer": 3})
    assert with_bias["has_bias"] and with_bias["metadata"] == {"layer": 3}

    np.save(tmp_path / "d.npy", directions * 2)
    assert client.register_file("from-npy", tmp_path / "d.npy")["n_features"] == 20

    save_file({"D": directions * 3, "b": bias}, tmp_path / "d.safetensors")
    info = client.register_file("from-st", tmp_path / "d.safetensors", tensor="D", bias_tensor="b")
    assert info["has_bias"] and info["d_model"] == 8

    folder = tmp_path / "sae"
    folder.mkdir()
    save_file(
        {"W_dec": directions * 4, "b_dec": bias, "W_enc": directions.T.copy()},
        folder / "sae_weights.safetensors",
    )
    cfg = {"d_in": 8, "d_sae": 20, "normalize_activations": "none"}
    cfg["metadata"] = {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = client.register_saelens("sae", folder)
    assert sae["has_bias"] and sae["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    assert client.register("sae", directions * 4, bias=bias)["id"] == sae["id"]  # same content
    with pytest.raises(ValueError, match="SAELens"):
        client.register_saelens("nothing", tmp_path)
    for name in ("biased", "from-npy", "from-st", "sae"):
        client.delete(name)


def test_a_saelens_folder_registers_with_or_without_its_encoder(client, tmp_path):
    rng = np.random.default_rng(5)
    tensors = {
        "W_enc": rng.standard_normal((256, 4096)).astype(np.float32),
        "b_enc": np.zeros(4096, np.float32),
        "W_dec": rng.standard_normal((4096, 256)).astype(np.float32),
        "b_dec": rng.standard_normal(256).astype(np.float32),
    }
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 256, "d_sae": 4096}))
    sizes, progress = [], []
    client._http.event_hooks["request"].append(
        lambda request: sizes.append(int(request.headers.get("content-length", 0)))
    )
    info = client.register_saelens(
        "big-sae", tmp_path, progress=lambda *a: progress.append(a), encoder=False
    )
    assert (info["n_features"], info["d_model"], info["has_bias"]) == (4096, 256, True)
    assert info["encoder"] is None
    decoder = tensors["W_dec"].nbytes + tensors["b_dec"].nbytes
    assert decoder < sizes[0] < decoder + 4096  # W_enc (4 MB) stayed home
    assert progress[-1] == (sizes[0], sizes[0])
    direct = client.register("big-sae", tensors["W_dec"], bias=tensors["b_dec"])
    assert direct["id"] == info["id"]  # the same dictionary
    client.delete("big-sae")
    with_encoder = client.register_saelens("big-sae", tmp_path)  # the default keeps it
    assert (
        with_encoder["id"] == info["id"] and with_encoder["encoder"]["architecture"] == "standard"
    )
    encoder = tensors["W_enc"].nbytes + tensors["b_enc"].nbytes
    assert decoder + encoder < sizes[-1] < decoder + encoder + 4096
    client.delete("big-sae")


def test_a_half_precision_file_is_sent_in_half_precision(client, tmp_path):
    directions = toy_problem()[0].astype(np.float16)
    save_file({"W_dec": directions}, tmp_path / "half.safetensors")
    sizes = []
    client._http.event_hooks["request"].append(
        lambda request: sizes.append(int(request.headers.get("content-length", 0)))
    )
    info = client.register_file("half", tmp_path / "half.safetensors")
    assert directions.nbytes < sizes[0] < directions.nbytes + 1024  # not widened to float32
    assert client.register("half", directions.astype(np.float32))["id"] == info["id"]
    client.delete("half")


def test_unfold_matches_ground_truth_in_any_leading_shape(client, toy):
    _, codes, x = toy_problem(batch=12, seed=3)
    result = client.unfold("toy", x, k=3)
    assert isinstance(result, UnfoldResult) and result.indices.shape == (12, 3)
    np.testing.assert_allclose(result.to_dense(), codes, atol=1e-4)
    assert result.l0.tolist() == [3] * 12 and result.relative_error.max() < 1e-4
    assert np.isnan(result.duality_gap).all() and result.status.dtype == np.int32

    pipeline = client.unfold("toy", x.reshape(3, 4, 24), method="omp", k=3)  # (batch, pos, d)
    assert pipeline.indices.shape == (3, 4, 3) and pipeline.l0.shape == (3, 4)
    np.testing.assert_allclose(pipeline.to_dense(), codes.reshape(3, 4, 64), atol=1e-4)

    single = client.unfold("toy", x[0], k=3)
    assert single.indices.shape == (3,) and single.residual_norm.shape == ()
    np.testing.assert_allclose(single.to_dense(), codes[0], atol=1e-4)


def test_unfold_in_chunks_is_the_same(url, toy):
    _, codes, x = toy_problem(batch=10, seed=3)
    requests = []
    with UnfoldClient(url, chunk_rows=4) as client:
        client._http.event_hooks["request"].append(requests.append)
        result = client.unfold("toy", x, k=3)
    assert sum(r.url.path.endswith("/unfold") for r in requests) == 3  # 4 + 4 + 2 rows
    np.testing.assert_allclose(result.to_dense(), codes, atol=1e-4)


def test_unfold_lasso_and_tol_only(client, toy):
    _, codes, x = toy_problem(batch=3)
    lasso = client.unfold("toy", x, method="fista", alpha=1e-3, positive=False)
    np.testing.assert_allclose(lasso.to_dense(), codes, atol=0.02)
    assert np.isfinite(lasso.duality_gap).all()
    tol_only = client.unfold("toy", x, k=None, tol=1e-3)  # null k: sent as JSON
    np.testing.assert_allclose(tol_only.to_dense(), codes, atol=1e-3)


def test_unfold_errors_are_typed(client, toy):
    with pytest.raises(InvalidInputError) as error:
        client.unfold("toy", np.zeros((2, 23)))
    assert error.value.status == 422 and error.value.code == "shape_mismatch"
    with pytest.raises(InvalidInputError) as error:
        client.unfold("toy", np.zeros((2, 24)), k=65)
    assert error.value.code == "invalid_parameter"
    with pytest.raises(NotFoundError):
        client.unfold("nope", np.zeros((2, 24)))
    with pytest.raises(ValueError, match="no rows"):
        client.unfold("toy", np.zeros((0, 24)))


def test_server_down_is_a_connection_error_after_retries():
    with UnfoldClient(f"http://127.0.0.1:{free_port()}", max_retries=3) as client:
        delays = []
        client._sleep = delays.append
        with pytest.raises(UnfoldConnectionError, match=r"cannot reach .* \(after 3 retries\): "):
            client.list()
    assert delays == [0.5, 1.0, 2.0]


def test_async_client(url, toy):
    _, codes, x = toy_problem(batch=5)

    async def main():
        async with AsyncUnfoldClient(url, chunk_rows=2) as client:
            assert await client.ready()
            info = await client.get("toy")
            results = await asyncio.gather(*(client.unfold("toy", row, k=3) for row in x))
            with pytest.raises(NotFoundError):
                await client.delete("nope")
            return info, results

    info, results = asyncio.run(main())
    assert info["n_features"] == 64
    np.testing.assert_allclose(np.stack([r.to_dense() for r in results]), codes, atol=1e-4)


# Retries, with a mock transport: deterministic and instant.


def flaky_transport(failures: list[httpx.Response], final: httpx.Response):
    """Answers (copies of) the queued `failures` in turn, then `final` for ever; records the
    requests."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = failures.pop(0) if failures else final
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(handler), seen


def busy(status: int = 429, retry_after: str | None = None, style: str = "v1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    error = {"code": "overloaded", "message": "busy"} if style == "v1" else "busy"
    return httpx.Response(status, json={"error": error}, headers=headers)


LISTING = httpx.Response(200, json={"dictionaries": []})


def test_retries_honour_retry_after():
    transport, seen = flaky_transport([busy(429, "2"), busy(503, "0.25")], LISTING)
    with UnfoldClient("http://unfold.test", transport=transport) as client:
        delays = []
        client._sleep = delays.append
        assert client.list() == []
    assert delays == [2.0, 0.25] and len(seen) == 3


def test_retries_back_off_exponentially_then_give_up():
    transport, seen = flaky_transport([busy(503, style="oip")] * 10, LISTING)
    with UnfoldClient("http://unfold.test", transport=transport, max_retries=3) as client:
        delays = []
        client._sleep = delays.append
        with pytest.raises(OverloadedError) as error:
            client.list()
    assert delays == [0.5, 1.0, 2.0] and len(seen) == 4
    assert error.value.status == 503 and error.value.message == "busy"


def test_no_retry_on_other_errors_and_backoff_is_capped():
    transport, seen = flaky_transport([httpx.Response(500, text="boom")], LISTING)
    with (
        UnfoldClient("http://unfold.test", transport=transport) as client,
        pytest.raises(Exception, match="boom") as error,
    ):
        client.list()
    assert error.value.status == 500 and len(seen) == 1

    transport, _ = flaky_transport([busy(429, "3600")], LISTING)
    with UnfoldClient("http://unfold.test", transport=transport, max_backoff=5) as client:
        delays = []
        client._sleep = delays.append
        client.list()
    assert delays == [5]


def test_async_retries():
    transport, seen = flaky_transport([busy(429, "1")], LISTING)
    delays = []

    async def main():
        async with AsyncUnfoldClient("http://unfold.test", transport=transport) as client:

            async def sleep(seconds):
                delays.append(seconds)

            client._sleep = sleep
            return await client.list()

    assert asyncio.run(main()) == [] and delays == [1.0] and len(seen) == 2


@pytest.mark.parametrize(
    ("failure", "expected", "match", "retried"),
    [
        (httpx.ReadTimeout("slow"), UnfoldTimeoutError, "within the client's timeout", False),
        (httpx.WriteTimeout("slow"), UnfoldTimeoutError, "chunk_rows", False),
        (httpx.ConnectTimeout("no route"), UnfoldConnectionError, "cannot reach", True),
        (httpx.ConnectError("refused"), UnfoldConnectionError, "cannot reach", True),
    ],
)
def test_a_timeout_is_reported_as_a_timeout_not_as_an_unreachable_server(
    failure, expected, match, retried
):
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise failure

    transport = httpx.MockTransport(handler)
    with (
        UnfoldClient(
            "http://unfold.test", transport=transport, timeout=7.0, max_retries=2
        ) as client,
        pytest.raises(expected, match=match) as raised,
    ):
        client._sleep = lambda seconds: None
        client.list()
    assert ("7.0 s" in str(raised.value)) == (expected is UnfoldTimeoutError)
    assert len(attempts) == (3 if retried else 1)  # a timeout once connected is not retried

    async def main():
        async with AsyncUnfoldClient(
            "http://unfold.test", transport=transport, max_retries=0
        ) as client:
            await client.list()

    with pytest.raises(expected, match=match):
        asyncio.run(main())


def failing_transport(failures: list[Exception], final: httpx.Response):
    """Raises the queued `failures` in turn, then answers (copies of) `final`; records the
    requests."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if failures:
            raise failures.pop(0)
        return httpx.Response(final.status_code, headers=final.headers, content=final.content)

    return httpx.MockTransport(handler), seen


LOST = [httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.RemoteProtocolError("eof")]


def test_connection_failures_are_retried_with_backoff():
    transport, seen = failing_transport(list(LOST), LISTING)
    with UnfoldClient("http://unfold.test", transport=transport, max_backoff=0.75) as client:
        delays = []
        client._sleep = delays.append
        assert client.list() == []
    assert delays == [0.5, 0.75, 0.75] and len(seen) == 4

    transport, seen = failing_transport([httpx.ConnectError("refused")] * 9, LISTING)
    with UnfoldClient("http://unfold.test", transport=transport, max_retries=2) as client:
        delays = []
        client._sleep = delays.append
        with pytest.raises(UnfoldConnectionError, match=r"\(after 2 retries\): refused"):
            client.list()
    assert delays == [0.5, 1.0] and len(seen) == 3


def test_async_connection_failures_are_retried_with_backoff():
    transport, seen = failing_transport(list(LOST), LISTING)
    delays = []

    async def main():
        async with AsyncUnfoldClient("http://unfold.test", transport=transport) as client:

            async def sleep(seconds):
                delays.append(seconds)

            client._sleep = sleep
            return await client.list()

    assert asyncio.run(main()) == [] and delays == [0.5, 1.0, 2.0] and len(seen) == 4


def test_a_lost_connection_is_retried_only_for_idempotent_requests():
    for failure, retried in [(httpx.ReadError("reset"), False), (httpx.ConnectError("no"), True)]:
        transport, seen = failing_transport([failure], LISTING)
        with UnfoldClient("http://unfold.test", transport=transport) as client:
            client._sleep = lambda seconds: None
            request = client._request("POST", "/v1/some-action", idempotent=False)
            if retried:  # nothing was sent: safe whatever the request
                assert client._send(request).status_code == 200
            else:
                with pytest.raises(UnfoldConnectionError, match="reset"):
                    client._send(request)
        assert len(seen) == (2 if retried else 1)
