"""Array formats at the boundary: `.npy`, safetensors and SAELens SAE folders.

Nothing here unpickles: `.npy` loads with ``allow_pickle=False`` and safetensors headers are
size-checked before they are parsed. Uploaded dictionaries are read from files through memory
maps (`SafetensorsFile`, `open_npy`), so a large one is never held in memory as its upload and
again as its arrays; safetensors are read here rather than by `safetensors.numpy`, which reads
whole files into memory and has no bfloat16.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError
from safetensors.numpy import save as save_safetensors

from .encoder import ARCHITECTURES as ENCODER_ARCHITECTURES
from .encoder import Encoder
from .errors import InvalidInput, describe_validation_errors

NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound

SAE_DECODER = "W_dec"
SAE_DECODER_BIAS = "b_dec"
SAE_NORMALIZATIONS_HONOURED = (None, "none")


NPY_MAGIC = b"\x93NUMPY"
REAL_KINDS = "fiu"
"""Numpy dtype kinds of real numbers (floats, signed and unsigned integers): what array
inputs may hold. Complex numbers, booleans, strings, dates and records are refused."""


def check_real(dtype: np.dtype, what: str, code: str) -> None:
    """A 422 `code` unless `dtype` holds real numbers (`REAL_KINDS`)."""
    if dtype.hasobject:
        raise InvalidInput(
            f"{what}: object arrays (pickled data) are refused; save a numeric array", code=code
        )
    if dtype.kind not in REAL_KINDS or dtype.subdtype is not None:
        raise InvalidInput(
            f"{what}: dtype {dtype} is not a real number type; send float32 (other floats and "
            "integers are converted; complex numbers are refused, not truncated)",
            code=code,
        )


def read_npy(body: bytes, what: str, max_rows: int | None = None) -> np.ndarray:
    """A real array from `.npy` bytes, a read-only view of `body`.

    The header is read first: its dtype must be real (`check_real`), its shape must match the
    bytes that follow, and with `max_rows` the rows it declares (`shape[0]`, or 1 for a vector)
    must be at most that (422 `too_many_rows`), all before any data is read.
    """
    if not body.startswith(NPY_MAGIC):
        raise InvalidInput(
            f"{what}: not a .npy file (it must start with the .npy magic string); "
            "write it with numpy.save",
            code="invalid_npy",
        )
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} (numpy.save writes 1.0 for arrays here)")
        shape, fortran_order, dtype = read_header(stream)
    except Exception as error:  # a malformed header, or an object dtype numpy cannot describe
        raise InvalidInput(f"{what}: not a valid .npy file ({error})", code="invalid_npy") from None
    check_real(dtype, what, "invalid_npy")
    count = math.prod(shape)
    offset = stream.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise InvalidInput(
            f"{what}: the .npy header declares {dtype} {list(shape)} ({count * dtype.itemsize} "
            f"bytes), but {len(body) - offset} bytes follow it (truncated or corrupt)",
            code="invalid_npy",
        )
    rows = shape[0] if len(shape) > 1 else 1
    if max_rows is not None and rows > max_rows:
        raise too_many_rows(rows, max_rows)
    array = np.frombuffer(body, dtype, count, offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def too_many_rows(rows: int, max_rows: int) -> InvalidInput:
    return InvalidInput(
        f"{rows} rows exceed the limit of {max_rows} per request (UNFOLD_MAX_ROWS); "
        "split the batch",
        code="too_many_rows",
    )


def open_npy(path: Path, what: str) -> np.ndarray:
    """A real array from a `.npy` file, memory-mapped; object (pickled) and non-real arrays
    are refused."""
    with open(path, "rb") as file:
        if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise InvalidInput(
                f"{what}: not a .npy file (it must start with the .npy magic string); "
                "write it with numpy.save",
                code="invalid_npy",
            )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # object arrays cannot be mapped; truncated or garbage bytes
        reason = "object arrays (pickled data) are refused" if "object" in str(error) else error
        raise InvalidInput(
            f"{what}: not a valid .npy file ({reason})", code="invalid_npy"
        ) from None
    check_real(array.dtype, what, "invalid_npy")
    return array


JSON_BLOCK_VALUES = 1 << 16
"""JSON arrays are validated and converted this many numbers at a time (`json_array`)."""
_JSON_NUMBERS = TypeAdapter(list[float], config=ConfigDict(strict=True))
_JSON_ROWS = TypeAdapter(list[list[float]], config=ConfigDict(strict=True))


def json_array(values: Any, what: str, *, shape_code: str, dtype=np.float32) -> np.ndarray:
    """`values` parsed from JSON (a list of numbers, or a list of equally long lists of
    numbers) as an array of `dtype`, of shape (n,) or (rows, n).

    Numbers only: booleans, strings, nulls and deeper nesting are refused (422
    `invalid_request`), never coerced; rows of unequal length are a 422 `shape_code`. Values
    are checked and converted a block of `JSON_BLOCK_VALUES` at a time, so between blocks
    other threads (the event loop, when this runs on a worker thread) get the interpreter.
    Values beyond the range of `dtype` become infinite (callers refuse non-finite values).
    """
    if not isinstance(values, list):
        raise InvalidInput(
            f"{what} must be a list of numbers or a list of equally long lists of numbers",
            code="invalid_request",
        )
    matrix = bool(values) and isinstance(values[0], list)
    width = len(values[0]) if matrix else 1
    adapter = _JSON_ROWS if matrix else _JSON_NUMBERS
    array = np.empty((len(values), width) if matrix else len(values), dtype)
    step = max(1, JSON_BLOCK_VALUES // max(1, width))
    for start in range(0, len(values), step):
        block = values[start : start + step]
        try:
            adapter.validate_python(block)
        except ValidationError as error:
            details = error.errors()
            for detail in details:  # positions in the whole array, not in the block
                detail["loc"] = (what, start + detail["loc"][0], *detail["loc"][1:])
            message = f"{what} must be numbers; {describe_validation_errors(details)}"
            raise InvalidInput(message, code="invalid_request") from None
        try:
            with np.errstate(over="ignore"):
                converted = np.asarray(block, dtype)
        except ValueError:
            converted = None  # rows of unequal length
        if converted is None or converted.shape[1:] != array.shape[1:]:
            raise InvalidInput(
                f"{what} must be a list of numbers or a list of equally long lists of numbers "
                f"(the rows from {start} on are not all {width} long)",
                code=shape_code,
            )
        array[start : start + step] = converted
    return array


def as_float32(array: np.ndarray, what: str) -> tuple[np.ndarray, str | None]:
    """`array` in float32, and the dtype it was converted from (None if it was float32).

    float16 and bfloat16 convert exactly; float64 and integers are rounded to float32.
    """
    if array.dtype == np.float32:
        return array, None
    if array.dtype.kind not in "fiu" and array.dtype != SAFETENSORS_FLOATS["BF16"]:
        raise InvalidInput(f"{what} must be numeric, got {array.dtype}", code="invalid_dictionary")
    return array.astype(np.float32), array.dtype.name


def write_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


SAFETENSORS_FLOATS = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
"""The safetensors dtypes a dictionary may be stored in; all but F64 convert exactly to float32."""
SAFETENSORS_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2,
                        "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
"""Other dtypes, only to check their tensors' sizes (they are never read)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the buffer
    nbytes: int


