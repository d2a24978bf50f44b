"""Content-addressed, crash-safe storage of dictionaries under the data directory.

Layout: ``<data_dir>/dictionaries/<id>/{manifest.json, arrays.safetensors}``. A dictionary is
written into a private temporary folder (files fsynced), then renamed into place in one step,
so a crash mid-write never leaves a partial dictionary visible. The id is a hash of the arrays,
checked again on every load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

log = logging.getLogger(__name__)

STORE_DTYPE = np.dtype("<f4")
MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"


@dataclasses.dataclass(frozen=True)
class DictionaryRecord:
    """A stored dictionary: its arrays and what describes them."""

    id: str
    name: str
    directions: np.ndarray  # (n_features, d_model) float32
    bias: np.ndarray | None  # (d_model,) float32
    labels: list[str] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_at: str = ""

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    def manifest(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "n_features": self.n_features,
            "d_model": self.d_model,
            "dtype": str(STORE_DTYPE.name),
            "has_bias": self.bias is not None,
            "labels": self.labels,
            "metadata": self.metadata,
            "created_at": self.created_at,
        }


def content_id(directions: np.ndarray, bias: np.ndarray | None) -> str:
    """Hash of the arrays (shape, dtype and bytes): same content, same id."""
    digest = hashlib.sha256()
    digest.update(f"unfold-v1:{STORE_DTYPE.str}:{directions.shape}".encode())
    digest.update(np.ascontiguousarray(directions, STORE_DTYPE).tobytes())
    if bias is not None:
        digest.update(b":bias:")
        digest.update(np.ascontiguousarray(bias, STORE_DTYPE).tobytes())
    return digest.hexdigest()[:24]


class DictionaryStore:
    """Dictionaries on disk. Not thread-safe by itself: the registry serializes writes."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "dictionaries"
        self.staging = Path(data_dir) / "staging"
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash mid-write are never visible; remove them.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def save(self, record: DictionaryRecord) -> None:
        final = self.root / record.id
        if final.exists():
            return
        tmp = Path(tempfile.mkdtemp(dir=self.staging, prefix=record.id + "."))
        try:
            tensors = {"directions": np.ascontiguousarray(record.directions, STORE_DTYPE)}
            if record.bias is not None:
                tensors["bias"] = np.ascontiguousarray(record.bias, STORE_DTYPE)
            save_file(tensors, str(tmp / ARRAYS))
            (tmp / MANIFEST).write_bytes(json.dumps(record.manifest(), indent=1).encode())
            for name in (ARRAYS, MANIFEST):
                _fsync(tmp / name)
            _fsync(tmp)
            os.rename(tmp, final)
            _fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, dictionary_id: str) -> None:
        target = self.root / dictionary_id
        if not target.exists():
            return
        # Rename out of sight first so a crash mid-delete leaves nothing half-visible.
        doomed = Path(tempfile.mkdtemp(dir=self.staging, prefix="deleted."))
        os.rename(target, doomed / dictionary_id)
        _fsync(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def load_all(self) -> Iterator[DictionaryRecord]:
        """Every stored dictionary whose arrays still match its id; others are logged, skipped."""
        for folder in sorted(self.root.iterdir()):
            try:
                yield self.load(folder)
            except Exception as error:  # a damaged entry must not stop the others loading
                log.error("skipping damaged dictionary %s: %s", folder.name, error)

    def load(self, folder: Path) -> DictionaryRecord:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        tensors = load_file(str(folder / ARRAYS))
        directions, bias = tensors["directions"], tensors.get("bias")
        actual = content_id(directions, bias)
        if actual != manifest["id"] or folder.name != actual:
            raise ValueError(f"content hash {actual} does not match id {manifest['id']}")
        return DictionaryRecord(
            id=actual,
            name=manifest["name"],
            directions=directions,
            bias=bias,
            labels=manifest.get("labels"),
            metadata=manifest.get("metadata") or {},
            created_at=manifest.get("created_at", ""),
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
