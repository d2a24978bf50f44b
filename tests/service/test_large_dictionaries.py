"""SAE-sized dictionaries: streamed uploads, SAELens architectures and dtypes, the memory budget,
the dense-answer limit."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save as save_safetensors

import solvers
from service import store as store_module
from service.errors import Overloaded, TooLarge
from service.memory import MemoryBudget
from service.store import STORE_DTYPE, DictionaryStore, content_id
from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes, safetensors_bytes

SAELENS = Path(__file__).parent / "data" / "saelens"
QUIET = {"demo": False, "warmup": False, "compilation_cache": False}


def saelens_folder(name: str):
    folder = SAELENS / name
    weights = folder / "sae_weights.safetensors"
    return (
        {
            "file": ("sae_weights.safetensors", weights.read_bytes()),
            "cfg": ("cfg.json", (folder / "cfg.json").read_bytes()),
        },
        np.load(folder / "decoded.npz"),
    )


def read_tensor(path: Path, name: str) -> np.ndarray:
    """A tensor of a safetensors file, bfloat16 included (as float32), read independently of
    the service's reader."""
    body = path.read_bytes()
    (size,) = struct.unpack("<Q", body[:8])
    entry = json.loads(body[8 : 8 + size])[name]
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[entry["dtype"]]
    begin, end = entry["data_offsets"]
    array = np.frombuffer(body[8 + size + begin : 8 + size + end], dtype)
    return array.reshape(entry["shape"]).astype(np.float32)


@pytest.mark.parametrize(
    ("folder", "architecture", "converted"),
    [
        ("standard", "standard", None),
        ("topk", "topk", None),
        ("jumprelu", "jumprelu", None),
        ("gated", "gated", None),
        ("topk-bfloat16", "topk", "bfloat16"),
        ("standard-float16", "standard", "float16"),
    ],
)
def test_every_saelens_architecture_registers_its_decoder(
    tmp_path, folder, architecture, converted
):
    """Folders written by SAELens 6.54.12 itself (tests/service/data/saelens/make.py): the
    dictionary is W_dec with b_dec, and codes @ directions + bias is SAELens's own `decode`."""
    files, truth = saelens_folder(folder)
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries", data={"name": "sae"}, files=files)
        assert response.status_code == 201, response.text
        info = response.json()
        metadata = info["metadata"]
        assert metadata["architecture"] == architecture
        assert metadata["source"] == "saelens" and metadata["hook_name"].endswith("resid_pre")
        assert metadata.get("converted_from") == converted
        if architecture == "topk":
            assert metadata["k"] == 4
        record = client.app.state.registry.get("sae").record
        weights = SAELENS / folder / "sae_weights.safetensors"
        np.testing.assert_array_equal(record.directions, read_tensor(weights, "W_dec"))
        np.testing.assert_array_equal(record.bias, read_tensor(weights, "b_dec"))
        decoded = truth["codes"] @ record.directions + record.bias
        tolerance = 1e-5 if converted is None else 5e-2  # SAELens decodes in the SAE's dtype
        np.testing.assert_allclose(decoded, truth["decoded"], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [({"architecture": "skip_transcoder"}, "unsupported_sae")],
)
def test_architectures_whose_decoder_needs_the_input_are_refused(tmp_path, overrides, code):
    files, _ = saelens_folder("standard")
    cfg = {**json.loads(files["cfg"][1]), **overrides}
    files["cfg"] = ("cfg.json", json.dumps(cfg).encode())
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries", data={"name": "sae"}, files=files)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == code
        assert "W_skip" in response.json()["error"]["message"]


def test_bias_left_out_where_the_architecture_does_not_decode_with_it(tmp_path):
    """SAELens's matching-pursuit `decode` adds b_dec only when apply_b_dec_to_input."""
    files, _ = saelens_folder("standard")
    cfg = json.loads(files["cfg"][1])
    cfg.update(architecture="matching_pursuit", apply_b_dec_to_input=False)
    files["cfg"] = ("cfg.json", json.dumps(cfg).encode())
    with running_client(tmp_path, **QUIET) as client:
        info = client.post("/v1/dictionaries", data={"name": "mp"}, files=files).json()
        assert not info["has_bias"] and "not applied" in info["metadata"]["b_dec"]


