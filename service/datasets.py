"""Datasets of activations read, and of codes written, a shard at a time: memory stays flat in
the number of rows, and an interrupted run resumes from its last finished shard.

- `Activations`: the rows of a `.npy`, `.safetensors` or `.npz` file (any shape
  ``(..., d_model)``), or of a folder of such files (shards, in name order, each
  ``(rows, d_model)`` or ``(..., d_model)``). `.npy` and `.safetensors` are memory-mapped;
  an `.npz` member is read whole when its rows are first needed (one member at a time).
- `CodesWriter`: the codes of shard after shard, each written atomically as a safetensors
  file with a manifest (``manifest.json``) saying which shards are done and what produced them.
  OUTPUT is that folder, or a `.safetensors` file assembled from it at the end (tensor by
  tensor, one shard in memory at a time).
- `unfold_shards`: the one loop every dataset run shares (`unfold run`, the server's jobs, Ray's
  actors): a shard's rows read and solved a batch at a time, concatenated in row order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import InvalidInput
from .formats import SafetensorsFile, map_file, open_npy

SUFFIXES = (".npy", ".safetensors", ".npz")
MANIFEST = "manifest.json"
FORMAT = "unfold-codes/1"


def invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_input_file")


@dataclass
class _Part:
    """One input file: its array's shape (read from its header) and how to read it."""

    path: Path
    shape: tuple[int, ...]
    tensor: str | None  # the safetensors tensor or .npz member

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    def array(self) -> np.ndarray:
        """The whole array (memory-mapped where the format allows), as (rows, d_model)."""
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            array = open_npy(self.path, str(self.path))
        elif suffix == ".safetensors":
            array = SafetensorsFile(map_file(self.path), str(self.path)).array(self.tensor)
        else:
            with np.load(self.path, allow_pickle=False) as npz:
                array = npz[self.tensor]
        return array.reshape(self.rows, self.shape[-1])


