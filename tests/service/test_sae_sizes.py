"""A GPT-2-small-sized SAE (24576 x 768) against a real server at default settings: a SAELens
folder (with its encoder) and a `.npy` of the same size register, and 4096 rows unfold with
the client's defaults, then with a k never used before (a new program, compiled on the way)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from service.client import UnfoldClient
from tests.service.helpers import serve

N_FEATURES, D_MODEL = 24576, 768
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    """A SAELens folder and a .npy of the same decoder; returns (folder, npy, W_dec, b_dec)."""
    root = tmp_path_factory.mktemp("sae")
    rng = np.random.default_rng(0)
    w_dec = rng.standard_normal((N_FEATURES, D_MODEL), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    b_dec = (0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
    folder = root / "gpt2-small-res-jb"
    folder.mkdir()
    save_file(
        {"W_dec": w_dec, "b_dec": b_dec, "W_enc": np.ascontiguousarray(w_dec.T),
         "b_enc": np.zeros(N_FEATURES, np.float32)},
        folder / "sae_weights.safetensors",
    )  # fmt: skip
    cfg = {"architecture": "standard", "d_in": D_MODEL, "d_sae": N_FEATURES,
           "dtype": "float32", "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    npy = root / "decoder.npy"
    np.save(npy, w_dec[::-1].copy())  # other content: its own id
    return folder, npy, w_dec, b_dec


def sparse_rows(w_dec, b_dec, n_rows: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.zeros((n_rows, N_FEATURES), np.float32)
    for row in codes:
        row[rng.choice(N_FEATURES, k, replace=False)] = rng.uniform(0.5, 2.0, k)
    return codes @ w_dec + b_dec


def test_a_gpt2_sized_sae_registers_and_unfolds_at_defaults(tmp_path, sae):
    folder, npy, w_dec, b_dec = sae
    with serve(tmp_path, timeout=300) as http:
        url = str(http.base_url).rstrip("/")
        with UnfoldClient(url) as client:
            info = client.register_saelens("gpt2-l8", folder)
            assert (info["n_features"], info["d_model"]) == (N_FEATURES, D_MODEL)
            assert info["has_bias"] and info["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
            assert client.register_file("decoder", npy)["n_features"] == N_FEATURES

            activations = sparse_rows(w_dec, b_dec, 4096, k=8, seed=1)
            result = client.unfold("gpt2-l8", activations)  # OMP, k=8
            assert result.indices.shape[0] == 4096
            assert np.median(result.relative_error) < 1e-3
            assert np.isin(result.status, (0, 2, 6)).mean() > 0.99  # converged, exact, k reached

            new_k = client.unfold("gpt2-l8", activations[:1024], k=48)  # compiled on the way
            assert np.median(new_k.relative_error) < 1e-3 and (new_k.l0 <= 48).all()
        metrics = http.get("/metrics").text
        assert "unfold_compile_seconds" in metrics