def test_a_transcoder_is_checked_against_its_output_size(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "W_enc": rng.standard_normal((6, 16)).astype(np.float32),
        "W_dec": rng.standard_normal((16, 10)).astype(np.float32),
        "b_dec": rng.standard_normal(10).astype(np.float32),
    }
    cfg = {"architecture": "transcoder", "d_in": 6, "d_out": 10, "d_sae": 16}
    files = {
        "file": ("w.safetensors", save_safetensors(tensors)),
        "cfg": ("cfg.json", json.dumps(cfg).encode()),
    }
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries", data={"name": "tc"}, files=files)
        assert response.status_code == 201, response.text
        assert response.json()["d_model"] == 10 and response.json()["metadata"]["d_out"] == 10


def test_raw_safetensors_body_with_bfloat16_tensors(tmp_path):
    rng = np.random.default_rng(1)
    w_dec = rng.standard_normal((40, 12)).astype(ml_dtypes.bfloat16)
    b_dec = rng.standard_normal(12).astype(ml_dtypes.bfloat16)
    body = safetensors_bytes({"W_dec": w_dec, "b_dec": b_dec, "W_enc": w_dec.T.copy()})
    headers = {"content-type": "application/vnd.safetensors"}
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries?name=bf", content=body, headers=headers)
        assert response.status_code == 201, response.text
        info = response.json()
        assert info["metadata"]["converted_from"] == "bfloat16"
        assert info["id"] == content_id(w_dec.astype(np.float32), b_dec.astype(np.float32))
        named = client.post(
            "/v1/dictionaries?name=enc-t&tensor=W_enc", content=body, headers=headers
        )
        assert named.status_code == 201 and named.json()["n_features"] == 12
        missing = client.post("/v1/dictionaries?name=x&tensor=nope", content=body, headers=headers)
        assert missing.status_code == 422 and "W_dec" in missing.json()["error"]["message"]
        no_name = client.post("/v1/dictionaries", content=body, headers=headers)
        assert no_name.status_code == 422 and "?name=" in no_name.json()["error"]["message"]


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_npy_of_other_dtypes_is_converted_and_noted(tmp_path, dtype):
    directions = (np.random.default_rng(2).standard_normal((20, 6)) * 4).astype(dtype)
    directions[directions == 0] = 1
    with running_client(tmp_path, **QUIET) as client:
        response = client.post(
            "/v1/dictionaries?name=d", content=npy_bytes(directions), headers=NPY_HEADERS
        )
        assert response.status_code == 201, response.text
        assert response.json()["metadata"]["converted_from"] == np.dtype(dtype).name
        assert response.json()["id"] == content_id(directions.astype(np.float32), None)


def test_integer_safetensors_directions_are_refused(tmp_path):
    body = safetensors_bytes({"W_dec": np.ones((4, 3), np.int32)})
    headers = {"content-type": "application/vnd.safetensors"}
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries?name=i", content=body, headers=headers)
        assert response.status_code == 422 and "floating-point" in response.text


def test_forged_tensor_offsets_are_refused(tmp_path):
    body = bytearray(safetensors_bytes({"W_dec": np.ones((4, 3), np.float32)}))
    forged = body.replace(b"[0, 48]", b"[0, 4800]")
    headers = {"content-type": "application/vnd.safetensors"}
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries?name=f", content=bytes(forged), headers=headers)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_safetensors"
        assert "data offsets" in response.json()["error"]["message"]


def test_uploads_have_their_own_limit(tmp_path):
    """Dictionary uploads are bounded by max_dictionary_bytes, not by the unfold body limit."""
    directions = np.random.default_rng(3).standard_normal((200, 16)).astype(np.float32)
    body = npy_bytes(directions)  # ~12.9 kB
    with running_client(
        tmp_path, max_body_bytes=2000, max_dictionary_bytes=20_000, **QUIET
    ) as client:
        assert client.post("/v1/dictionaries?name=a", content=body, headers=NPY_HEADERS).is_success
        big = npy_bytes(np.tile(directions, (2, 1)) + 1)
        refused = client.post("/v1/dictionaries?name=b", content=big, headers=NPY_HEADERS)
        assert refused.status_code == 413
        assert "UNFOLD_MAX_DICTIONARY_BYTES" in refused.json()["error"]["message"]
        as_json = client.post(
            "/v1/dictionaries", json={"name": "j", "directions": directions[:40].tolist()}
        )
        assert as_json.status_code == 413 and "application/x-npy" in as_json.text
        unfold = client.post("/v1/dictionaries/a/unfold", json={"activations": [[0.5] * 16] * 50})
        assert unfold.status_code == 413 and "UNFOLD_MAX_BODY_BYTES" in unfold.text


