"""A bounded soak of a real `unfold serve` on 127.0.0.1 (`make soak`).

For `--seconds` (default 120) at `--concurrency` (default 64) callers, asyncio + httpx send a
mix of single-row unfolds, 64-row batches (JSON and `.npy`) and a few hostile requests (a bad
`k`, a body over the limit, complex `.npy`) to the demo dictionary. The server's RSS
(/proc/<pid>/status VmRSS) is sampled every few seconds. Then two maximal-cost requests (ISTA
with the largest `max_iter` the server accepts, under a short UNFOLD_REQUEST_TIMEOUT_S) run
while single-row callers go on: each of those must be answered within its deadline.

Reports requests, answers by status, p50/p99 latency, RSS after warm-up and at the end; exits
1 on unexpected answers (5xx, connection errors, a 4xx other than the hostile requests' own),
on RSS growth past `--rss-growth` (default 15%) after warm-up, or on a caller not answered in
time while the maximal-cost requests run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.demo import demo_dictionary  # noqa: E402

UNFOLD = "/v1/dictionaries/demo/unfold"
DIRECTIONS = demo_dictionary()[0]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def two_features(rng: random.Random) -> tuple[list[float], set[int]]:
    a, b = rng.sample(range(32), 2)
    return (DIRECTIONS[a] + 0.5 * DIRECTIONS[b]).tolist(), {a, b}


BATCH = np.stack([DIRECTIONS[i % 32] + DIRECTIONS[(i * 7 + 3) % 32] for i in range(64)])
BATCH_NPY = npy(BATCH.astype(np.float32))
COMPLEX_NPY = npy(BATCH[:1].astype(np.complex64))
# (name, expected statuses): the hostile requests and what they must get.
HOSTILE = {"bad-k": {422}, "oversize": {413}, "complex": {422}}


async def one_request(client: httpx.AsyncClient, rng: random.Random, kind: str):
    """Send one request of `kind`; return (status, ok) where ok says the answer was expected."""
    if kind == "single":
        row, support = two_features(rng)
        response = await client.post(UNFOLD, json={"activations": row, "k": 2})
        ok = response.status_code == 200 and set(response.json()["codes"][0]["indices"]) == support
    elif kind == "batch-json":
        response = await client.post(UNFOLD, json={"activations": BATCH.tolist(), "k": 2})
        ok = response.status_code == 200 and len(response.json()["l0"]) == 64
    elif kind == "batch-npy":
        response = await client.post(
            UNFOLD, content=BATCH_NPY, params={"k": "2"},
            headers={"content-type": "application/x-npy"},
        )  # fmt: skip
        ok = response.status_code == 200 and len(response.json()["l0"]) == 64
    elif kind == "bad-k":
        response = await client.post(UNFOLD, json={"activations": BATCH[0].tolist(), "k": 0})
        ok = response.status_code in HOSTILE[kind]
    elif kind == "oversize":
        body = b"[" + b" " * (2**20 + 1024)  # just past the soak server's 1 MiB body limit
        response = await client.post(
            UNFOLD, content=body, headers={"content-type": "application/json"}
        )
        ok = response.status_code in HOSTILE[kind]
    else:  # complex
        response = await client.post(
            UNFOLD, content=COMPLEX_NPY, headers={"content-type": "application/x-npy"}
        )
        ok = response.status_code in HOSTILE[kind]
    return response.status_code, ok


KINDS = ["single"] * 85 + ["batch-json"] * 6 + ["batch-npy"] * 6 + ["bad-k", "oversize", "complex"]


async def caller(client, seed: int, stop_at: float, stats: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind = rng.choice(KINDS)
        start = time.perf_counter()
        try:
            status, ok = await one_request(client, rng, kind)
        except httpx.HTTPError as error:
            # A server may answer 413 as soon as it reads Content-Length and close the
            # connection while the body is still being sent: for that request, not an error.
            early_close = kind == "oversize" and isinstance(error, httpx.TransportError)
            status, ok = f"connection error ({type(error).__name__})", early_close
        stats["latencies"].append(time.perf_counter() - start)
        stats["statuses"][(kind, status)] += 1
        if not ok:
            stats["unexpected"][(kind, status)] += 1


async def sample_rss(pid: int, stop_at: float, every: float, samples: list) -> None:
    while time.monotonic() < stop_at:
        samples.append((time.monotonic(), rss_bytes(pid)))
        await asyncio.sleep(every)


async def load(base_url: str, pid: int, seconds: float, concurrency: int, warmup: float):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        stats = {"latencies": [], "statuses": Counter(), "unexpected": Counter()}
        start = time.monotonic()
        stop_at = start + seconds
        samples: list = []
        await asyncio.gather(
            sample_rss(pid, stop_at, 3.0, samples),
            *(caller(client, seed, stop_at, stats) for seed in range(concurrency)),
        )
        samples.append((time.monotonic(), rss_bytes(pid)))
        after_warmup = [rss for at, rss in samples if at >= start + warmup] or [samples[-1][1]]
        return stats, after_warmup[0], samples[-1][1], time.monotonic() - start


async def under_maximal_cost(base_url: str, max_iter: int, deadline_s: float) -> dict:
    """Two ISTA requests of the largest accepted max_iter, with single-row callers meanwhile."""
    async with httpx.AsyncClient(base_url=base_url, timeout=deadline_s * 4) as client:
        heavy_body = {
            "activations": (BATCH * 0.37).tolist(), "method": "ista", "alpha": 1e-9,
            "tol": 0.0, "max_iter": max_iter,
        }  # fmt: skip
        heavy = [asyncio.create_task(client.post(UNFOLD, json=heavy_body)) for _ in range(2)]
        await asyncio.sleep(0.5)
        late, answered, statuses = [], 0, Counter()
        rng = random.Random(1)
        stop_at = time.monotonic() + deadline_s * 1.5
        while time.monotonic() < stop_at:
            row, _ = two_features(rng)
            start = time.perf_counter()
            try:
                response = await client.post(UNFOLD, json={"activations": row, "k": 2})
                statuses[response.status_code] += 1
                ok = response.status_code == 200
            except httpx.HTTPError:
                statuses["connection error"] += 1
                ok = False
            took = time.perf_counter() - start
            answered += 1
            if not ok or took > deadline_s:
                late.append(round(took, 2))
            await asyncio.sleep(0.05)
        heavy_statuses = []
        for task in heavy:
            try:
                heavy_statuses.append((await task).status_code)
            except httpx.HTTPError as error:
                heavy_statuses.append(type(error).__name__)
        return {"answered": answered, "late_or_failed": late, "statuses": dict(statuses),
                "heavy": heavy_statuses}  # fmt: skip


def largest_max_iter(client: httpx.Client) -> int:
    """The largest ISTA max_iter the server accepts (bisection on 422), capped at 10**7."""
    row = DIRECTIONS[0].tolist()
    low, high = 1, 10**7

    def accepted(value: int) -> bool:
        body = {"activations": row, "method": "ista", "alpha": 0.5, "max_iter": value}
        return client.post(UNFOLD, json=body, timeout=120).status_code != 422

    if accepted(high):
        return high
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    return low


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=15, help="seconds before RSS is taken")
    parser.add_argument("--rss-growth", type=float, default=0.15)
    parser.add_argument(
        "--deadline", type=float, default=5.0, help="server's request timeout; callers' deadline"
    )
    args = parser.parse_args(argv)
    warmup = min(args.warmup, args.seconds / 3)
    port = _free_port()
    data_dir = tempfile.mkdtemp(prefix="unfold-soak-")
    env = {
        **os.environ, "UNFOLD_DEMO": "true", "UNFOLD_LOG_LEVEL": "warning",
        "UNFOLD_REQUEST_TIMEOUT_S": str(args.deadline), "UNFOLD_MAX_BODY_BYTES": str(2**20),
    }  # fmt: skip
    log = open(Path(data_dir) / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", data_dir],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    failures = []
    try:
        with httpx.Client(base_url=base_url) as client:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    print("server exited at start-up", file=sys.stderr)
                    return 1
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    print("server not ready in 180 s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            # The steady state: the demo's report (computed once, in the background) is done.
            while client.get("/v1/dictionaries/demo/report").status_code == 202:
                if time.monotonic() > deadline:
                    print("the demo's report not ready in 180 s", file=sys.stderr)
                    return 1
                time.sleep(1.0)
            max_iter = largest_max_iter(client)
        stats, rss_start, rss_end, took = asyncio.run(
            load(base_url, server.pid, args.seconds, args.concurrency, warmup)
        )
        heavy = asyncio.run(under_maximal_cost(base_url, max_iter, args.deadline))
        latencies = stats["latencies"]
        print(f"soak: {took:.0f} s at concurrency {args.concurrency}: {len(latencies)} requests "
              f"({len(latencies) / took:.0f}/s)")  # fmt: skip
        by_status = Counter()
        for (kind, status), count in stats["statuses"].items():
            by_status[f"{kind} {status}"] += count
        print("  answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))
        print(f"  latency p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
              f"p99 {percentile(latencies, 99) * 1e3:.1f} ms")  # fmt: skip
        growth = rss_end / rss_start - 1
        print(
            f"  RSS after {warmup:.0f} s warm-up {rss_start / 2**20:.0f} MiB, at the end "
            f"{rss_end / 2**20:.0f} MiB ({growth:+.1%}; bound {args.rss_growth:.0%})"
        )
        print(f"  two ISTA requests with max_iter={max_iter} (the largest accepted): "
              f"answered {heavy['heavy']}; meanwhile {heavy['answered']} single-row requests, "
              f"statuses {heavy['statuses']}, late (> {args.deadline} s) or failed: "
              f"{heavy['late_or_failed'] or 'none'}")  # fmt: skip
        if stats["unexpected"]:
            failures.append(f"unexpected answers: {dict(stats['unexpected'])}")
        if growth > args.rss_growth:
            failures.append(f"RSS grew {growth:.1%} after warm-up (bound {args.rss_growth:.0%})")
        if heavy["late_or_failed"]:
            failures.append(
                f"{len(heavy['late_or_failed'])} caller(s) not answered within "
                f"{args.deadline} s while two maximal-cost requests ran"
            )
        if server.poll() is not None:
            failures.append(f"server exited with {server.returncode}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            failures.append("server did not stop on SIGTERM")
        log.close()
    for failure in failures:
        print(f"SOAK FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("soak passed")
    return 1 if failures else 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
