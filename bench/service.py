"""Service benchmark: a real `unfold serve` process on 127.0.0.1, measured from outside.

(a) single-vector requests at several concurrencies, dynamic batching on and off (two servers
    side by side, measured in turns): rows/s and p50/p99 latency, and the batching speed-up;
(b) one batch via JSON and via `.npy` (answer as safetensors) against `solvers.unfold` called
    in-process on the same data.

    python bench/service.py            # full run (a few minutes)
    python bench/service.py --quick    # small smoke run
    python bench/service.py --single-only --single-repeats 5   # (a) alone, more repeats
    python bench/service.py --n-features 24576 --d-model 768   # GPT-2 small SAE's shape

After each measurement the bench waits until the server has nothing queued or running (requests
the load generator left behind), so one measurement's backlog does not slow the next.

Every figure is a median over repeats where repeated; numbers from a shared 2-core machine are
noisy: read the ratios. The load of (a) comes from `wrk` (Debian package `wrk`) when it is on
the PATH: a Python client on the same two cores would be the bottleneck (httpx tops out near
150-250 requests/s here); without wrk the bench falls back to httpx and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# This folder holds bench/solvers.py: put the repository first so `solvers` is the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def problem(n_features: int, d_model: int, batch: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_features, d_model)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((batch, n_features), np.float32)
    for row in codes:
        row[rng.choice(n_features, k, replace=False)] = rng.uniform(0.5, 2.0, k)
    noise = 0.01 * rng.standard_normal((batch, d_model)).astype(np.float32)
    return dictionary, codes, codes @ dictionary + noise


@contextlib.contextmanager
def server(batching: bool, max_batch_size: int):
    """A fresh `unfold serve` (own data dir, no demo) on a free loopback port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "UNFOLD_DATA_DIR": data_dir,
            "UNFOLD_PORT": str(port),
            "UNFOLD_DEMO": "false",
            "UNFOLD_REPORTS": "false",  # no background analysis beside the measured load
            "UNFOLD_BATCHING": str(batching).lower(),
            "UNFOLD_MAX_BATCH_SIZE": str(max_batch_size),
            "UNFOLD_LOG_LEVEL": "warning",
            "UNFOLD_MAX_BODY_BYTES": str(1 << 30),  # room for large dictionaries' uploads
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                        break
                time.sleep(0.2)
            else:
                raise RuntimeError("server did not become ready")
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def register(base: str, dictionary: np.ndarray) -> str:
    response = httpx.post(
        base + "/v1/dictionaries?name=bench",
        content=npy(dictionary),
        headers={"content-type": "application/x-npy"},
        timeout=120,
    )
    response.raise_for_status()
    ref = response.json()["id"]
    deadline = time.monotonic() + 600  # the server compiles its default programs meanwhile
    while not httpx.get(f"{base}/v1/dictionaries/{ref}", timeout=30).json()["warm"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the dictionary was not warmed in time")
        time.sleep(0.5)
    return ref


def warm(base: str, ref: str, activations: np.ndarray, k: int, max_batch_size: int) -> None:
    """Compile every batch size a merged call can have (powers of two: the solver pads to them),
    so the timed runs measure serving, not compilation."""
    size = 1
    while True:
        response = httpx.post(
            f"{base}/v1/dictionaries/{ref}/unfold?k={k}",
            content=npy(activations[:size]),
            headers={"content-type": "application/x-npy"},
            timeout=600,
        )
        response.raise_for_status()
        if size >= max_batch_size:
            return
        size *= 2


async def single_vectors(base: str, ref: str, rows: np.ndarray, k: int, concurrency: int):
    """Send each row as its own JSON request, `concurrency` at a time: (seconds, latencies)."""
    latencies: list[float] = []
    queue = iter(range(len(rows)))
    url = f"{base}/v1/dictionaries/{ref}/unfold"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker():
            for i in queue:
                start = time.perf_counter()
                response = await client.post(url, json={"activations": rows[i].tolist(), "k": k})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def metric_totals(base: str) -> dict[str, float]:
    """The server's metric samples by name, summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


SOLVER_TOTALS = ("unfold_batch_size_count", "unfold_batch_size_sum", "unfold_solver_seconds_sum")


def solver_work(before: dict, after: dict, seconds: float) -> tuple[float, float]:
    """(mean rows per solver call, solver seconds per second of wall time) between two
    `metric_totals`: the second is the share of the time a call was running (above 1 when
    calls overlap)."""
    calls, rows, busy = (after.get(n, 0.0) - before.get(n, 0.0) for n in SOLVER_TOTALS)
    return rows / max(calls, 1), busy / seconds


def wait_idle(base: str, limit_s: float = 300) -> None:
    """Wait until the server has no rows queued or being solved: requests a load generator
    left behind (unbatched ones are solved even after their client has gone) must not take
    CPU from the next measurement, on either server."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if metric_totals(base).get("unfold_queue_depth", 0) == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{base} still busy after {limit_s:g} s")