def test_upload_that_does_not_fit_the_disk_is_507(tmp_path, monkeypatch):
    import service.uploads as uploads

    class Usage:
        free = 1000

    monkeypatch.setattr(uploads.shutil, "disk_usage", lambda _: Usage)
    body = npy_bytes(np.ones((100, 8), np.float32))
    with running_client(tmp_path, **QUIET) as client:
        response = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS)
        assert response.status_code == 507
        assert response.json()["error"]["code"] == "insufficient_storage"
        assert "1000 bytes free" in response.json()["error"]["message"]


def test_stored_arrays_are_streamed_mapped_and_standard(tmp_path, monkeypatch):
    """The store writes and hashes a block of rows at a time (ids unchanged: the hash of the
    whole), the file is a standard safetensors file, the entry's arrays map it, and nothing is
    left in the staging area."""
    monkeypatch.setattr(store_module, "BLOCK_BYTES", 1000)  # many blocks
    directions = np.random.default_rng(4).standard_normal((300, 10)).astype(np.float32)
    whole = hashlib.sha256(f"unfold-v1:{STORE_DTYPE.str}:{directions.shape}".encode())
    whole.update(directions.tobytes())
    assert content_id(directions, None) == whole.hexdigest()[:24]
    with running_client(tmp_path, **QUIET) as client:
        body = npy_bytes(directions)
        info = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS).json()
        assert info["id"] == whole.hexdigest()[:24]
        stored = load_file(str(tmp_path / "dictionaries" / info["id"] / "arrays.safetensors"))
        np.testing.assert_array_equal(stored["directions"], directions)
        record = client.app.state.registry.get("d").record
        assert not record.directions.flags.writeable and not record.directions.flags.owndata
        assert list((tmp_path / "staging").iterdir()) == []


def test_a_bad_upload_leaves_nothing_behind(tmp_path):
    directions = np.ones((10, 4), np.float32)
    directions[3] = np.nan
    with running_client(tmp_path, **QUIET) as client:
        body = npy_bytes(directions)
        response = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS)
        assert response.status_code == 422 and "non-finite" in response.text
        assert list((tmp_path / "staging").iterdir()) == []
        assert list((tmp_path / "dictionaries").iterdir()) == []


def dictionary_bytes(n_features: int, d_model: int) -> int:
    return solvers.footprint(n_features, d_model, gram=False, scan="float32")


def test_registering_until_the_memory_budget_says_no(tmp_path):
    """Each dictionary reserves its arrays; past the budget registration is 413 and the server
    keeps serving; deleting one makes room again."""
    n_features, d_model = 4096, 64  # 1 MB of directions, a 64 MB Gram matrix
    each = dictionary_bytes(n_features, d_model)
    budget = int(3.5 * each)
    rng = np.random.default_rng(5)
    with running_client(tmp_path, memory_budget_bytes=budget, **QUIET) as client:
        names = []
        for i in range(10):
            directions = rng.standard_normal((n_features, d_model)).astype(np.float32)
            body = npy_bytes(directions)
            response = client.post(f"/v1/dictionaries?name=d{i}", content=body, headers=NPY_HEADERS)
            if response.status_code != 201:
                break
            names.append(f"d{i}")
            assert response.json()["path"] == "matrix-free"  # the Gram matrix never fits
            assert "memory budget" in response.json()["placement"]["reason"]
        assert len(names) == 3
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (
            error["code"] == "over_memory_budget"
            and "UNFOLD_MEMORY_BUDGET_BYTES" in error["message"]
        )
        assert client.get("/healthz").status_code == 200
        unfold = client.post("/v1/dictionaries/d0/unfold", json={"activations": [1.0] * 64})
        assert unfold.status_code == 200
        assert client.delete("/v1/dictionaries/d1").status_code == 204
        again = client.post("/v1/dictionaries?name=again", content=body, headers=NPY_HEADERS)
        assert again.status_code == 201
        registry = client.app.state.registry
        assert registry.budget.used["dictionaries"] == 3 * each
        memory = client.get("/v1/info").json()["memory"]
        assert memory["budget_bytes"] == budget and memory["dictionaries_bytes"] == 3 * each
        assert memory["source"] == "UNFOLD_MEMORY_BUDGET_BYTES"
        metrics = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("unfold_memory")
        }
        assert metrics['unfold_memory_reserved_bytes{kind="dictionaries"}'] == 3 * each
        assert metrics["unfold_memory_budget_bytes"] == budget


