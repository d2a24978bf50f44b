"""A SAE's own encoder, kept beside its decoder, as the baseline of Unfold's codes.

SAELens encoders compute ``pre = (x - b_dec [if apply_b_dec_to_input]) @ W_enc + b_enc`` and
then, by architecture: ``relu(pre)`` (standard), ``relu(pre) * (pre > threshold)``
(jumprelu; also what a batch-top-k SAE becomes for inference), or the ``k`` largest entries
of ``pre``, rectified (topk). `compare` reports, per row, the encoder's codes next to
Unfold's: the reconstruction error of each, the encoder's error when it keeps only as many
codes as Unfold found (its largest), and the share of Unfold's features the encoder also picks
among its largest: the amortisation gap, measured on the caller's own activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import solvers

ARCHITECTURES = ("standard", "jumprelu", "topk")
"""SAELens architectures whose encoder is kept (others: the decoder alone)."""
TENSORS = ("W_enc", "b_enc", "threshold")
BLOCK_FEATURES = 16384
"""Encoder pre-activations are computed this many features at a time."""


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A SAE encoder: `W_enc` (d_model, n_features), `b_enc` and `threshold` (n_features,),
    float32 (read-only views of the stored file once registered)."""

    architecture: str
    W_enc: np.ndarray
    b_enc: np.ndarray
    threshold: np.ndarray | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"W_enc": self.W_enc, "b_enc": self.b_enc}
        if self.threshold is not None:
            arrays["threshold"] = self.threshold
        return arrays

    def encode(self, x: np.ndarray, b_dec: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Codes of activations `x` (batch, d_model) as padded sparse (indices, values): index
        -1 and value 0 pad; each row's codes sorted by decreasing value."""
        x = np.asarray(x, np.float32)
        if self.apply_b_dec_to_input and b_dec is not None:
            x = x - b_dec
        n_features = self.W_enc.shape[1]
        rows = np.arange(len(x))[:, None]
        kept_indices, kept_values = [], []
        for start in range(0, n_features, BLOCK_FEATURES):
            block = slice(start, min(start + BLOCK_FEATURES, n_features))
            pre = x @ np.asarray(self.W_enc[:, block], np.float32) + self.b_enc[block]
            if self.architecture == "topk":
                width = min(self.k, pre.shape[1])
                top = np.argpartition(-pre, width - 1, axis=1)[:, :width]
                values = np.maximum(pre[rows, top], 0)
                kept_indices.append(top + start)
                kept_values.append(values)
                continue
            active = pre > 0
            if self.architecture == "jumprelu":
                active &= pre > self.threshold[block]
            values = np.where(active, pre, 0)
            width = max(int(active.sum(axis=1).max(initial=0)), 1)
            order = np.argsort(-values, axis=1, kind="stable")[:, :width]
            kept_indices.append(order + start)
            kept_values.append(values[rows, order])
        indices = np.concatenate(kept_indices, axis=1)
        values = np.concatenate(kept_values, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        if self.architecture == "topk":
            order = order[:, : self.k]
        indices, values = indices[rows, order], values[rows, order]
        width = max(int((values > 0).sum(axis=1).max(initial=0)), 1)
        indices, values = indices[:, :width], values[:, :width]
        return np.where(values > 0, indices, -1).astype(np.int32), values.astype(np.float32)


def decode(directions, bias, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``codes @ directions + bias`` of padded sparse codes, gathering only the used rows."""
    features, position = np.unique(np.maximum(indices, 0), return_inverse=True)
    used = np.asarray(directions[features], np.float32)
    position = position.reshape(indices.shape)
    out = np.einsum("bk,bkd->bd", np.where(indices >= 0, values, 0), used[position])
    return out if bias is None else out + bias


def compare(record, x: np.ndarray, result: solvers.UnfoldResult) -> dict[str, Any]:
    """The encoder's codes and errors next to `result`, Unfold's codes of `x` (batch,
    d_model) over `record`'s directions (see the module's documentation)."""
    encoder: Encoder = record.encoder
    bias = record.bias
    indices, values = encoder.encode(x, bias)
    centred = np.linalg.norm(x - (0 if bias is None else bias), axis=1)
    scale = np.where(centred > 0, centred, 1.0)
    full = np.linalg.norm(x - decode(record.directions, bias, indices, values), axis=1) / scale
    l0_encoder = (indices >= 0).sum(axis=1)
    l0_unfold = np.atleast_1d(result.l0)
    same_l0 = np.arange(indices.shape[1])[None, :] < l0_unfold[:, None]
    truncated = np.where(same_l0, indices, -1)
    at_l0 = np.linalg.norm(
        x - decode(record.directions, bias, truncated, np.where(same_l0, values, 0)), axis=1
    )
    unfold_indices = np.atleast_2d(result.indices)
    overlap = np.array([
        len(set(u[u >= 0]) & set(e[e >= 0])) / max(len(u[u >= 0]), 1)
        for u, e in zip(unfold_indices, truncated, strict=True)
    ])  # fmt: skip
    return {
        "indices": indices,
        "values": values,
        "l0": l0_encoder.astype(np.int32),
        "relative_error": full.astype(np.float32),
        "relative_error_at_l0": (at_l0 / scale).astype(np.float32),
        "support_overlap": overlap.astype(np.float32),
    }
