"""The demo dictionaries registered on an empty store, so a newcomer can unfold right away.

- `demo`: 32 features in 16 dimensions (2x superposition): the standard basis and the
  normalized Sylvester-Hadamard basis. Their mutual coherence is 1/4, so any activation made
  of at most two features is recovered exactly by OMP and by the LASSO (Elad & Bruckstein's
  bound for a union of two orthonormal bases). Closed form, so the README's example is
  reproducible to the digit.
- `toy-model`: the weights of a toy model of superposition (80 sparse features in 20
  dimensions, trained by `examples/toy_model.py` with its defaults), with the model's own
  ReLU read-out kept as its encoder: ``compare_encoder`` shows it beside Unfold's codes.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np
from safetensors.numpy import load

from .encoder import Encoder

DEMO_NAME = "demo"
TOY_MODEL_NAME = "toy-model"
D_MODEL = 16


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), entries +-1."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def demo_dictionary() -> tuple[np.ndarray, list[str]]:
    """Directions of shape (32, 16) and their labels."""
    directions = np.vstack([np.eye(D_MODEL), hadamard(D_MODEL) / np.sqrt(D_MODEL)])
    labels = [f"basis_{i}" for i in range(D_MODEL)] + [f"hadamard_{i}" for i in range(D_MODEL)]
    return directions.astype(np.float32), labels


def demo_registrations() -> list[dict[str, Any]]:
    """`Registry.register`'s arguments for each demo dictionary."""
    directions, labels = demo_dictionary()
    toy = load((resources.files("service") / "assets" / "toy_model.safetensors").read_bytes())
    n_features, d_hidden = toy["W_dec"].shape
    return [
        {
            "name": DEMO_NAME,
            "directions": directions,
            "labels": labels,
            "metadata": {"description": "standard basis + Hadamard basis in 16 dimensions"},
        },
        {
            "name": TOY_MODEL_NAME,
            "directions": toy["W_dec"],
            "labels": [f"feature_{i}" for i in range(n_features)],
            "metadata": {
                "description": f"toy model of superposition (Elhage et al. 2022): {n_features} "
                f"sparse features in {d_hidden} dimensions, h = W x, read out as "
                "ReLU(W^T h + b); trained by examples/toy_model.py",
                "encoder": "the model's own read-out, ReLU(h W + b)",
            },
            "encoder": Encoder("standard", toy["W_enc"], toy["b_enc"], apply_b_dec_to_input=False),
        },
    ]