def _header(path: Path, tensor: str | None) -> _Part:
    """A part from its file's header only (no data read); refuses what cannot be activations."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = open_npy(path, str(path))
            shape, dtype, name = array.shape, array.dtype, None
        elif suffix == ".safetensors":
            file = SafetensorsFile(map_file(path), str(path))
            name = _choose(path, list(file.tensors), tensor)
            shape, dtype = file.tensors[name].shape, np.dtype(np.float32)
            if file.tensors[name].dtype not in ("F64", "F32", "F16", "BF16"):
                raise invalid(f"{path}: tensor {name!r} is {file.tensors[name].dtype}, not floats")
        elif suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                members = [m.removesuffix(".npy") for m in archive.namelist()]
                name = _choose(path, members, tensor)
                with archive.open(name + ".npy") as member:
                    major, _ = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
        else:
            raise invalid(f"{path}: activations must be {', '.join(SUFFIXES)} files")
    except (zipfile.BadZipFile, ValueError, OSError, struct.error) as error:
        raise invalid(f"{path}: unreadable ({error})") from None
    if (
        len(shape) == 0
        or not np.issubdtype(dtype, np.number)
        or np.issubdtype(dtype, np.complexfloating)
    ):
        raise invalid(f"{path}: activations must be real numbers of shape (..., d_model)")
    return _Part(path, tuple(int(n) for n in shape), name)


def _choose(path: Path, names: list[str], tensor: str | None) -> str:
    if tensor is None:
        if len(names) != 1:
            raise invalid(f"{path} holds arrays {names}; choose one with --input-tensor")
        return names[0]
    if tensor not in names:
        raise invalid(f"{path} has no array {tensor!r}; it holds {names}")
    return tensor


class Activations:
    """Rows of activations from a file or a folder of shard files (see the module docstring).

    Attributes:
        rows, d_model: the dataset's size.
        shape: the leading shape of the codes to write: a single file's own leading shape, a
            folder's (rows,).
    """

    def __init__(self, path: Path, tensor: str | None = None):
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
            if not files:
                raise invalid(f"{path} holds no {', '.join(SUFFIXES)} files")
        elif path.is_file():
            files = [path]
        else:
            raise invalid(f"{path}: no such file or folder")
        self.parts = [_header(file, tensor) for file in files]
        widths = {part.shape[-1] for part in self.parts}
        if len(widths) > 1:
            listed = ", ".join(f"{p.path.name}: {p.shape[-1]}" for p in self.parts)
            raise invalid(f"{path}: shards of different widths (d_model) ({listed})")
        self.d_model = widths.pop()
        self.rows = sum(part.rows for part in self.parts)
        if self.rows == 0:
            raise invalid(f"{path} holds no activations")
        self.shape = self.parts[0].shape[:-1] if path.is_file() else (self.rows,)
        self.starts = np.cumsum([0] + [part.rows for part in self.parts])
        self._open: tuple[int, np.ndarray] | None = None  # the part last read

    def fingerprint(self) -> list[dict]:
        """What identifies the input: each file's name, size, modification time, shape and
        tensor (a file rewritten with other rows of the same shape is another input)."""
        return [
            {"file": p.path.name, "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns,
             "shape": list(p.shape), "tensor": p.tensor}
            for p, stat in ((p, p.path.stat()) for p in self.parts)
        ]  # fmt: skip

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (rows, d_model), across files as needed."""
        pieces = []
        while start < stop:
            index = int(np.searchsorted(self.starts, start, side="right")) - 1
            if self._open is None or self._open[0] != index:
                self._open = (index, self.parts[index].array())
            array, offset = self._open[1], start - int(self.starts[index])
            end = min(stop, int(self.starts[index + 1]))
            pieces.append(np.asarray(array[offset : offset + end - start], dtype=np.float32))
            start = end
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class CodesWriter:
    """Writes codes shard by shard under a manifest (see the module docstring).

    Args:
        output: a folder, or a `.safetensors` file (then shards go to ``OUTPUT.parts/``).
        header: what produced the codes (dictionary, method, parameters, input, shard size):
            resuming checks that it is unchanged.
        resume: continue the shards of an earlier run.
        overwrite: remove an existing output first. With neither, an existing one is refused.
    """

    def __init__(self, output: Path, header: dict, resume: bool, overwrite: bool = False):
        self.output = Path(output)
        self.single = self.output.suffix.lower() == ".safetensors"
        self.folder = (
            self.output.with_name(self.output.name + ".parts") if self.single else self.output
        )
        self.header = {"format": FORMAT, **header}
        manifest = self.folder / MANIFEST
        if overwrite and resume:
            raise invalid("--resume continues an output and --overwrite replaces it: pick one")
        if overwrite:
            for path in {self.output, self.folder}:
                if path.is_dir() and (path / MANIFEST).exists():
                    shutil.rmtree(path)
                elif path.is_file():
                    path.unlink()
        exists = manifest.exists() or (self.single and self.output.exists())
        if exists and not resume:
            raise invalid(
                f"{self.output} exists; pass --resume to continue an interrupted run, or "
                "--overwrite to replace it"
            )
        if self.single and self.output.exists():
            raise invalid(f"{self.output} is complete already")
        self.done: dict[int, dict] = {}
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            changed = sorted(k for k in self.header if saved.get(k) != self.header[k])
            if changed:
                raise invalid(
                    f"{self.output} was written by another run (its {', '.join(changed)} "
                    "differ); remove it, or run with what wrote it"
                )
            self.done = {
                int(index): shard
                for index, shard in saved["shards"].items()
                if (self.folder / shard["file"]).is_file()
            }
        elif resume and exists:
            raise invalid(f"{self.output} has no {MANIFEST}: nothing to resume")
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, index: int, start: int, tensors: dict[str, np.ndarray]) -> None:
        """Shard `index` (rows from `start`), atomically, then the manifest."""
        name = f"shard-{index:06d}.safetensors"
        partial = self.folder / (name + ".partial")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, partial)
        os.replace(partial, self.folder / name)
        rows = len(next(iter(tensors.values())))
        self.done[index] = {"file": name, "start": start, "rows": rows}
        self._save_manifest()

    @property
    def rows_done(self) -> int:
        """Rows in the finished shards."""
        return sum(shard["rows"] for shard in self.done.values())

    def pending(self, rows: int, shard_rows: int) -> list[Shard]:
        """The shards of `rows` rows not written yet, in row order."""
        return [shard for shard in shard_ranges(rows, shard_rows) if shard.index not in self.done]

    def _save_manifest(self) -> None:
        manifest = {**self.header, "shards": {str(i): s for i, s in sorted(self.done.items())}}
        partial = self.folder / (MANIFEST + ".partial")
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, self.folder / MANIFEST)

    def shards(self) -> list[Path]:
        """The finished shards' files, in row order."""
        return [self.folder / shard["file"] for _, shard in sorted(self.done.items())]

    def finish(self, shape: tuple[int, ...], metadata: dict[str, str]) -> Path:
        """The output: the folder as it is, or the single file `assemble`d from it, after
        which the folder is removed."""
        if not self.single:
            return self.output
        self.assemble(self.output, shape, metadata)
        shutil.rmtree(self.folder)
        self.done = {}
        return self.output

    def assemble(self, path: Path, shape: tuple[int, ...], metadata: dict[str, str]) -> None:
        """One safetensors file at `path` of every shard's rows: each tensor in the input's
        leading `shape`, sparse ones padded to the widest shard; written tensor by tensor, a
        shard at a time, atomically."""
        shards = [safe_open(file, "np") for file in self.shards()]
        header, offset, layout = {"__metadata__": metadata}, 0, []
        for name in shards[0].keys():  # noqa: SIM118 (safe_open is not iterable)
            dtype = shards[0].get_slice(name).get_dtype()
            dtype, dims = np.dtype(READ[dtype]), len(shards[0].get_slice(name).get_shape())
            width = max(s.get_slice(name).get_shape()[1] for s in shards) if dims == 2 else None
            full = (*shape, *(() if width is None else (width,)))
            size = int(np.prod(full, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": WRITTEN[dtype], "shape": list(full),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            layout.append((name, width))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            for name, width in layout:
                for shard in shards:
                    piece = shard.get_tensor(name)
                    if width is not None:
                        piece = pad_columns(piece, width, name)
                    file.write(np.ascontiguousarray(piece, piece.dtype.newbyteorder("<")).data)
        os.replace(partial, path)


def pad_columns(array: np.ndarray, width: int, name: str) -> np.ndarray:
    """A sparse array (rows, w) padded to `width` columns: -1 for indices, else 0."""
    if array.shape[1] == width:
        return array
    fill = -1 if name.endswith("indices") else 0
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=fill)


WRITTEN = {np.dtype(np.int32): "I32", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
           np.dtype(np.int64): "I64", np.dtype(bool): "BOOL"}  # fmt: skip
"""safetensors dtype names of the arrays codes are made of."""
READ = {"I32": np.int32, "F32": np.float32, "F64": np.float64, "I64": np.int64, "BOOL": bool}
"""The same, as `safe_open` names them."""


class Shard(NamedTuple):
    """Rows [start, stop) of a dataset, written as shard `index`."""

    index: int
    start: int
    stop: int


def shard_ranges(rows: int, shard_rows: int) -> list[Shard]:
    return [
        Shard(index, start, min(start + shard_rows, rows))
        for index, start in enumerate(range(0, rows, shard_rows))
    ]


Tensors = dict[str, np.ndarray]


def solve_shard(
    source: Activations,
    shard: Shard,
    batch_rows: int,
    solve: Callable[[np.ndarray], Tensors],
    before_batch: Callable[[], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Tensors:
    """The codes of `shard`: its rows read and `solve`d `batch_rows` at a time (the same
    boundaries on every run, so that a resumed or distributed run gives identical answers),
    concatenated. `before_batch()` runs before each batch, `on_rows(n)` after."""
    parts = []
    for first in range(shard.start, shard.stop, batch_rows):
        if before_batch is not None:
            before_batch()
        rows = source.read(first, min(first + batch_rows, shard.stop))
        parts.append(solve(rows))
        if on_rows is not None:
            on_rows(rows.shape[0])
    return concatenate(parts)


def unfold_shards(
    source: Activations,
    shards: Iterable[Shard],
    batch_rows: int,
    solve: Callable[[np.ndarray], Tensors],
    before_batch: Callable[[], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[tuple[Shard, Tensors]]:
    """Each of `shards` with its codes, solved in this process (`solve_shard`)."""
    for shard in shards:
        yield shard, solve_shard(source, shard, batch_rows, solve, before_batch, on_rows)


def concatenate(parts: list[Tensors]) -> Tensors:
    """Batches' arrays one after another; sparse ones (2-D) padded to the widest batch."""
    tensors = {}
    for name in parts[0]:
        pieces = [part[name] for part in parts]
        if pieces[0].ndim == 2:
            width = max(piece.shape[1] for piece in pieces)
            pieces = [pad_columns(piece, width, name) for piece in pieces]
        tensors[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return tensors
