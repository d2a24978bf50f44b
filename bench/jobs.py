"""Jobs against in-process `solvers.unfold` on the same rows, and a job's memory.

Starts `unfold serve` on 127.0.0.1 (a fresh data directory, no demo), registers a random
dictionary (default P1: 8192 x 512), writes activations to a file the server may read
(UNFOLD_JOB_INPUT_DIRS) and runs jobs of `--rows` and 4 x `--rows` rows (OMP, k=32). Prints
the job's rows/s against `solvers.unfold` in this process on the same rows (the target is at
least 90%), and the server's resident memory (VmRSS) sampled while each job runs: flat in the
number of rows means the peak does not grow with them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import solvers  # noqa: E402
from bench.soak import rss_bytes  # noqa: E402
from tests.service.helpers import free_port, npy_bytes  # noqa: E402


def run_job(client: httpx.Client, path: Path, pid: int, k: int) -> tuple[float, int]:
    """(rows/s of the job, peak RSS sampled while it ran)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        body = {"input": str(path), "dictionary": "bench", "k": k}
        job = client.post("/v1/jobs", json=body).raise_for_status().json()
        while job["state"] in ("queued", "running"):
            time.sleep(0.2)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["state"] == "succeeded", job
        return job["rows_total"] / (job["finished_at"] - job["started_at"]), peak[0]
    finally:
        done.set()
        sampler.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((args.features, args.d_model)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    data = Path(tempfile.mkdtemp(prefix="unfold-bench-jobs-"))
    inputs = data / "inputs"
    inputs.mkdir()
    sizes = (args.rows, 4 * args.rows)
    for rows in sizes:
        x = rng.standard_normal((rows, args.d_model)).astype(np.float32)
        np.save(inputs / f"{rows}.npy", x)
    port = free_port()
    env = {**os.environ, "UNFOLD_DEMO": "false", "UNFOLD_REPORTS": "false",
           "UNFOLD_JOB_INPUT_DIRS": str(inputs), "UNFOLD_LOG_LEVEL": "warning"}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
         "--data-dir", str(data / "server")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for _ in range(900):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            client.post(
                "/v1/dictionaries", params={"name": "bench"}, content=npy_bytes(directions),
                headers={"content-type": "application/x-npy"},
            ).raise_for_status()  # fmt: skip
            run_job(client, inputs / f"{sizes[0]}.npy", server.pid, args.k)  # compiles
            prepared = solvers.prepare(directions)
            print(f"dictionary {args.features} x {args.d_model}, OMP k={args.k}")
            for rows in sizes:
                speed, peak = run_job(client, inputs / f"{rows}.npy", server.pid, args.k)
                x = np.load(inputs / f"{rows}.npy")
                solvers.unfold(x[:1024], prepared, k=args.k)
                started = time.perf_counter()
                for first in range(0, rows, 1024):
                    solvers.unfold(x[first : first + 1024], prepared, k=args.k)
                direct = rows / (time.perf_counter() - started)
                print(
                    f"{rows:>8} rows: job {speed:7.0f} rows/s, in-process {direct:7.0f} rows/s "
                    f"(ratio {speed / direct:.2f}); server peak RSS {peak / 2**20:.0f} MiB"
                )
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