class SafetensorsFile:
    """The tensors of a safetensors file held in a buffer (bytes, or a read-only `mmap` of a
    file: tensors are then views of the page cache, read only when touched).

    The header is checked completely (size, JSON, dtype, shape and offsets of every tensor)
    before anything is read, so a truncated or forged file is refused with a clear message.
    """

    def __init__(self, buffer, what: str):
        self.buffer, self.what = buffer, what
        size = len(buffer)
        if size < 8:
            raise self._invalid("too short for a safetensors file")
        (header_size,) = struct.unpack("<Q", buffer[:8])
        if header_size > MAX_SAFETENSORS_HEADER or header_size > size - 8:
            raise self._invalid(
                f"safetensors header claims {header_size} bytes but the file holds {size - 8} "
                "after the size field (truncated or corrupt)"
            )
        try:
            header = json.loads(bytes(buffer[8 : 8 + header_size]))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except ValueError as error:
            raise self._invalid(f"safetensors header is not valid JSON ({error})") from None
        data_start, data_size = 8 + header_size, size - 8 - header_size
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorEntry] = {}
        for name, spec in header.items():
            self.tensors[name] = self._entry(name, spec, data_start, data_size)

    def _entry(self, name: str, spec, data_start: int, data_size: int) -> TensorEntry:
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            itemsize = (
                SAFETENSORS_FLOATS[dtype].itemsize
                if dtype in SAFETENSORS_FLOATS
                else SAFETENSORS_ITEMSIZE[dtype]
            )
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise self._invalid(f"tensor {name!r} has a malformed header entry: {spec}") from None
        if end - begin != math.prod(shape) * itemsize or not 0 <= begin <= end <= data_size:
            raise self._invalid(
                f"tensor {name!r} ({dtype} {list(shape)}) does not fit its data offsets "
                f"[{begin}, {end}] in {data_size} bytes of data (truncated or corrupt)"
            )
        return TensorEntry(dtype, shape, data_start + begin, end - begin)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name`, a read-only view of the buffer (floating-point tensors only)."""
        entry = self.tensors[name]
        dtype = SAFETENSORS_FLOATS.get(entry.dtype)
        if dtype is None:
            raise InvalidInput(
                f"{self.what}: tensor {name!r} is {entry.dtype}; directions and bias must be "
                f"floating-point ({', '.join(SAFETENSORS_FLOATS)})",
                code="invalid_dictionary",
            )
        count = entry.nbytes // dtype.itemsize
        flat = np.frombuffer(self.buffer, dtype.newbyteorder("<"), count, entry.start)
        return flat.reshape(entry.shape)

    def _invalid(self, message: str) -> InvalidInput:
        return InvalidInput(f"{self.what}: {message}", code="invalid_safetensors")


def map_file(file) -> mmap.mmap | bytes:
    """A read-only memory map of a file (a path, or an open file); ``b""`` when it is empty.
    Arrays viewing it keep it mapped; it is unmapped when the last one is gone."""
    if isinstance(file, str | os.PathLike):
        with open(file, "rb") as opened:
            return map_file(opened)
    if os.fstat(file.fileno()).st_size == 0:
        return b""
    return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def write_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def safetensors_header(
    tensors: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict[str, str] | None = None
) -> bytes:
    """The size field and header of a safetensors file holding `tensors` (name: dtype code,
    shape, bytes), laid out one after the other in that order, and its `__metadata__`."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    return struct.pack("<Q", len(text)) + text


def dictionary_tensor_names(
    shapes: dict[str, tuple[int, ...]], tensor: str | None, bias_tensor: str | None
) -> tuple[str, str | None]:
    """Which tensors of a file hold the directions and the bias: `tensor`, else SAELens's
    `W_dec`, else the only 2-D tensor; `bias_tensor`, else `b_dec` beside `W_dec`. Raises
    ValueError naming what to give."""
    if tensor is None:
        matrices = [name for name, shape in shapes.items() if len(shape) == 2]
        if SAE_DECODER in shapes:
            tensor = SAE_DECODER
        elif len(matrices) == 1:
            tensor = matrices[0]
        else:
            raise ValueError(
                f"cannot tell which tensor holds the directions among {sorted(shapes)}; "
                "name it with the `tensor` field"
            )
    if tensor not in shapes:
        raise ValueError(f"no tensor {tensor!r} in the file; it holds {sorted(shapes)}")
    if bias_tensor is None and tensor == SAE_DECODER and SAE_DECODER_BIAS in shapes:
        bias_tensor = SAE_DECODER_BIAS
    if bias_tensor is not None and bias_tensor not in shapes:
        raise ValueError(f"no bias tensor {bias_tensor!r} in the file; it holds {sorted(shapes)}")
    return tensor, bias_tensor


def pick_dictionary_tensors(
    file: SafetensorsFile, tensor: str | None, bias_tensor: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The directions (and bias) in a safetensors file (`dictionary_tensor_names`)."""
    shapes = {name: entry.shape for name, entry in file.tensors.items()}
    try:
        tensor, bias_tensor = dictionary_tensor_names(shapes, tensor, bias_tensor)
    except ValueError as error:
        raise InvalidInput(str(error), code="invalid_dictionary") from None
    return file.array(tensor), (file.array(bias_tensor) if bias_tensor else None)


def dictionary_arrays(
    file: SafetensorsFile, tensor: str | None, bias_tensor: str | None, cfg: bytes | None
) -> dict[str, Any]:
    """`Registry.register`'s directions, bias and metadata from a safetensors file and, for a
    SAELens SAE, its `cfg.json`."""
    directions, bias = pick_dictionary_tensors(file, tensor, bias_tensor)
    metadata = {}
    encoder = None
    if cfg is not None:
        sae = read_sae_config(cfg, directions.shape)
        metadata = sae.metadata
        if bias is not None and not sae.decoder_adds_bias:
            bias = None
            metadata["b_dec"] = "not applied: this architecture's decoder leaves it out"
        encoder, why_not = sae_encoder(file, sae, directions.shape)
        if why_not is not None:
            metadata["encoder"] = f"not kept: {why_not}"
    return converted(directions, bias, metadata, encoder)


def sae_encoder(
    file: SafetensorsFile, sae: SAEConfig, shape: tuple[int, int]
) -> tuple[Encoder | None, str | None]:
    """(the SAE's encoder, None), or (None, why it is not kept: None when the file has none).
    Tensors of the wrong shape are a 422 `invalid_sae`."""
    if "W_enc" not in file.tensors or "b_enc" not in file.tensors:
        return None, None
    config = sae.metadata
    architecture = config.get("architecture", "standard")
    if architecture not in ENCODER_ARCHITECTURES:
        return (
            None,
            f"Unfold runs the encoders of {list(ENCODER_ARCHITECTURES)}, not {architecture}",
        )
    if config.get("rescale_acts_by_decoder_norm"):
        return None, "rescale_acts_by_decoder_norm is not supported"
    n_features, d_model = shape
    expected = {"W_enc": (d_model, n_features), "b_enc": (n_features,)}
    if architecture == "jumprelu":
        expected["threshold"] = (n_features,)
    arrays = {}
    for name, wanted in expected.items():
        if name not in file.tensors:
            raise InvalidInput(
                f"a {architecture} SAE needs the tensor {name!r}", code="invalid_sae"
            )
        if tuple(file.tensors[name].shape) != wanted:
            raise InvalidInput(
                f"{name} has shape {list(file.tensors[name].shape)}; with W_dec of shape "
                f"{list(shape)} it must be {list(wanted)}",
                code="invalid_sae",
            )
        arrays[name] = file.array(name)
    k = config.get("k")
    if architecture == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InvalidInput(f"a topk SAE needs cfg.json's k >= 1, got {k!r}", code="invalid_sae")
    encoder = Encoder(
        architecture,
        arrays["W_enc"],
        arrays["b_enc"],
        arrays.get("threshold"),
        k if architecture == "topk" else None,
        bool(config.get("apply_b_dec_to_input", True)),
    )
    return encoder, None


def converted(directions, bias, metadata: dict, encoder: Encoder | None = None) -> dict[str, Any]:
    """Registration arguments; arrays in another dtype than float32 are converted by the store
    (a block at a time), and the metadata says from what."""
    source = {np.dtype(a.dtype).name for a in (directions, bias) if a is not None} - {"float32"}
    if source:
        metadata = {**metadata, "converted_from": ", ".join(sorted(source))}
    return {"directions": directions, "bias": bias, "metadata": metadata, "encoder": encoder}


SAE_WITH_INPUT_IN_DECODER = ("skip_transcoder", "jumprelu_skip_transcoder")
"""SAELens architectures whose reconstruction also depends on the input (``W_skip @ x``)."""
SAE_BIAS_ONLY_IF_APPLIED_TO_INPUT = ("matching_pursuit",)
"""SAELens architectures whose `decode` adds `b_dec` only when `apply_b_dec_to_input`."""
SAE_KEPT_FIELDS = (
    "architecture", "d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input", "k",
    "rescale_acts_by_decoder_norm", "reshape_activations", "normalize_activations",
    "tied_weights",
)  # fmt: skip
SAE_KEPT_METADATA = (
    "model_name", "hook_name", "hook_name_out", "hook_head_index", "context_size",
    "prepend_bos", "dataset_path", "sae_lens_version",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """What a SAELens `cfg.json` means for the dictionary: metadata to keep, and whether its
    decoder adds `b_dec`."""

    metadata: dict[str, Any]
    decoder_adds_bias: bool


def read_sae_config(body: bytes, shape: tuple[int, int]) -> SAEConfig:
    """Check a SAELens `cfg.json` against the decoder of `shape` (d_sae, d_out).

    Every architecture reconstructs ``codes @ W_dec (+ b_dec)``, so W_dec is the dictionary
    whatever the encoder (standard, topk, jumprelu, gated, batchtopk, matching pursuit,
    transcoders, ...). `b_dec` is the bias except where the architecture's `decode` skips it.
    Refused: activation normalization (every request would need it, and the service does not
    apply it) and skip transcoders (their reconstruction also depends on the input).
    """
    try:
        cfg = json.loads(body)
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
    except ValueError as error:
        raise InvalidInput(f"cfg.json is not a JSON object ({error})", code="invalid_sae") from None
    n_features, d_model = shape
    expected = {"d_sae": n_features, "d_out" if "d_out" in cfg else "d_in": d_model}
    for key, size in expected.items():
        if key in cfg and cfg[key] != size:
            raise InvalidInput(
                f"cfg.json says {key}={cfg[key]} but W_dec has shape {list(shape)}",
                code="invalid_sae",
            )
    normalization = cfg.get("normalize_activations")
    if normalization not in SAE_NORMALIZATIONS_HONOURED:
        raise InvalidInput(
            f"cfg.json asks for normalize_activations={normalization!r}, which Unfold does not "
            "apply; normalize activations yourself and register with 'none'",
            code="unsupported_sae",
        )
    architecture = cfg.get("architecture")
    if architecture in SAE_WITH_INPUT_IN_DECODER:
        raise InvalidInput(
            f"a {architecture} reconstructs with W_skip @ x besides W_dec, so its decoder alone "
            "does not explain activations; register W_dec without cfg.json to use its "
            "directions anyway",
            code="unsupported_sae",
        )
    adds_bias = bool(cfg.get("apply_b_dec_to_input", True)) or (
        architecture not in SAE_BIAS_ONLY_IF_APPLIED_TO_INPUT
        and not (architecture == "temporal" and cfg.get("tied_weights", True))
    )
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return SAEConfig(
        {
            "source": "saelens",
            **{key: cfg[key] for key in SAE_KEPT_FIELDS if key in cfg},
            **{key: metadata[key] for key in SAE_KEPT_METADATA if key in metadata},
        },
        adds_bias,
    )
