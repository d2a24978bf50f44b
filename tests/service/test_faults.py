"""Faults against real `unfold serve` processes on 127.0.0.1: SIGKILL during a large upload and
a restart (no partial dictionary, the others intact and served), a damaged stored array file
skipped at start-up, a full disk (a small tmpfs data directory) answered 507 with nothing
corrupted, and SIGTERM with requests in flight (each answered, then a clean exit).

(A tampered manifest and a left-over staging folder are covered in test_dictionaries.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.demo import demo_dictionary
from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, free_port, npy_bytes, read_log, serve, server_log

QUIET = {"UNFOLD_DEMO": "true", "UNFOLD_WARMUP": "false", "UNFOLD_COMPILATION_CACHE": "false"}
KEEP = np.random.default_rng(5).standard_normal((40, 12)).astype(np.float32)


@contextlib.contextmanager
def server_process(data_dir, env=None):
    """`unfold serve` as a process the test may kill: (Popen, httpx client) once ready."""
    port = free_port()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with open(server_log(data_dir), "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **QUIET, **(env or {})},
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, read_log(data_dir)[-2000:]
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "server not ready in time"
                time.sleep(0.2)
            yield process, client
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def npy_header(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def streamed_npy(rows: int, width: int, progress: dict, pause: float = 0.0):
    """A `.npy` body of random rows sent a MiB at a time; `progress["sent"]` counts bytes."""
    yield npy_header((rows, width))
    rng = np.random.default_rng(0)
    per_chunk = max(1, 2**20 // (4 * width))
    for start in range(0, rows, per_chunk):
        chunk = rng.standard_normal((min(per_chunk, rows - start), width), np.float32).tobytes()
        progress["sent"] += len(chunk)
        yield chunk
        if pause:
            time.sleep(pause)
    progress["done"] = True


def assert_keep_served(client: httpx.Client, keep_id: str) -> None:
    info = client.get(f"/v1/dictionaries/{keep_id}")
    assert info.status_code == 200 and info.json()["name"] == "keep"
    row = 1.5 * KEEP[7] - 0.5 * KEEP[30]
    answer = client.post("/v1/dictionaries/keep/unfold", json={"activations": row.tolist(), "k": 2})
    assert answer.status_code == 200, answer.text
    code = answer.json()["codes"][0]
    values = dict(zip(code["indices"], code["values"], strict=True))
    assert values == pytest.approx({7: 1.5, 30: -0.5}, abs=1e-3)


def stored_ids(data_dir: Path) -> set[str]:
    folder = data_dir / "dictionaries"
    return {entry.name for entry in folder.iterdir()} if folder.exists() else set()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid-body", "after-body"])
def test_sigkill_during_a_large_upload_leaves_no_partial_dictionary(tmp_path, point):
    rows, width = 150_000, 512  # 307 MB of float32
    with server_process(tmp_path) as (process, client):
        keep = client.post("/v1/dictionaries", json={"name": "keep", "directions": KEEP.tolist()})
        assert keep.status_code == 201, keep.text
        keep_id = keep.json()["id"]
        before = stored_ids(tmp_path)
        progress = {"sent": 0, "done": False}

        def upload():
            with contextlib.suppress(httpx.TransportError):
                client.post(
                    "/v1/dictionaries",
                    params={"name": "big"},
                    content=streamed_npy(rows, width, progress, pause=0.002),
                    headers=NPY_HEADERS,
                    timeout=300,
                )

        with ThreadPoolExecutor(1) as pool:
            uploading = pool.submit(upload)
            deadline = time.monotonic() + 120
            while not (progress["done"] if point == "after-body" else progress["sent"] > 150e6):
                assert time.monotonic() < deadline and not uploading.done()
                time.sleep(0.01)
            if point == "after-body":
                time.sleep(0.3)  # the server is checking, hashing and storing it now
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            uploading.result()
    with serve(str(tmp_path), env=QUIET) as client:
        names = {entry["name"] for entry in client.get("/v1/dictionaries").json()["dictionaries"]}
        assert names in ({"demo", "toy-model", "keep"}, {"demo", "keep", "big"}), names
        if "big" in names:  # stored whole before the kill: then it must be complete and served
            assert point == "after-body"
            info = client.get("/v1/dictionaries/big").json()
            assert (info["n_features"], info["d_model"]) == (rows, width)
        else:
            assert stored_ids(tmp_path) == before
        assert_keep_served(client, keep_id)
    staging = tmp_path / "staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte"])
def test_a_damaged_stored_array_file_is_skipped(tmp_path, damage):
    with running_client(tmp_path, warmup=False) as client:
        keep = client.post("/v1/dictionaries", json={"name": "keep", "directions": KEEP.tolist()})
        bad = client.post(
            "/v1/dictionaries", json={"name": "bad", "directions": (KEEP[:20] * 2).tolist()}
        )
        assert keep.status_code == bad.status_code == 201
    arrays = tmp_path / "dictionaries" / bad.json()["id"] / "arrays.safetensors"
    body = bytearray(arrays.read_bytes())
    if damage == "truncated":
        body = body[: len(body) - 100]
    else:
        body[-5] ^= 0x40  # inside the directions' data: the header still parses
    arrays.write_bytes(bytes(body))
    with running_client(tmp_path, warmup=False) as client:
        names = {entry["name"] for entry in client.get("/v1/dictionaries").json()["dictionaries"]}
        assert names == {"demo", "toy-model", "keep"}
        assert client.get("/v1/dictionaries/bad").status_code == 404
        assert_keep_served(client, keep.json()["id"])
        assert client.get("/healthz").status_code == 200


@contextlib.contextmanager
def small_disk(size_mib: int = 64):
    """A size-limited folder: tmpfs, else a loop-mounted ext4 image; skip when neither works."""
    root = Path(tempfile.mkdtemp(prefix="unfold-disk-"))
    mounted = None
    if os.geteuid() == 0 and shutil.which("mount"):
        tried = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(root)],
            capture_output=True,
        )
        if tried.returncode == 0:
            mounted = "tmpfs"
        elif shutil.which("mkfs.ext4"):
            image = Path(tempfile.mkdtemp()) / "disk.img"
            with open(image, "wb") as file:
                file.truncate(size_mib * 2**20)
            made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True)
            loop = subprocess.run(
                ["mount", "-o", "loop", str(image), str(root)], capture_output=True
            )
            if made.returncode == 0 and loop.returncode == 0:
                mounted = "loop"
    if mounted is None:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip("cannot mount a size-limited filesystem here (needs root and tmpfs or loop)")
    try:
        yield root / "data"
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_full_disk_is_507_and_nothing_is_corrupted(tmp_path):
    with small_disk(64) as data_dir:
        with server_process(data_dir, env={"TMPDIR": str(data_dir)}) as (_, client):
            keep = client.post(
                "/v1/dictionaries", json={"name": "keep", "directions": KEEP.tolist()}
            )
            assert keep.status_code == 201, keep.text
            keep_id = keep.json()["id"]
            before = {path: path.read_bytes() for path in data_dir.rglob("*") if path.is_file()
                      and "dictionaries" in path.parts}  # fmt: skip
            free = shutil.disk_usage(data_dir).free
            # 1. Declared larger than the disk: refused up front.
            rng = np.random.default_rng(1)
            declared = npy_bytes(rng.standard_normal((40_000, 512), np.float32))  # 82 MB
            refused = client.post(
                "/v1/dictionaries", params={"name": "big"}, content=declared, headers=NPY_HEADERS
            )
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["code"] == "insufficient_storage"
            # 2. Streamed without a length: the disk fills while it is written.
            progress = {"sent": 0, "done": False}
            streamed = client.post(
                "/v1/dictionaries",
                params={"name": "big"},
                content=streamed_npy(40_000, 512, progress),
                headers=NPY_HEADERS,
            )
            assert streamed.status_code in (507, 413), streamed.text
            assert streamed.json()["error"]["code"] == "insufficient_storage"
            # 3. Two uploads that each fit, but not together.
            half = npy_bytes(rng.standard_normal((12_000, 512), np.float32))  # 25 MB each
            with ThreadPoolExecutor(2) as pool:
                both = list(
                    pool.map(
                        lambda name: client.post(
                            "/v1/dictionaries",
                            params={"name": name},
                            content=half if name == "h1" else half[:-4] + b"\0\0\x80?",
                            headers=NPY_HEADERS,
                        ),
                        ["h1", "h2"],
                    )
                )
            assert all(r.status_code in (201, 507) for r in both), [r.text for r in both]
            for response in both:
                if response.status_code == 507:
                    assert response.json()["error"]["code"] == "insufficient_storage"
            assert client.get("/healthz").status_code == 200
            assert_keep_served(client, keep_id)
            # Nothing left behind by the refused uploads; what was stored is unchanged.
            staging = data_dir / "staging"
            assert not staging.exists() or not any(staging.iterdir())
            for path, content in before.items():
                assert path.read_bytes() == content, path
            stored = {r.json()["name"] for r in both if r.status_code == 201}
            if not stored:
                assert shutil.disk_usage(data_dir).free >= free - 2**20
        with server_process(data_dir, env={"TMPDIR": str(data_dir)}) as (_, client):
            listing = client.get("/v1/dictionaries").json()["dictionaries"]
            assert {entry["name"] for entry in listing} == {"demo", "toy-model", "keep"} | stored
            assert_keep_served(client, keep_id)


def test_a_disk_filling_while_an_upload_is_spooled_is_507_even_with_bytes_buffered():
    """The bytes still buffered when the disk fills are dropped, not flushed on close (which
    would raise ENOSPC again, outside the handler: a 500)."""
    import asyncio

    from service.errors import InsufficientStorage
    from service.uploads import spooled

    class Body:  # a request streaming 5000-byte chunks: the file's buffer holds some
        headers: dict = {}

        async def stream(self):
            for _ in range(1000):
                yield b"x" * 5000

    async def upload(directory):
        async with spooled(Body(), directory):
            pass

    with small_disk(1) as data_dir:
        data_dir.mkdir()
        with pytest.raises(InsufficientStorage, match="filled up"):
            asyncio.run(upload(data_dir))
        assert list(data_dir.iterdir()) == []  # the partial file is gone


def test_sigterm_answers_the_requests_in_flight_then_exits(tmp_path):
    directions = demo_dictionary()[0]
    with server_process(tmp_path) as (process, client):
        # Each request needs a program compiled first (a new k), so all are in flight at once.
        ks = list(range(1, 9))
        rows = [(directions[k] + directions[16 + k]).tolist() for k in ks]
        slow_body_sent = threading.Event()

        def slow_body():
            text = npy_bytes(np.array([directions[5]], np.float32))
            for index in range(0, len(text), 16):
                yield text[index : index + 16]
                if index == 16:
                    slow_body_sent.set()
                time.sleep(0.05)

        def one(index):
            if index == len(ks):
                return client.post(
                    "/v1/dictionaries/demo/unfold",
                    params={"k": "1"},
                    content=slow_body(),
                    headers=NPY_HEADERS,
                    timeout=120,
                )
            return client.post(
                "/v1/dictionaries/demo/unfold",
                json={"activations": rows[index], "k": ks[index] + 1},
                timeout=120,
            )

        with ThreadPoolExecutor(len(ks) + 1) as pool:
            futures = [pool.submit(one, index) for index in range(len(ks) + 1)]
            assert slow_body_sent.wait(30)
            time.sleep(0.3)
            assert not all(future.done() for future in futures)  # still in flight
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]
        status = process.wait(timeout=60)
    assert status in (0, -signal.SIGTERM), read_log(tmp_path)[-2000:]
    for index, answer in enumerate(answers[:-1]):
        assert answer.status_code == 200, answer.text
        k = ks[index]
        assert set(answer.json()["codes"][0]["indices"]) == {k, 16 + k}
    assert answers[-1].status_code == 200, answers[-1].text
    assert answers[-1].json()["codes"][0]["indices"] == [5]
    assert "Traceback" not in read_log(tmp_path)
