"""Unfolding datasets on a real Ray cluster (two nodes, on 127.0.0.1 only): `unfold run --ray`
and the server's jobs with `UNFOLD_RAY_ADDRESS` give the in-process codes exactly.

Ray runs only in child processes (the cluster, `unfold run`, `unfold serve`): the test process
never imports it, so nothing of Ray stays in the process that runs the other suites."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from service.cli import main
from tests.service.conftest import running_client
from tests.service.test_datasets import read_shards
from tests.service.test_faults import server_process
from tests.service.test_jobs import DIRECTIONS, finished, rows, upload

pytestmark = pytest.mark.slow

# Ray's node-address lookup then answers 127.0.0.1 in every process that joins (REFERENCES.md).
RAY_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

CLUSTER = """
import sys
from ray.cluster_utils import Cluster

node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 200 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
cluster.add_node(**node)
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def address():
    """A head node and one more, each of one CPU, bound to 127.0.0.1, in a child process."""
    if importlib.util.find_spec("ray") is None:  # found, not imported
        pytest.skip("Ray is not installed (the ray extra; make test installs it)")
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=RAY_ENV, text=True,
    )  # fmt: skip
    try:
        address = process.stdout.readline().strip()
        assert address.startswith("127."), address
        yield address
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def run_on_ray(*argv) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, argv)],
        capture_output=True, text=True, env=RAY_ENV, timeout=300, check=False,
    )  # fmt: skip
    return done.returncode, done.stderr


