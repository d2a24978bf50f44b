"""Small helpers for service tests: binary bodies, a real server process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

NPY_HEADERS = {"content-type": "application/x-npy"}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file of any numpy dtype the format has (bfloat16 included)."""
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32"}
    header, offset, data = {}, 0, []
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        data.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def from_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def stable(info: dict) -> dict:
    """Dictionary info without its volatile parts: the warm-up state, and the memory budget
    (a share of the memory available when it loaded) with the reason that quotes it."""
    placement = {
        key: value
        for key, value in info.get("placement", {}).items()
        if key not in ("gram_budget_bytes", "reason")
    }
    return {**{key: value for key, value in info.items() if key != "warm"}, "placement": placement}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(data_dir, port: int | None = None, *, env=None, headers=None, timeout: float = 90.0):
    """Run `unfold serve` on 127.0.0.1 until the block ends (extra UNFOLD_* variables in `env`;
    reports are computed only when asked for unless `env` says UNFOLD_REPORTS=true); yield an
    httpx client (with `headers`) once it is ready. The server's output goes to
    `server_log(data_dir)`."""
    port = free_port() if port is None else port
    with open(server_log(data_dir), "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "UNFOLD_REPORTS": "false", **(env or {})},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=30.0, headers=headers
            ) as client:
                while True:
                    if process.poll() is not None:
                        pytest.fail(f"server exited: {read_log(data_dir)[-2000:]}")
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
                status = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail(f"server did not stop on SIGTERM: {read_log(data_dir)[-2000:]}")
            # uvicorn shuts down gracefully, then re-raises the signal: -SIGTERM is a clean exit
            # (an abort inside native code would be -SIGABRT).
            if status not in (0, -signal.SIGTERM):
                pytest.fail(f"server exited with {status} on SIGTERM: {read_log(data_dir)[-2000:]}")


def server_log(data_dir) -> str:
    return os.path.join(data_dir, "server.log")


def read_log(data_dir) -> str:
    with open(server_log(data_dir), encoding="utf-8", errors="replace") as file:
        return file.read()
