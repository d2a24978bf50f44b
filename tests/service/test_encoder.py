"""The SAE's own encoder as a baseline: kept from SAELens folders, run as SAELens runs it, and
compared with Unfold's codes on request."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from service.encoder import Encoder
from tests.service.conftest import running_client
from tests.service.helpers import NPY_HEADERS, npy_bytes

N_FEATURES, D_MODEL = 96, 32


def make_sae(folder, architecture="jumprelu", seed=0, **cfg):
    """A SAELens folder with a JumpReLU (or other) SAE whose encoder roughly inverts its
    decoder; returns its tensors."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((N_FEATURES, D_MODEL)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    tensors = {
        "W_dec": w_dec,
        "b_dec": (0.1 * rng.standard_normal(D_MODEL)).astype(np.float32),
        "W_enc": np.ascontiguousarray(w_dec.T),
        "b_enc": np.full(N_FEATURES, -0.05, np.float32),
        "threshold": np.full(N_FEATURES, 0.2, np.float32),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "sae_weights.safetensors")
    config = {"d_in": D_MODEL, "d_sae": N_FEATURES, "architecture": architecture, **cfg}
    (folder / "cfg.json").write_text(json.dumps(config))
    return tensors


def reference_codes(tensors, x, architecture, k=None, apply_b_dec_to_input=True):
    """Dense codes, as SAELens's encode computes them."""
    sae_in = x - tensors["b_dec"] * apply_b_dec_to_input
    pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
    if architecture == "standard":
        return np.maximum(pre, 0)
    if architecture == "jumprelu":
        return np.maximum(pre, 0) * (pre > tensors["threshold"])
    codes = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return codes


def activations(tensors, n=5, seed=1):
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, N_FEATURES), np.float32)
    for row in codes:
        row[rng.choice(N_FEATURES, 3, replace=False)] = rng.uniform(0.5, 2, 3)
    return codes @ tensors["W_dec"] + tensors["b_dec"]


def dense(indices, values):
    out = np.zeros((len(indices), N_FEATURES), np.float32)
    for row, (i, v) in enumerate(zip(indices, values, strict=True)):
        out[row, i[i >= 0]] = v[i >= 0]
    return out


@pytest.mark.parametrize(
    ("architecture", "k", "apply"),
    [("standard", None, True), ("jumprelu", None, True), ("jumprelu", None, False),
     ("topk", 4, True)],
)  # fmt: skip
def test_encode_matches_saelens_formulas(tmp_path, architecture, k, apply, monkeypatch):
    tensors = make_sae(tmp_path, architecture)
    monkeypatch.setattr("service.encoder.BLOCK_FEATURES", 40)  # 96 features: three blocks
    encoder = Encoder(
        architecture, tensors["W_enc"], tensors["b_enc"], tensors["threshold"], k, apply
    )
    x = activations(tensors)
    indices, values = encoder.encode(x, tensors["b_dec"])
    expected = reference_codes(tensors, x, architecture, k, apply)
    np.testing.assert_allclose(dense(indices, values), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(values, axis=1) <= 0)  # largest first


def test_encode_matches_saelens_itself(tmp_path):
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    make_sae(tmp_path / "sae", dtype="float32", apply_b_dec_to_input=True)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    tensors = load_safetensors((tmp_path / "sae" / "sae_weights.safetensors").read_bytes())
    x = activations(tensors)
    expected = sae.encode(torch.from_numpy(x)).detach().numpy()
    encoder = Encoder("jumprelu", tensors["W_enc"], tensors["b_enc"], tensors["threshold"])
    indices, values = encoder.encode(x, tensors["b_dec"])
    np.testing.assert_allclose(dense(indices, values), expected, rtol=1e-5, atol=1e-6)


def register(client, folder, name="sae"):
    with open(folder / "sae_weights.safetensors", "rb") as weights:
        return client.post(
            "/v1/dictionaries",
            data={"name": name},
            files={"file": ("sae_weights.safetensors", weights),
                   "cfg": ("cfg.json", (folder / "cfg.json").read_bytes())},
        )  # fmt: skip


def test_unfold_compares_with_the_encoder_kept_at_registration(tmp_path):
    tensors = make_sae(tmp_path / "sae")
    x = activations(tensors)
    with running_client(tmp_path / "data") as client:
        response = register(client, tmp_path / "sae")
        assert response.status_code == 201, response.text
        assert response.json()["encoder"] == {
            "architecture": "jumprelu", "k": None, "apply_b_dec_to_input": True,
        }  # fmt: skip
        body = client.post(
            "/v1/dictionaries/sae/unfold",
            json={"activations": x.tolist(), "k": 3, "compare_encoder": True},
        ).json()
        binary = client.post(
            "/v1/dictionaries/sae/unfold?k=3&compare_encoder=true",
            content=npy_bytes(x),
            headers={**NPY_HEADERS, "Accept": "application/vnd.safetensors"},
        )
    comparison = body["encoder"]
    expected = reference_codes(tensors, x, "jumprelu")
    codes = comparison["codes"]
    found = dense(
        np.array([c["indices"] + [-1] * (N_FEATURES - len(c["indices"])) for c in codes]),
        np.array([c["values"] + [0] * (N_FEATURES - len(c["values"])) for c in codes]),
    )
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6)
    assert comparison["l0"] == (expected > 0).sum(axis=1).tolist()
    centred = np.linalg.norm(x - tensors["b_dec"], axis=1)
    error = np.linalg.norm(x - expected @ tensors["W_dec"] - tensors["b_dec"], axis=1) / centred
    np.testing.assert_allclose(comparison["relative_error"], error, rtol=1e-4)
    for row in range(len(x)):
        unfold = set(body["codes"][row]["indices"])
        largest = np.argsort(-expected[row])[: body["l0"][row]]
        truncated = np.zeros(N_FEATURES)
        truncated[largest] = expected[row, largest]
        at_l0 = np.linalg.norm(x[row] - truncated @ tensors["W_dec"] - tensors["b_dec"])
        assert comparison["relative_error_at_l0"][row] == pytest.approx(
            at_l0 / centred[row], rel=1e-4
        )
        overlap = len(unfold & set(largest.tolist())) / len(unfold)
        assert comparison["support_overlap"][row] == pytest.approx(overlap)
    # Unfold explains these exactly sparse activations; the encoder does not.
    assert max(body["relative_error"]) < 1e-4 < min(comparison["relative_error"])
    tensors_back = load_safetensors(binary.content)
    np.testing.assert_array_equal(tensors_back["encoder_l0"], comparison["l0"])
    # The encoder survives a restart, checked against its sha256.
    with running_client(tmp_path / "data") as client:
        assert client.get("/v1/dictionaries/sae").json()["encoder"]["architecture"] == "jumprelu"


