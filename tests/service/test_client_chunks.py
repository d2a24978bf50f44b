"""Automatic chunking of unfold requests (`ChunkSizer`): against a mock server that solves a
given number of rows per second of a fake clock, so sizes are exact and the test instant."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from service.client import AsyncUnfoldClient, ChunkSizer, UnfoldClient, passes_per_row

P3 = (24576, 768)  # a GPT-2-small SAE
LIMITS = {"max_rows": 65536, "max_body_bytes": 64 * 2**20, "request_timeout_s": 60.0}


class FakeServer:
    """One dictionary "sae" of `shape`, solved at `rate` rows per second of `now`; `limits`
    in GET /v1/info (None: no such route). Records the rows of each unfold request."""

    def __init__(self, shape=P3, rate=150.0, limits=LIMITS):
        self.shape, self.rate, self.limits = shape, rate, limits
        self.now, self.chunks, self.paths = 0.0, [], []

    def clock(self) -> float:
        return self.now

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        if path == "/v1/info":
            if self.limits is None:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "?"}})
            return httpx.Response(200, json={"version": "0", "limits": self.limits})
        if path == "/v1/dictionaries/sae":
            n_features, d_model = self.shape
            return httpx.Response(200, json={"n_features": n_features, "d_model": d_model})
        rows = np.load(io.BytesIO(request.content)).shape[0]
        self.chunks.append(rows)
        self.now += rows / self.rate
        tensors = {
            "indices": np.full((rows, 1), -1, np.int32),
            "values": np.zeros((rows, 1), np.float32),
            **{name: np.zeros(rows, np.float32) for name in ("residual_norm", "relative_error")},
            **{name: np.zeros(rows, np.int32) for name in ("l0", "n_iter", "status")},
            "duality_gap": np.full(rows, np.nan, np.float32),
        }
        return httpx.Response(200, content=save_safetensors(tensors))

    def client(self, **options) -> UnfoldClient:
        transport = httpx.MockTransport(self.handler)
        client = UnfoldClient("http://unfold.test", transport=transport, **options)
        client._clock = self.clock
        return client


def rows(n: int, d_model: int = P3[1]) -> np.ndarray:
    return np.zeros((n, d_model), np.float32)


def test_the_first_chunk_is_sized_from_the_dictionary_then_from_measured_times():
    server = FakeServer(rate=150.0)  # OMP k=64 on P3 with 2 CPU cores
    with server.client() as client:
        result = client.unfold("sae", rows(4096), k=64)
        assert len(result) == 4096
        # Target 7.5 s (60 s / 8). First: 2e10 / (64 * 24576 * 768) = 16.6 rows/s assumed,
        # 124 rows -> 64; then x4 while fast, until 1125 rows fit the target -> 1024.
        assert server.chunks == [64, 256, 1024, 1024, 1024, 704]
        assert server.paths[:2] == ["/v1/dictionaries/sae", "/v1/info"]
        # Remembered for the next call with the same settings; other settings start anew.
        server.chunks = []
        client.unfold("sae", rows(2048), k=64)
        assert server.chunks == [1024, 1024]
        server.chunks = []
        client.unfold("sae", rows(600), k=8)  # 993 rows in 7.5 s assumed -> 512
        assert server.chunks == [512, 88]
    assert server.paths.count("/v1/info") == 1  # fetched once


def test_a_slow_server_gets_smaller_chunks():
    server = FakeServer(rate=5.0)
    with server.client() as client:
        client.unfold("sae", rows(160), k=64)
    # 64 rows took 12.8 s > 7.5 s: 37.5 rows fit -> 32, which take 6.4 s: kept.
    assert server.chunks == [64, 32, 32, 32]


def test_a_fast_partial_chunk_does_not_shrink_or_grow_the_next():
    server = FakeServer(rate=150.0)
    with server.client() as client:
        client.unfold("sae", rows(10), k=64)  # less than a chunk: says little
        client.unfold("sae", rows(200), k=64)
    assert server.chunks == [10, 64, 136]


@pytest.mark.parametrize(
    ("limits", "timeout", "expected"),
    [
        # Target 2 s (the server's 16 s / 8): 33 rows assumed -> 32; then 300 fit -> 4 x 32.
        ({**LIMITS, "request_timeout_s": 16.0}, 60.0, [32, 128, 40]),
        # Target 1 s (the client's 8 s / 8): 16 rows, then 64, then 150 fit -> 128.
        (LIMITS, 8.0, [16, 64, 120]),
        # The server's max_rows.
        ({**LIMITS, "max_rows": 50}, 60.0, [50, 50, 50, 50]),
        # No /v1/info (an older server): the client's timeout alone.
        (None, 60.0, [64, 136]),
    ],
)
def test_limits_bound_the_chunks(limits, timeout, expected):
    server = FakeServer(rate=150.0, limits=limits)
    with server.client(timeout=timeout) as client:
        client.unfold("sae", rows(200), k=64)
    assert server.chunks == expected


def test_the_body_limit_bounds_the_chunks():
    server = FakeServer(shape=(64, 768), rate=1e9, limits={"max_body_bytes": 2**20})
    with server.client() as client:
        client.unfold("sae", rows(700), k=3)
    # (1 MiB - 4 KiB) / (768 * 4 bytes) = 340 rows of float32 per request.
    assert server.chunks == [340, 340, 20]


def test_fixed_chunk_rows_are_kept_and_ask_for_no_limits():
    server = FakeServer()
    with server.client(chunk_rows=100) as client:
        client.unfold("sae", rows(250), k=64)
    assert server.chunks == [100, 100, 50] and "/v1/info" not in server.paths
    with pytest.raises(ValueError, match="chunk_rows"):
        UnfoldClient("http://unfold.test", chunk_rows=0)


def test_the_async_client_sizes_chunks_alike():
    server = FakeServer(rate=150.0)

    async def main():
        transport = httpx.MockTransport(server.handler)
        async with AsyncUnfoldClient("http://unfold.test", transport=transport) as client:
            client._clock = server.clock
            return await client.unfold("sae", rows(1500), k=64)

    assert len(asyncio.run(main())) == 1500
    assert server.chunks == [64, 256, 1024, 156]


def test_work_per_row():
    assert passes_per_row("omp", {}, *P3) == 8  # the server's default k
    assert passes_per_row("omp", {"k": 64}, *P3) == 64
    assert passes_per_row("omp", {"k": None, "tol": 0.1}, *P3) == 768  # up to d_model atoms
    assert passes_per_row("omp", {"k": 5000}, 1000, 20) == 20
    assert passes_per_row("fista", {"alpha": 0.1}, *P3) == 1000
    assert passes_per_row("lasso", {"alpha": 0.1, "max_iter": 50}, *P3) == 50


def test_chunk_sizer_bounds():
    tiny = ChunkSizer.first(64, 24, passes=3, target_s=7.5, upper=65536)
    assert tiny.rows == 65536
    huge = ChunkSizer.first(1_000_000, 4096, passes=64, target_s=7.5, upper=65536)
    assert huge.rows == 1  # 0.6 rows assumed: one at a time, then measured
    huge.observe(1, 0.05)
    assert huge.rows == 4  # at most 4x per call
    huge.observe(4, 100.0)
    assert huge.rows == 1  # never below one
