"""`/v1/jobs`: datasets unfolded in the background, durable across a SIGKILL, cancellable,
reading only what the operator allows; bad inputs refused before any work."""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load

import solvers
from service.demo import demo_dictionary
from tests.service.conftest import running_client
from tests.service.helpers import npy_bytes, read_log
from tests.service.test_faults import server_process

DIRECTIONS = demo_dictionary()[0]
D_MODEL = DIRECTIONS.shape[1]


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D_MODEL)).astype(np.float32)


def upload(client, x: np.ndarray, name: str = "acts.npy", **fields):
    body = npy_bytes(x) if name.endswith(".npy") else x
    data = {"dictionary": "demo", **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/jobs", files={"file": (name, body)}, data=data)


def finished(client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_a_20000_row_job_over_http_matches_solvers_unfold(tmp_path):
    x = rows(20_000)
    with running_client(tmp_path, job_shard_rows=3000) as client:
        created = upload(client, x, k=3)
        assert created.status_code == 202, created.text
        job = created.json()
        assert created.headers["location"] == f"/v1/jobs/{job['id']}"
        assert (job["state"], job["rows_total"], job["params"]) == ("queued", 20_000, {"k": 3})
        assert client.get(f"/v1/jobs/{job['id']}/result").status_code in (409, 200)
        done = finished(client, job["id"])
        assert done["state"] == "succeeded" and done["rows_done"] == 20_000, done
        assert done["rows_per_s"] > 0 and done["error"] is None
        result = load(client.get(f"/v1/jobs/{job['id']}/result").content)
        expected = solvers.unfold(x, DIRECTIONS, k=3)
        np.testing.assert_array_equal(result["indices"], expected.indices)
        np.testing.assert_allclose(result["values"], expected.values, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(result["status"], expected.status)

        features = client.get(f"/v1/jobs/{job['id']}/features", params={"top": 5}).json()
        fired = expected.indices[(expected.indices >= 0) & (expected.values != 0)]
        counts = np.bincount(fired, minlength=DIRECTIONS.shape[0])
        assert features["rows"] == 20_000 and features["firing"] == int((counts > 0).sum())
        top = features["top"]
        assert [f["count"] for f in top] == sorted(counts, reverse=True)[:5]
        assert top[0]["label"] and top[0]["frequency"] == pytest.approx(top[0]["count"] / 20_000)
        shards = client.get(f"/v1/jobs/{job['id']}/shards").json()["shards"]
        assert [(s["start"], s["rows"]) for s in shards] == [
            (start, min(3000, 20_000 - start)) for start in range(0, 20_000, 3000)
        ]
        pieces = [load(client.get(s["url"]).content)["indices"] for s in shards]
        np.testing.assert_array_equal(np.concatenate(pieces), expected.indices)
        assert client.get(f"/v1/jobs/{job['id']}/shards/99").status_code == 404
        every = load(
            client.get(
                f"/v1/jobs/{job['id']}/features",
                headers={"accept": "application/vnd.safetensors"},
            ).content
        )
        np.testing.assert_array_equal(every["count"], counts)

        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job["id"]]
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200  # finished: deleted
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert not list((tmp_path / "jobs").iterdir())  # its files and its upload are gone


def test_server_side_inputs_only_under_the_allowed_folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "shards").mkdir(parents=True)
    outside.mkdir()
    x = rows(50, seed=1)
    np.save(allowed / "shards" / "0.npy", x[:30])
    np.save(allowed / "shards" / "1.npy", x[30:])
    np.save(outside / "secret.npy", x)
    (allowed / "link.npy").symlink_to(outside / "secret.npy")
    (allowed / "mixed").mkdir()
    (allowed / "mixed" / "a.npy").symlink_to(outside / "secret.npy")
    body = {"dictionary": "demo", "method": "lasso", "alpha": 0.1}
    data_dir = tmp_path / "data"
    with running_client(data_dir, job_input_dirs=[allowed]) as client:
        created = client.post("/v1/jobs", json={**body, "input": str(allowed / "shards")})
        assert created.status_code == 202, created.text
        assert finished(client, created.json()["id"])["state"] == "succeeded"
        result = load(client.get(f"/v1/jobs/{created.json()['id']}/result").content)
        expected = solvers.unfold(x, DIRECTIONS, "lasso", alpha=0.1)
        np.testing.assert_allclose(result["values"], expected.values, atol=1e-5)
        for path, status in [
            (outside / "secret.npy", 403),
            (allowed / ".." / "outside" / "secret.npy", 403),
            (allowed / "link.npy", 403),
            (allowed / "mixed", 403),
            ("shards/0.npy", 422),
            (allowed / "missing.npy", 422),
        ]:
            refused = client.post("/v1/jobs", json={**body, "input": str(path)})
            assert refused.status_code == status, (path, refused.text)
            assert refused.json()["error"]["message"]
    with running_client(tmp_path / "other") as client:  # no folders allowed at all
        refused = client.post("/v1/jobs", json={**body, "input": str(allowed / "shards")})
        assert refused.status_code == 403 and "upload" in refused.json()["error"]["message"]


def test_bad_job_requests_are_refused_before_any_work_and_leave_nothing(tmp_path):
    with running_client(tmp_path) as client:
        x = rows(10)
        cases = [
            (upload(client, x, dictionary="nothing"), 404, "not_found"),
            (upload(client, rows(10)[:, :8]), 422, "shape_mismatch"),
            (upload(client, npy_bytes(x)[:-7], name="cut.npy"), 422, None),
            (upload(client, x, k="true"), 422, "invalid_request"),
            (upload(client, x, colour="red"), 422, "invalid_request"),
            (upload(client, x, k=10**6), 422, None),
            (upload(client, b"text", name="acts.csv"), 422, "invalid_input_file"),
            (client.post("/v1/jobs", files={"dictionary": (None, "demo")}), 422,
             "invalid_request"),  # multipart without a file
            (client.post("/v1/jobs", content=b"x", headers={"content-type": "text/csv"}), 422,
             "unsupported_media_type"),
            (client.post("/v1/jobs", json={"dictionary": "demo"}), 422, "invalid_request"),
        ]  # fmt: skip
        for response, status, code in cases:
            assert response.status_code == status, response.text
            if code is not None:
                assert response.json()["error"]["code"] == code, response.text
        assert client.get("/v1/jobs").json() == {"jobs": []}
        assert not list((tmp_path / "jobs").iterdir())
        assert client.get("/v1/jobs/nope").status_code == 404


def test_a_running_job_is_cancelled_at_once(tmp_path):
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((2048, 128)).astype(np.float32)
    endless = {"method": "ista", "alpha": 1.0, "tol": 0.0, "max_iter": 10**6}
    with running_client(tmp_path, warmup=False) as client:
        registered = client.post(
            "/v1/dictionaries", params={"name": "wide"}, content=npy_bytes(wide),
            headers={"content-type": "application/x-npy"},
        )  # fmt: skip
        assert registered.status_code == 201
        x = rng.standard_normal((64, 128)).astype(np.float32)
        created = upload(client, x, dictionary="wide", **endless)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        cancelled = client.delete(f"/v1/jobs/{job_id}").json()
        assert cancelled["state"] == "cancelled"
        started = time.monotonic()
        while client.app.state.jobs._cancels:  # the worker let go of it
            assert time.monotonic() - started < 5
            time.sleep(0.05)
        assert client.get(f"/v1/jobs/{job_id}/result").json()["error"]["code"] == "job_not_done"


@pytest.mark.slow
def test_a_job_survives_sigkill_and_ends_with_an_uninterrupted_runs_results(tmp_path):
    x = rows(30_000, seed=2)
    env = {"UNFOLD_JOB_SHARD_ROWS": "1500", "UNFOLD_LOG_LEVEL": "info"}
    params = {"method": "lasso", "alpha": "0.05"}
    data_dir = tmp_path / "data"
    with server_process(data_dir, env) as (process, client):
        job_id = upload(client, x, **params).json()["id"]
        deadline = time.monotonic() + 120
        while (done := client.get(f"/v1/jobs/{job_id}").json()["rows_done"]) < 3000:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert done < 30_000, "finished before it could be killed: give it more rows"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    with server_process(data_dir, env) as (_, client):
        resumed = finished(client, job_id)
        assert resumed["state"] == "succeeded", resumed
        assert "resuming 1 job(s)" in read_log(data_dir)
        result = load(client.get(f"/v1/jobs/{job_id}/result").content)
        again = upload(client, x, **params).json()["id"]
        assert finished(client, again)["state"] == "succeeded"
        uninterrupted = load(client.get(f"/v1/jobs/{again}/result").content)
    for name, array in uninterrupted.items():
        np.testing.assert_array_equal(result[name], array, err_msg=name)


def test_npz_and_safetensors_uploads(tmp_path):
    from safetensors.numpy import save

    x = rows(40, seed=3)
    npz = io.BytesIO()
    np.savez(npz, acts=x.reshape(4, 10, D_MODEL))
    with running_client(tmp_path) as client:
        for name, body in [("a.npz", npz.getvalue()), ("a.safetensors", save({"acts": x}))]:
            created = upload(client, body, name=name, k=2)
            assert created.status_code == 202, created.text
            assert finished(client, created.json()["id"])["state"] == "succeeded"
            result = load(client.get(f"/v1/jobs/{created.json()['id']}/result").content)
            expected = solvers.unfold(x, DIRECTIONS, k=2)
            np.testing.assert_array_equal(result["indices"].reshape(40, -1), expected.indices)


def test_a_job_adds_certificates_and_the_encoders_codes_when_asked(tmp_path):
    from tests.service.test_encoder import activations as sae_activations
    from tests.service.test_encoder import make_sae, register

    tensors = make_sae(tmp_path / "sae")
    x = sae_activations(tensors, n=1500)
    with running_client(tmp_path / "data", job_shard_rows=600) as client:
        assert register(client, tmp_path / "sae").status_code == 201
        created = upload(client, x, dictionary="sae", k=3, certify="true", compare_encoder="true")
        assert created.status_code == 202, created.text
        assert finished(client, created.json()["id"])["state"] == "succeeded"
        result = load(client.get(f"/v1/jobs/{created.json()['id']}/result").content)
        answer = load(
            client.post(
                "/v1/dictionaries/sae/unfold?k=3&certify=true&compare_encoder=true",
                content=npy_bytes(x[:1000]),
                headers={"content-type": "application/x-npy",
                         "accept": "application/vnd.safetensors"},
            ).content
        )  # fmt: skip
        refused = upload(client, x, compare_encoder="true")  # the demo has no encoder
        assert refused.json()["error"]["code"] == "no_encoder"
    assert result["certified"].shape == (1500,) and result["certified"].dtype == bool
    for name in ("certified", "erc", "support_stability", "encoder_l0", "encoder_support_overlap"):
        np.testing.assert_allclose(result[name][:1000], answer[name], rtol=1e-5, atol=1e-6)
    width = answer["encoder_indices"].shape[1]
    assert result["encoder_indices"].shape[0] == 1500
    np.testing.assert_array_equal(
        result["encoder_indices"][:1000, :width], answer["encoder_indices"]
    )
