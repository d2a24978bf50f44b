"""Against a real `unfold serve` process on 127.0.0.1: restart persistence and concurrency."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.service.helpers import free_port, read_log, serve, stable


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


def test_answers_arrive_whole_and_in_order_over_one_connection(tmp_path):
    """The server joins each answer's writes (`service.transport`): pipelined requests, a large
    answer and a closing connection must still get every byte, in order."""
    import http.client
    import socket

    from service.demo import demo_dictionary

    directions, _ = demo_dictionary()
    rows = np.repeat(directions[:3], 300, axis=0)  # 900 rows: a 115 kB dense answer
    body = io.BytesIO()
    np.save(body, rows.astype(np.float32), allow_pickle=False)
    unfold = (
        b"POST /v1/dictionaries/demo/unfold?k=1 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-npy\r\nAccept: application/x-npy\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body.getvalue())
    ) + body.getvalue()
    port = free_port()
    with serve(str(tmp_path), port), socket.create_connection(("127.0.0.1", port), 30) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + unfold
            + b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        stream = sock.makefile("rb")

        class OneStream:  # every answer read from the same buffered stream, one after another
            def makefile(self, *args, **kwargs):
                return self

            def close(self):  # a finished answer closes its stream: not this one
                pass

            def __getattr__(self, name):
                return getattr(stream, name)

        answers = []
        for method in ("GET", "POST", "GET"):
            answer = http.client.HTTPResponse(OneStream(), method=method)
            answer.begin()
            answers.append((answer.status, answer.read()))
        assert [status for status, _ in answers] == [200, 200, 200]
        assert b"ok" in answers[0][1] and b"ready" in answers[2][1]
        codes = np.load(io.BytesIO(answers[1][1]), allow_pickle=False)
        np.testing.assert_allclose(codes @ directions, rows, atol=1e-5)
        assert stream.read() == b""  # and then the server closed the connection


def test_shutdown_during_warm_up_stops_cleanly(tmp_path):
    # Registering starts compiling the dictionary's batch buckets in the background; a
    # SIGTERM meanwhile must stop that between two compilations and exit with status 0
    # (`serve` checks it), not abort inside XLA at interpreter exit.
    directions = np.random.default_rng(5).standard_normal((300, 48)).tolist()
    with serve(str(tmp_path), env={"UNFOLD_LOG_LEVEL": "info"}) as client:
        created = client.post("/v1/dictionaries", json={"name": "cold", "directions": directions})
        assert created.status_code == 201 and not created.json()["warm"]
    assert "warm-up of cold stopped after" in read_log(str(tmp_path))


def test_exit_during_warm_up_does_not_abort(tmp_path):
    # A pytest session whose one test registers a dictionary and ends at once: its warm-up
    # thread is still compiling when the interpreter exits. Before shutdown waited for it, the
    # process died inside XLA at exit ("FATAL: exception not rethrown", status 134) after its
    # tests had passed, in 3 of 4 runs here.
    (tmp_path / "test_register.py").write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            from tests.service.conftest import running_client

            def test_register():
                with running_client({str(tmp_path / "data")!r}) as client:
                    directions = np.random.default_rng(1).standard_normal((30, 8)).tolist()
                    body = {{"name": "cold", "directions": directions}}
                    assert client.post("/v1/dictionaries", json=body).status_code == 201
            """
        )
    )
    repository = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": repository},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
