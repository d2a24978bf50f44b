"""Jobs against in-process `solvers.unfold` on the same rows, a job's memory, and Ray.

Starts `unfold serve` on 127.0.0.1 (a fresh data directory, no demo), registers a random
dictionary (default P1: 8192 x 512), writes activations to files the server may read
(UNFOLD_JOB_INPUT_DIRS) and runs:

1. jobs of `--rows` and 4 x `--rows` rows (OMP, k=32): the job's rows/s against
   `solvers.unfold` in this process on the same rows (the target is at least 90%);
2. the server's memory while each job runs, and while a job of `--memory-rows` rows (default
   1M) runs: peak VmRSS, and peak RssAnon (the process's own memory, without the input's
   memory-mapped pages, which the kernel drops when it needs to). Flat in the number of rows
   means the peak does not grow with them;
3. with `--ray`: `unfold run` on a local Ray cluster (`--ray local`: one actor on this
   machine's CPUs) against `unfold run` in-process, on the same file, both as subprocesses
   (their summary's solve time: Ray's includes starting the actor and preparing the
   dictionary there).
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
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import solvers  # noqa: E402
from tests.service.helpers import free_port, npy_bytes  # noqa: E402


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                found[name] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["RssAnon"]


def run_job(client: httpx.Client, path: Path, pid: int, k: int) -> tuple[float, list[int]]:
    """(rows/s of the job, [peak VmRSS, peak RssAnon] sampled while it ran)."""
    peak, done = [0, 0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[:] = np.maximum(peak, memory(pid)).tolist()
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
        return job["rows_total"] / (job["finished_at"] - job["started_at"]), peak
    finally:
        done.set()
        sampler.join()


def unfold_run(*argv) -> float:
    """Rows/s of an `unfold run` subprocess, from its summary line."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "run", *map(str, argv), "--quiet"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )  # fmt: skip
    summary = [line for line in done.stderr.splitlines() if "solved now in" in line]
    if done.returncode or not summary:
        raise RuntimeError(f"unfold run failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(summary[-1].split("rows/s")[0].rsplit(",", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--memory-rows", type=int, default=1 << 20, help="0: none")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--memory-k", type=int, default=8, help="k of the --memory-rows job")
    parser.add_argument("--ray", action="store_true", help="also Ray against in-process")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((args.features, args.d_model)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    data = Path(tempfile.mkdtemp(prefix="unfold-bench-jobs-"))
    inputs = data / "inputs"
    inputs.mkdir()
    sizes = (args.rows, 4 * args.rows)
    for rows in (*sizes, *([args.memory_rows] if args.memory_rows else [])):
        with open(inputs / f"{rows}.npy", "wb") as file:  # written a block at a time
            np.lib.format.write_array_header_1_0(
                file, {"descr": "<f4", "fortran_order": False, "shape": (rows, args.d_model)}
            )
            for first in range(0, rows, 65536):
                block = rng.standard_normal((min(65536, rows - first), args.d_model))
                file.write(block.astype(np.float32).tobytes())
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
            # Ready before the first job: JAX dispatches asynchronously, and a Gram matrix still
            # being computed here would take cores from the server's job.
            prepared = jax.block_until_ready(solvers.prepare(directions))
            print(f"dictionary {args.features} x {args.d_model}, OMP k={args.k}")
            for rows in sizes:
                speed, peak = run_job(client, inputs / f"{rows}.npy", server.pid, args.k)
                x = np.load(inputs / f"{rows}.npy", mmap_mode="r")
                solvers.unfold(x[:1024], prepared, k=args.k)
                started = time.perf_counter()
                for first in range(0, rows, 1024):
                    solvers.unfold(x[first : first + 1024], prepared, k=args.k)
                direct = rows / (time.perf_counter() - started)
                print(
                    f"{rows:>8} rows: job {speed:7.0f} rows/s, in-process {direct:7.0f} rows/s "
                    f"(ratio {speed / direct:.2f}); server peak RSS {peak[0] / 2**20:.0f} MiB, "
                    f"RssAnon {peak[1] / 2**20:.0f} MiB"
                )
            if args.memory_rows:
                k = args.memory_k
                run_job(client, inputs / f"{sizes[0]}.npy", server.pid, k)  # compiles
                for rows in (sizes[0], args.memory_rows):
                    speed, peak = run_job(client, inputs / f"{rows}.npy", server.pid, k)
                    print(
                        f"{rows:>8} rows, OMP k={k}: job {speed:7.0f} rows/s; server peak RSS "
                        f"{peak[0] / 2**20:.0f} MiB, RssAnon {peak[1] / 2**20:.0f} MiB"
                    )
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.ray:
        np.save(data / "dictionary.npy", directions)
        source, runs = inputs / f"{sizes[1]}.npy", []
        for where in ([], ["--ray", "local"], [], ["--ray", "local"]):
            output = data / f"codes-{len(runs)}"
            runs.append(unfold_run(data / "dictionary.npy", source, output, "--k", args.k, *where))
        here, ray = np.median(runs[0::2]), np.median(runs[1::2])
        print(
            f"unfold run, {sizes[1]} rows, OMP k={args.k}: in-process {here:.0f} rows/s, "
            f"Ray (local, one actor) {ray:.0f} rows/s (ratio {ray / here:.2f}; runs {runs})"
        )


if __name__ == "__main__":
    main()