def test_a_tampered_encoder_file_is_not_loaded(tmp_path):
    make_sae(tmp_path / "sae")
    with running_client(tmp_path / "data") as client:
        dictionary_id = register(client, tmp_path / "sae").json()["id"]
    stored = tmp_path / "data" / "dictionaries" / dictionary_id / "encoder.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with running_client(tmp_path / "data", demo=False) as client:
        assert client.get("/v1/dictionaries/sae").status_code == 404


def test_bad_encoders_and_requests_get_clear_errors(tmp_path, client):
    tensors = make_sae(tmp_path / "topk", "topk")  # no k in cfg.json
    response = register(client, tmp_path / "topk")
    assert response.status_code == 422 and "k >= 1" in response.json()["error"]["message"]
    bad = dict(tensors, W_enc=np.zeros((D_MODEL + 1, N_FEATURES), np.float32))
    save_file(bad, tmp_path / "topk" / "sae_weights.safetensors")
    (tmp_path / "topk" / "cfg.json").write_text(
        json.dumps({"d_in": D_MODEL, "d_sae": N_FEATURES, "architecture": "standard"})
    )
    response = register(client, tmp_path / "topk")
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_sae"
    nan = dict(tensors, W_enc=np.full((D_MODEL, N_FEATURES), np.nan, np.float32))
    save_file(nan, tmp_path / "topk" / "sae_weights.safetensors")
    response = register(client, tmp_path / "topk")
    assert response.status_code == 422 and "NaN" in response.json()["error"]["message"]
    # An architecture whose encoder Unfold does not run: the decoder alone, and it says so.
    make_sae(tmp_path / "gated", "gated", seed=5)
    info = register(client, tmp_path / "gated", "gated").json()
    assert info["encoder"] is None and "not kept" in info["metadata"]["encoder"]
    x = np.zeros((1, D_MODEL)).tolist()
    refused = client.post(
        "/v1/dictionaries/gated/unfold", json={"activations": x, "compare_encoder": True}
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_encoder"
    oip = client.post(
        "/v2/models/gated/infer",
        json={"inputs": [{"name": "activations", "shape": [1, D_MODEL], "datatype": "FP32",
                          "data": x[0]}], "parameters": {"compare_encoder": True}},
    )  # fmt: skip
    assert oip.status_code == 400 and "v1" in oip.json()["error"]
    # The same decoder with an encoder, under the same name: a conflict, not a silent drop.
    (tmp_path / "gated" / "cfg.json").write_text(
        json.dumps({"d_in": D_MODEL, "d_sae": N_FEATURES, "architecture": "jumprelu"})
    )
    conflict = register(client, tmp_path / "gated", "gated")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "encoder_differs"


def test_the_toy_model_demo_reads_out_worse_than_unfolding(client):
    """The `toy-model` demo's encoder is the model's own ReLU read-out: unfolding its hidden
    activations recovers the planted features better, on the service, side by side."""
    weights = load_safetensors(
        (resources.files("service") / "assets" / "toy_model.safetensors").read_bytes()
    )
    rng = np.random.default_rng(0)
    features = np.where(rng.uniform(size=(256, 80)) < 0.05, rng.uniform(size=(256, 80)), 0)
    features = features[features.sum(axis=1) > 0].astype(np.float32)
    hidden = features @ weights["W_dec"]
    body = client.post(
        "/v1/dictionaries/toy-model/unfold",
        json={"activations": hidden.tolist(), "k": 8, "positive": True, "tol": 1e-6,
              "compare_encoder": True, "certify": True},
    ).json()  # fmt: skip
    read_out = np.maximum(hidden @ weights["W_enc"] + weights["b_enc"], 0)
    comparison = body["encoder"]
    encoder_codes = np.zeros_like(features)
    unfold_codes = np.zeros_like(features)
    for row, (mine, theirs) in enumerate(zip(body["codes"], comparison["codes"], strict=True)):
        unfold_codes[row, mine["indices"]] = mine["values"]
        encoder_codes[row, theirs["indices"]] = theirs["values"]
    np.testing.assert_allclose(encoder_codes, read_out, rtol=1e-4, atol=1e-5)

    def feature_error(codes):
        return np.linalg.norm(codes - features) / np.linalg.norm(features)

    assert feature_error(unfold_codes) < 0.6 * feature_error(encoder_codes)
    assert np.mean(body["relative_error"]) < np.mean(comparison["relative_error"])
    assert 0 < np.mean(body["certified"]) < 1  # some supports certified, not all
