"""Against a real `unfold serve` process on 127.0.0.1: restart persistence and concurrency."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.service.helpers import stable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(data_dir, port: int, timeout: float = 90.0):
    """Run `unfold serve` until the block ends; yield an httpx client once it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", data_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=base, timeout=30.0) as client:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail("server did not become ready in time")
                time.sleep(0.2)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_restart_keeps_dictionaries_and_ids(tmp_path):
    port = free_port()
    directions = np.random.default_rng(3).standard_normal((40, 10)).round(3).tolist()
    with serve(str(tmp_path), port) as client:
        created = client.post("/v1/dictionaries", json={"name": "kept", "directions": directions})
        assert created.status_code == 201
    with serve(str(tmp_path), port) as client:
        assert stable(client.get("/v1/dictionaries/kept").json()) == stable(created.json())
        again = client.post("/v1/dictionaries", json={"name": "kept", "directions": directions})
        assert again.status_code == 200 and again.json()["id"] == created.json()["id"]


def test_concurrent_requests_all_answered_correctly(tmp_path):
    from service.demo import demo_dictionary

    directions, _ = demo_dictionary()
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.choice(32, 2, replace=False)) for _ in range(32)]
    with serve(str(tmp_path), free_port()) as client:

        def call(pair):
            activation = 1.5 * directions[pair[0]] - 0.75 * directions[pair[1]]
            response = client.post(
                "/v1/dictionaries/demo/unfold", json={"activations": activation.tolist(), "k": 2}
            )
            return pair, response

        with ThreadPoolExecutor(max_workers=16) as pool:
            for pair, response in pool.map(call, pairs):
                assert response.status_code == 200, response.text
                code = response.json()["codes"][0]
                assert dict(zip(code["indices"], code["values"], strict=True)) == pytest.approx(
                    {int(pair[0]): 1.5, int(pair[1]): -0.75}, abs=1e-5
                )
