"""The demo dictionary registered on an empty store, so a newcomer can unfold right away.

32 features in 16 dimensions (2x superposition): the standard basis and the normalized
Sylvester-Hadamard basis. Their mutual coherence is 1/4, so any activation made of at most two
features is recovered exactly by OMP and by the LASSO (Elad & Bruckstein's bound for a union of
two orthonormal bases). Closed form, so the README's example is reproducible to the digit.
"""

from __future__ import annotations

import numpy as np

DEMO_NAME = "demo"
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
