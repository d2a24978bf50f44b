"""Small helpers for service tests: binary bodies."""

from __future__ import annotations

import io

import numpy as np

NPY_HEADERS = {"content-type": "application/x-npy"}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def from_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def stable(info: dict) -> dict:
    """Dictionary info without its volatile warm-up state."""
    return {key: value for key, value in info.items() if key != "warm"}