def wrk_load(url: str, body: dict, concurrency: int, seconds: int) -> tuple[float, float, float]:
    """(requests/s, p50 s, p99 s) of `wrk` posting `body` as JSON with `concurrency`
    connections for `seconds`; non-2xx answers make it fail."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error answers:\n{out}")

    def latency(label: str) -> float:
        value = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s|m)\s*$", out, flags=re.M)
        if value is None:
            raise RuntimeError(f"no {label} latency in the output of wrk:\n{out}")
        return float(value.group(1)) * WRK_UNITS[value.group(2)]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate, latency("50%"), latency("99%")


def bench_single(args, dictionary, activations) -> None:
    """Both servers (batching off and on) run side by side, idle but for the one measured; each
    concurrency level is measured on one then the other, `--single-repeats` times, so a load
    that drifts on a shared machine hits both alike. Figures are medians over the repeats."""
    use_wrk = shutil.which("wrk") is not None and not args.httpx
    load = f"wrk, {args.seconds} s per level" if use_wrk else f"httpx, {args.requests} requests"
    print(
        f"\n(a) single-vector JSON requests, k={args.k}, load from {load}, median of "
        f"{args.single_repeats} (off and on alternate)"
    )
    samples: dict[tuple[bool, int], list[tuple[float, float, float]]] = {}
    with contextlib.ExitStack() as stack:
        targets = {}
        for batching in (False, True):
            base = stack.enter_context(server(batching, args.max_batch_size))
            ref = register(base, dictionary)
            warm(base, ref, activations, args.k, args.max_batch_size)
            targets[batching] = base, ref
        for _ in range(args.single_repeats):
            for concurrency in args.concurrency:
                for batching, (base, ref) in targets.items():
                    before = metric_totals(base)
                    if use_wrk:
                        body = {"activations": activations[0].tolist(), "k": args.k}
                        url = f"{base}/v1/dictionaries/{ref}/unfold"
                        rate, p50, p99 = wrk_load(url, body, concurrency, args.seconds)
                        seconds = args.seconds
                    else:
                        rows = activations[: args.requests]
                        seconds, latencies = asyncio.run(
                            single_vectors(base, ref, rows, args.k, concurrency)
                        )
                        rate = len(rows) / seconds
                        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                    work = solver_work(before, metric_totals(base), seconds)
                    samples.setdefault((batching, concurrency), []).append((rate, p50, p99, *work))
                    wait_idle(base)
    header = (
        f"{'batching':>8} {'conc':>5} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'rows/s range':>14} {'rows/call':>9} {'solver busy':>11}"
    )
    print(header + "\n" + "-" * len(header))
    rates: dict[tuple[bool, int], float] = {}
    for batching in (False, True):
        for concurrency in args.concurrency:
            runs = samples[batching, concurrency]
            rate, p50, p99, batch, busy = (
                statistics.median(column) for column in zip(*runs, strict=True)
            )
            low, high = min(r[0] for r in runs), max(r[0] for r in runs)
            rates[batching, concurrency] = rate
            print(
                f"{'on' if batching else 'off':>8} {concurrency:>5} {rate:>9.0f} "
                f"{1e3 * p50:>8.1f} {1e3 * p99:>8.1f} {f'{low:.0f}-{high:.0f}':>14} "
                f"{batch:>9.1f} {busy:>11.0%}"
            )
    print(
        "rows/call: mean rows per solver call; solver busy: solver-call seconds per second "
        "(above 100% when calls overlap)"
    )
    for concurrency in args.concurrency:
        ratio = rates[True, concurrency] / rates[False, concurrency]
        print(f"batching speed-up at concurrency {concurrency}: {ratio:.2f}x (of median rows/s)")


def bench_batch(args, dictionary, activations) -> None:
    rows = activations[: args.batch]
    print(f"\n(b) one batch of {len(rows)} rows, k={args.k}, median of {args.repeats}")
    prepared = solvers.prepare(dictionary)
    solvers.unfold(rows, prepared, k=args.k)  # compile
    times = {"in-process solvers.unfold": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        solvers.unfold(rows, prepared, k=args.k)
        times["in-process solvers.unfold"].append(time.perf_counter() - start)
    with server(True, args.max_batch_size) as base:
        ref = register(base, dictionary)
        url = f"{base}/v1/dictionaries/{ref}/unfold"
        requests = {
            "HTTP .npy -> safetensors": dict(
                url=url + f"?k={args.k}",
                content=npy(rows),
                headers={
                    "content-type": "application/x-npy",
                    "accept": "application/vnd.safetensors",
                },
            ),
            "HTTP JSON -> JSON": dict(url=url, json={"activations": rows.tolist(), "k": args.k}),
        }
        with httpx.Client(timeout=600) as client:
            for name, request in requests.items():
                client.post(**request).raise_for_status()  # compile
                times[name] = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    client.post(**request).raise_for_status()
                    times[name].append(time.perf_counter() - start)
    base_time = statistics.median(times["in-process solvers.unfold"])
    header = f"{'path':<28} {'seconds':>8} {'rows/s':>9} {'vs in-process':>14}"
    print(header + "\n" + "-" * len(header))
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<28} {median:>8.3f} {len(rows) / median:>9.0f} {base_time / median:>13.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-features", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64]
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (b)")
    parser.add_argument(
        "--single-repeats", type=int, default=3, help="repeats of each level of (a)"
    )
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per level")
    parser.add_argument("--httpx", action="store_true", help="load from httpx even with wrk")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--single-only", action="store_true", help="run (a) only")
    args = parser.parse_args()
    if args.quick:
        args.n_features, args.d_model, args.k = 1024, 128, 8
        args.requests, args.batch, args.repeats, args.seconds = 128, 512, 1, 3
        args.single_repeats = 1
    print(
        f"dictionary {args.n_features} x {args.d_model}, JAX {solvers.__name__} on "
        f"{__import__('jax').default_backend()}"
    )
    dictionary, _, activations = problem(
        args.n_features, args.d_model, max(args.requests, args.batch), args.k
    )
    bench_single(args, dictionary, activations)
    if not args.single_only:
        bench_batch(args, dictionary, activations)


if __name__ == "__main__":
    main()