def python(code: str) -> str:
    """The last line `code` prints, run in a child process (with Ray)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=RAY_ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]  # Ray may print before


def test_unfold_run_on_ray_equals_the_in_process_run(address, tmp_path, capsys):
    directions = tmp_path / "dictionary.npy"
    np.save(directions, DIRECTIONS)
    data = tmp_path / "activations"
    data.mkdir()
    x = rows(2500, seed=3)
    np.save(data / "a.npy", x[:1100])
    np.save(data / "b.npy", x[1100:])
    common = ["--k", 5, "--shard-rows", 600, "--batch-size", 256, "--quiet"]

    code, err = run(capsys, "run", directions, data, tmp_path / "here", *common)
    assert code == 0, err
    code, err = run_on_ray("run", directions, data, tmp_path / "ray", *common, "--ray", address)
    assert code == 0, err
    here, there = read_shards(tmp_path / "here"), read_shards(tmp_path / "ray")
    assert set(here) == set(there)
    for name in here:
        np.testing.assert_array_equal(there[name], here[name], err_msg=name)
    single = tmp_path / "codes.safetensors"
    code, err = run_on_ray("run", directions, data, single, *common, "--ray", address)
    assert code == 0, err
    np.testing.assert_array_equal(load_file(single)["indices"], here["indices"])

    # The pool has an actor per node, each holding its node's CPU.
    connected = f"from service import cluster; cluster.connect({address!r})"
    assert python(f"{connected}; print(cluster.pool(5))") == "(2, 1.0, 0.0)"


def test_lasso_on_ray_and_errors(address, tmp_path, capsys):
    directions = tmp_path / "dictionary.npy"
    np.save(directions, DIRECTIONS)
    x = rows(700, seed=4)
    np.save(tmp_path / "x.npy", x)
    common = ["--method", "lasso", "--alpha", 0.05, "--shard-rows", 300, "--quiet"]
    code, err = run(capsys, "run", directions, tmp_path / "x.npy", tmp_path / "a", *common)
    assert code == 0, err
    code, err = run_on_ray(
        "run", directions, tmp_path / "x.npy", tmp_path / "b", *common, "--ray", address
    )
    assert code == 0, err
    here, there = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    np.testing.assert_array_equal(there["indices"], here["indices"])
    np.testing.assert_array_equal(there["values"], here["values"])

    # A k the dictionary cannot take: refused before the cluster does anything, in one line.
    too_many = DIRECTIONS.shape[0] + 1
    code, err = run_on_ray(
        "run", directions, tmp_path / "x.npy", tmp_path / "c", "--k", too_many, "--ray", address
    )
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("unfold: error: k must be") and str(too_many) in last
    code, err = run(
        capsys, "run", "demo", tmp_path / "x.npy", tmp_path / "d", "--ray", address, "--url",
        "http://127.0.0.1:9",
    )  # fmt: skip
    assert code == 1 and "pick one" in err

    # What fails on the cluster itself (here: an input the actors cannot read) is one line, the
    # remote exception's.
    said = python(
        "import numpy as np\n"
        "from service import cluster\n"
        "from service.datasets import Shard\n"
        f"directions = np.load({str(directions)!r})\n"
        "try:\n"
        f"    list(cluster.unfold_shards({address!r}, directions, None, 'omp', {{'k': 3}},\n"
        f"         {str(tmp_path / 'gone.npy')!r}, None, [Shard(0, 0, 700)], 256))\n"
        "except cluster.ClusterError as error:\n"
        "    print(error)\n"
    )
    assert said.startswith("the Ray job failed:") and "gone.npy: no such file" in said, said


def test_server_jobs_on_ray_equal_in_process_jobs(address, tmp_path):
    x = rows(3000, seed=5)
    with running_client(tmp_path / "here", job_shard_rows=1000) as client:
        created = upload(client, x, k=4, certify="true")
        assert created.status_code == 202, created.text
        job = finished(client, created.json()["id"])
        assert job["state"] == "succeeded", job
        expected = load(client.get(f"/v1/jobs/{job['id']}/result").content)
    ray_env = {"UNFOLD_RAY_ADDRESS": address, "UNFOLD_JOB_SHARD_ROWS": "1000",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    with server_process(tmp_path / "ray", env=ray_env) as (_, client):
        created = upload(client, x, k=4, certify="true")
        assert created.status_code == 202, created.text
        job = finished(client, created.json()["id"])
        assert job["state"] == "succeeded" and job["rows_done"] == 3000, job
        got = load(client.get(f"/v1/jobs/{job['id']}/result").content)
        toy = np.zeros((4, 20), np.float32)  # the toy model has an encoder; the actors do not
        refused = upload(client, toy, dictionary="toy-model", compare_encoder="true")
        error = refused.json()["error"]
        assert refused.status_code == 422 and error["code"] == "no_encoder", error
        assert "solves jobs on Ray" in error["message"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_cancelled_ray_job_stops_within_a_batch(address, tmp_path):
    # One shard of 600,000 rows of ISTA (about 3,500 rows/s on this machine's two cores, so
    # minutes on one actor): a cancel that waited for the shard would hold the one job slot
    # that long. The actors ask before each batch of 1024 rows, so the next job runs at once.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    np.save(inputs / "long.npy", rows(600_000, seed=7))
    np.save(inputs / "short.npy", rows(2000, seed=8))
    ray_env = {"UNFOLD_RAY_ADDRESS": address, "UNFOLD_JOB_SHARD_ROWS": "1000000",
               "UNFOLD_JOB_INPUT_DIRS": str(inputs),
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    ista = {"dictionary": "demo", "method": "ista", "alpha": 0.01, "tol": 1e-7, "max_iter": 20000}
    with server_process(tmp_path / "ray", env=ray_env) as (_, client):
        long = client.post("/v1/jobs", json={"input": str(inputs / "long.npy"), **ista})
        assert long.status_code == 202, long.text
        long_id = long.json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{long_id}").json()["state"] != "running":
            assert time.monotonic() < deadline, "the long job did not start"
            time.sleep(0.2)
        time.sleep(5)  # the actors started and solving
        assert client.get(f"/v1/jobs/{long_id}").json()["rows_done"] == 0
        cancelled_at = time.monotonic()
        assert client.delete(f"/v1/jobs/{long_id}").status_code == 200
        short = client.post("/v1/jobs", json={"input": str(inputs / "short.npy"), **ista})
        job = finished(client, short.json()["id"], timeout=240)
        took = time.monotonic() - cancelled_at
        assert job["state"] == "succeeded" and job["rows_done"] == 2000, job
        long = client.get(f"/v1/jobs/{long_id}").json()
        assert long["state"] == "cancelled" and long["rows_done"] == 0, long
    # The next job ran as soon as the slot was free: well before the long shard could end.
    assert took < 60, took
