"""Unfolding datasets on a real Ray cluster (two nodes, on 127.0.0.1 only): `unfold run --ray`
and the server's jobs with `UNFOLD_RAY_ADDRESS` give the in-process codes exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from service import cluster
from service.cli import main
from service.datasets import Shard
from tests.service.conftest import running_client
from tests.service.test_datasets import read_shards
from tests.service.test_jobs import DIRECTIONS, finished, rows, upload

# Before Ray is imported: its node-address lookup then answers 127.0.0.1 (REFERENCES.md).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

OBJECT_STORE_BYTES = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def address():
    """A head node and one more, each of one CPU, bound to 127.0.0.1 (REFERENCES.md)."""
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    node["object_store_memory"] = OBJECT_STORE_BYTES
    two_nodes = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        two_nodes.add_node(**node)
        assert two_nodes.address.startswith("127."), two_nodes.address
        yield two_nodes.address
    finally:
        ray.shutdown()
        cluster._connected = None
        two_nodes.shutdown()


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


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
    code, err = run(capsys, "run", directions, data, tmp_path / "ray", *common, "--ray", address)
    assert code == 0, err
    here, there = read_shards(tmp_path / "here"), read_shards(tmp_path / "ray")
    assert set(here) == set(there)
    for name in here:
        np.testing.assert_array_equal(there[name], here[name], err_msg=name)

    # The actors were spread over both nodes, and what one run wrote another resumes.
    assert cluster.pool(shards=5) == (2, 1.0, 0.0)
    single = tmp_path / "codes.safetensors"
    code, err = run(capsys, "run", directions, data, single, *common, "--ray", address)
    assert code == 0, err
    np.testing.assert_array_equal(load_file(single)["indices"], here["indices"])


def test_lasso_on_ray_and_errors_from_the_actors(address, tmp_path, capsys):
    directions = tmp_path / "dictionary.npy"
    np.save(directions, DIRECTIONS)
    x = rows(700, seed=4)
    np.save(tmp_path / "x.npy", x)
    common = ["--method", "lasso", "--alpha", 0.05, "--shard-rows", 300, "--quiet"]
    code, err = run(capsys, "run", directions, tmp_path / "x.npy", tmp_path / "a", *common)
    assert code == 0, err
    code, err = run(
        capsys, "run", directions, tmp_path / "x.npy", tmp_path / "b", *common, "--ray", address
    )
    assert code == 0, err
    here, there = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    np.testing.assert_array_equal(there["indices"], here["indices"])
    np.testing.assert_array_equal(there["values"], here["values"])

    # A k the dictionary cannot take: refused by the actors, said as the in-process run says it.
    too_many = DIRECTIONS.shape[0] + 1
    code, err = run(
        capsys, "run", directions, tmp_path / "x.npy", tmp_path / "c", "--k", too_many,
        "--quiet", "--ray", address,
    )  # fmt: skip
    assert code == 1 and "k" in err and str(DIRECTIONS.shape[0]) in err, err
    code, err = run(
        capsys, "run", "demo", tmp_path / "x.npy", tmp_path / "d", "--ray", address, "--url",
        "http://127.0.0.1:9",
    )  # fmt: skip
    assert code == 1 and "pick one" in err

    # What fails on the cluster itself (here: an input the actors cannot read) is said in one
    # line, the remote exception's.
    shards = [Shard(0, 0, 700)]
    solved = cluster.unfold_shards(
        address, DIRECTIONS, None, "omp", {"k": 3}, tmp_path / "gone.npy", None, shards, 256
    )
    with pytest.raises(cluster.ClusterError, match=r"failed: .*gone\.npy: no such file"):
        list(solved)


def test_server_jobs_on_ray_equal_in_process_jobs(address, tmp_path):
    x = rows(3000, seed=5)
    expected = {}
    for where, overrides in (("here", {}), ("ray", {"ray_address": address})):
        with running_client(tmp_path / where, job_shard_rows=1000, **overrides) as client:
            created = upload(client, x, k=4, certify="true")
            assert created.status_code == 202, created.text
            job = finished(client, created.json()["id"])
            assert job["state"] == "succeeded" and job["rows_done"] == 3000, job
            expected[where] = load(client.get(f"/v1/jobs/{job['id']}/result").content)
            if overrides:
                toy = np.zeros((4, 20), np.float32)  # the toy model has an encoder, not Ray
                refused = upload(client, toy, dictionary="toy-model", compare_encoder="true")
                error = refused.json()["error"]
                assert refused.status_code == 422 and error["code"] == "no_encoder", error
                assert "solves jobs on Ray" in error["message"]
    assert set(expected["here"]) == set(expected["ray"])
    for name, value in expected["here"].items():
        np.testing.assert_array_equal(expected["ray"][name], value, err_msg=name)
