"""Content-addressed, crash-safe storage of dictionaries under the data directory.

Layout: ``<data_dir>/dictionaries/<id>/{manifest.json, arrays.safetensors}``, plus
``encoder.safetensors`` for a SAE registered with its encoder (its sha256 is in the manifest)
and ``report.json`` once its report is computed (`service.reports`). A dictionary is
written into a private temporary folder (`stage`: files fsynced), then renamed into place in
one step (`commit`), so a crash mid-write never leaves a partial dictionary visible. The id is a
hash of the arrays, checked again on every load; the arrays file's safetensors `__metadata__`
records the sha256 of `manifest.json` (`MANIFEST_DIGEST`), so the manifest (name, labels,
metadata) is checked on every load too. A dictionary that fails either check is logged and
skipped; one stored before manifests had a digest is loaded, and logged.

Arrays are written and hashed a block of rows at a time and read back through memory maps, so
a dictionary of any size costs a block of memory here, not its size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .encoder import Encoder
from .errors import InsufficientStorage, InvalidInput
from .formats import SafetensorsFile, map_file, safetensors_header

log = logging.getLogger(__name__)

STORE_DTYPE = np.dtype("<f4")
MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
ENCODER = "encoder.safetensors"
BLOCK_BYTES = 64 << 20
"""Arrays are converted, hashed and written this many bytes of rows at a time."""
MANIFEST_DIGEST = "manifest_sha256"
"""Key of the manifest's sha256 (hex) in the arrays file's safetensors `__metadata__`.
`stage` writes a placeholder of the same length, which `commit` overwrites in place."""
DIGEST_PLACEHOLDER = "0" * 64


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
    encoder: Encoder | None = None
    encoder_sha256: str | None = None

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
            "encoder": None
            if self.encoder is None
            else {**self.encoder.describe(), "sha256": self.encoder_sha256},
        }


def row_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array` in STORE_DTYPE, contiguous, `BLOCK_BYTES` of rows at a time."""
    rows = max(1, BLOCK_BYTES // max(1, array[:1].size * STORE_DTYPE.itemsize))
    for start in range(0, max(1, array.shape[0]), rows):
        yield np.ascontiguousarray(array[start : start + rows], STORE_DTYPE)


def content_id(directions: np.ndarray, bias: np.ndarray | None) -> str:
    """Hash of the arrays (shape, dtype and bytes): same content, same id."""
    digest = _digest(directions.shape)
    for block in row_blocks(directions):
        digest.update(block.data)
    if bias is not None:
        digest.update(b":bias:")
        digest.update(np.ascontiguousarray(bias, STORE_DTYPE).data)
    return digest.hexdigest()[:24]


def _digest(shape: tuple[int, ...]):
    return hashlib.sha256(f"unfold-v1:{STORE_DTYPE.str}:{shape}".encode())


@dataclasses.dataclass(frozen=True)
class Staged:
    """Arrays written to a private folder of the staging area, not yet a stored dictionary;
    `directions` and `bias` are read-only views of the written file."""

    id: str
    folder: Path
    directions: np.ndarray
    bias: np.ndarray | None


class DictionaryStore:
    """Dictionaries on disk. Not thread-safe by itself: the registry serializes commits."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "dictionaries"
        self.staging = Path(data_dir) / "staging"
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash mid-write are never visible; remove them.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def stage(self, directions: np.ndarray, bias: np.ndarray | None) -> Staged:
        """Write `directions` (n_features, d_model) and `bias` (d_model,) as float32, a block
        of rows at a time (any float input dtype; memory maps are read block by block), into a
        new staging folder; the caller `commit`s or `discard`s it."""
        with disk_full_is_507():
            folder = Path(tempfile.mkdtemp(dir=self.staging, prefix="stage."))
        try:
            path = folder / ARRAYS
            shapes = {"directions": directions.shape}
            if bias is not None:
                shapes["bias"] = bias.shape
            layout = {
                name: ("F32", shape, math.prod(shape) * STORE_DTYPE.itemsize)
                for name, shape in shapes.items()
            }
            digest = _digest(directions.shape)
            with open(path, "wb") as file:
                file.write(safetensors_header(layout, {MANIFEST_DIGEST: DIGEST_PLACEHOLDER}))
                for block in row_blocks(directions):
                    digest.update(block.data)
                    file.write(block.data)
                if bias is not None:
                    bias_bytes = np.ascontiguousarray(bias, STORE_DTYPE).data
                    digest.update(b":bias:")
                    digest.update(bias_bytes)
                    file.write(bias_bytes)
            arrays = read_arrays(path)
            return Staged(digest.hexdigest()[:24], folder, arrays["directions"], arrays.get("bias"))
        except BaseException as error:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise disk_full() from None
            raise

    def stage_encoder(self, staged: Staged, encoder: Encoder) -> tuple[Encoder, str]:
        """Write `encoder`'s arrays as float32 into `staged`'s folder, a block of rows at a
        time; returns (the encoder over the written file, the file's sha256). Non-finite
        values are a 422 `invalid_sae`."""
        arrays = encoder.arrays()
        layout = {
            name: ("F32", array.shape, array.size * STORE_DTYPE.itemsize)
            for name, array in arrays.items()
        }
        path = staged.folder / ENCODER
        digest = hashlib.sha256()
        with disk_full_is_507(), open(path, "wb") as file:
            header = safetensors_header(layout)
            digest.update(header)
            file.write(header)
            for name, array in arrays.items():
                for block in row_blocks(array):
                    if not np.isfinite(block).all():
                        raise InvalidInput(f"{name} has NaN or Inf values", code="invalid_sae")
                    digest.update(block.data)
                    file.write(block.data)
        written = read_arrays(path)
        stored = dataclasses.replace(
            encoder,
            W_enc=written["W_enc"],
            b_enc=written["b_enc"],
            threshold=written.get("threshold"),
        )
        return stored, digest.hexdigest()

    def commit(self, staged: Staged, record: DictionaryRecord) -> DictionaryRecord:
        """Store `staged` as `record` (whose arrays are the staged ones): manifest written,
        files fsynced, folder renamed into place. Returns the record."""
        final = self.root / record.id
        try:
            if not final.exists():
                manifest = json.dumps(record.manifest(), indent=1).encode()
                with disk_full_is_507():
                    (staged.folder / MANIFEST).write_bytes(manifest)
                _record_digest(staged.folder / ARRAYS, hashlib.sha256(manifest).hexdigest())
                for name in (ARRAYS, MANIFEST, ENCODER):
                    if (staged.folder / name).exists():
                        _fsync(staged.folder / name)
                _fsync(staged.folder)
                os.rename(staged.folder, final)
                _fsync(self.root)
            return record
        finally:
            self.discard(staged)

    def discard(self, staged: Staged) -> None:
        shutil.rmtree(staged.folder, ignore_errors=True)

    def save(self, record: DictionaryRecord) -> DictionaryRecord:
        """Stage and commit `record`; the returned record's arrays are views of the files."""
        staged = self.stage(record.directions, record.bias)
        if staged.id != record.id:
            self.discard(staged)
            raise ValueError(f"record id {record.id} is not its content's id {staged.id}")
        stored = dataclasses.replace(record, directions=staged.directions, bias=staged.bias)
        return self.commit(staged, stored)

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
        """Every stored dictionary whose arrays still match its id and whose manifest matches its
        digest; others are logged, skipped."""
        for folder in sorted(self.root.iterdir()):
            try:
                yield self.load(folder)
            except Exception as error:  # a damaged entry must not stop the others loading
                log.error("skipping damaged dictionary %s: %s", folder.name, error)

    @staticmethod
    def load(folder: Path) -> DictionaryRecord:
        """The dictionary stored in `folder`; ValueError when its arrays or its manifest do not
        match what was stored."""
        text = (folder / MANIFEST).read_bytes()
        tensors = SafetensorsFile(map_file(folder / ARRAYS), str(folder / ARRAYS))
        recorded = tensors.metadata.get(MANIFEST_DIGEST)
        if recorded is None:
            log.warning("dictionary %s predates manifest digests: manifest unchecked", folder.name)
        elif recorded != hashlib.sha256(text).hexdigest():
            raise ValueError(f"{MANIFEST} does not match the digest recorded with the arrays")
        manifest = json.loads(text)
        directions = tensors.array("directions")
        bias = tensors.array("bias") if "bias" in tensors.tensors else None
        actual = content_id(directions, bias)
        if actual != manifest["id"] or folder.name != actual:
            raise ValueError(f"content hash {actual} does not match id {manifest['id']}")
        encoder, encoder_sha256 = DictionaryStore._load_encoder(folder, manifest.get("encoder"))
        return DictionaryRecord(
            id=actual,
            name=manifest["name"],
            directions=directions,
            bias=bias,
            labels=manifest.get("labels"),
            metadata=manifest.get("metadata") or {},
            created_at=manifest.get("created_at", ""),
            encoder=encoder,
            encoder_sha256=encoder_sha256,
        )

    @staticmethod
    def _load_encoder(folder: Path, described: dict | None) -> tuple[Encoder | None, str | None]:
        """The stored encoder the manifest describes, checked against its sha256."""
        if described is None:
            return None, None
        path = folder / ENCODER
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(BLOCK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != described["sha256"]:
            raise ValueError(f"{ENCODER} does not match the sha256 in {MANIFEST}")
        arrays = read_arrays(path)
        encoder = Encoder(
            described["architecture"],
            arrays["W_enc"],
            arrays["b_enc"],
            arrays.get("threshold"),
            described.get("k"),
            described.get("apply_b_dec_to_input", True),
        )
        return encoder, described["sha256"]


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a stored arrays file, as read-only views of its memory map."""
    tensors = SafetensorsFile(map_file(path), str(path))
    return {name: tensors.array(name) for name in tensors.tensors}


def _record_digest(path: Path, digest: str) -> None:
    """Overwrite the placeholder `stage` wrote in the header of arrays file `path` with the
    manifest's `digest` (same length: nothing moves)."""
    placeholder = f'"{MANIFEST_DIGEST}":"{DIGEST_PLACEHOLDER}"'.encode()
    with open(path, "r+b") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        position = file.read(size).find(placeholder)
        if position < 0:
            raise ValueError(f"{path} has no manifest digest placeholder")
        file.seek(8 + position + len(placeholder) - len(DIGEST_PLACEHOLDER) - 1)
        file.write(digest.encode())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full() -> InsufficientStorage:
    return InsufficientStorage(
        "the data directory's disk is full; free some disk space, or send only the decoder "
        "(W_dec, b_dec)"
    )


@contextlib.contextmanager
def disk_full_is_507() -> Iterator[None]:
    """A full disk (ENOSPC) inside the scope is 507 `insufficient_storage`."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise disk_full() from None
        raise