def test_the_gram_matrix_is_built_only_within_the_budget(tmp_path):
    directions = np.random.default_rng(6).standard_normal((512, 32)).astype(np.float32)
    body = npy_bytes(directions)
    gram = solvers.gram_bytes(512)
    roomy = dictionary_bytes(512, 32) + 3 * gram
    with running_client(tmp_path / "a", memory_budget_bytes=roomy, **QUIET) as client:
        info = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS).json()
        assert info["path"] == "gram"
    tight = dictionary_bytes(512, 32) + gram
    with running_client(tmp_path / "b", memory_budget_bytes=tight, **QUIET) as client:
        info = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS).json()
        assert info["path"] == "matrix-free"


def test_a_stored_dictionary_over_a_smaller_budget_stays_on_disk(tmp_path, caplog):
    directions = np.random.default_rng(7).standard_normal((1024, 32)).astype(np.float32)
    with running_client(tmp_path, **QUIET) as client:
        body = npy_bytes(directions)
        info = client.post("/v1/dictionaries?name=d", content=body, headers=NPY_HEADERS).json()
    with running_client(tmp_path, memory_budget_bytes=1000, **QUIET) as client:
        assert client.get("/v1/dictionaries/d").status_code == 404
        assert "not loading dictionary d" in caplog.text
    assert (tmp_path / "dictionaries" / info["id"]).is_dir()
    with running_client(tmp_path, **QUIET) as client:
        assert client.get("/v1/dictionaries/d").json()["id"] == info["id"]


def test_dense_answers_over_the_limit_are_refused_with_advice(tmp_path):
    directions = np.random.default_rng(8).standard_normal((256, 8)).astype(np.float32)
    limit = 10 * 256 * 4  # ten rows of dense codes
    with running_client(tmp_path, max_dense_answer_bytes=limit, **QUIET) as client:
        client.post("/v1/dictionaries?name=d", content=npy_bytes(directions), headers=NPY_HEADERS)
        rows = np.random.default_rng(9).standard_normal((11, 8)).astype(np.float32)
        as_npy = client.post(
            "/v1/dictionaries/d/unfold?k=2",
            content=npy_bytes(rows),
            headers={**NPY_HEADERS, "accept": "application/x-npy"},
        )
        assert as_npy.status_code == 413
        error = as_npy.json()["error"]
        assert error["code"] == "answer_too_large" and "sparse" in error["message"]
        body = {"activations": rows.tolist(), "k": 2}
        dense = client.post("/v1/dictionaries/d/unfold", json={**body, "output": "dense"})
        assert dense.status_code == 413
        assert client.post("/v1/dictionaries/d/unfold", json=body).status_code == 200
        ten = client.post(
            "/v1/dictionaries/d/unfold", json={**body, "activations": rows[:10].tolist()}
        )
        assert ten.status_code == 200
        infer = {"inputs": [{"name": "activations", "shape": [11, 8], "datatype": "FP32",
                             "data": rows.ravel().tolist()}]}  # fmt: skip
        oip = client.post("/v2/models/d/infer", json=infer)
        assert oip.status_code == 413 and "indices and values" in oip.text
        sparse = {**infer, "outputs": [{"name": "indices"}, {"name": "values"}]}
        assert client.post("/v2/models/d/infer", json=sparse).status_code == 200


def test_requests_hold_their_memory_while_answered():
    budget = MemoryBudget(1000, "test")
    assert budget.reserve("dictionaries", 600)
    with budget.hold_request(300, retry_after=1):
        assert budget.free == 100
        with (
            pytest.raises(Overloaded) as busy,  # fits when the other request is done
            budget.hold_request(200, retry_after=1),
        ):
            pass
        assert busy.value.code == "memory_busy"
    assert budget.free == 400
    with (
        pytest.raises(TooLarge),  # could never fit beside the dictionaries
        budget.hold_request(500, retry_after=1),
    ):
        pass
    assert budget.used == {"dictionaries": 600, "requests": 0}


def test_footprint_is_what_prepare_allocates():
    directions = np.random.default_rng(10).standard_normal((300, 20)).astype(np.float32)
    for gram, scan in [(True, "float32"), (False, "float32"), (False, "bfloat16")]:
        prepared = solvers.prepare(directions, gram=gram, scan=scan)
        assert prepared.nbytes == solvers.footprint(300, 20, gram=gram, scan=scan)


def test_store_reads_back_what_it_staged(tmp_path):
    store = DictionaryStore(tmp_path)
    directions = np.arange(1, 13, dtype=np.float16).reshape(4, 3)
    staged = store.stage(directions, np.ones(3, np.float64))
    np.testing.assert_array_equal(staged.directions, directions.astype(np.float32))
    assert staged.id == content_id(directions.astype(np.float32), np.ones(3, np.float32))
    store.discard(staged)
    assert list(store.staging.iterdir()) == []
