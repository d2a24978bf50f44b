"""Array formats at the boundary: `.npy`, safetensors and SAELens SAE folders.

Nothing here unpickles: `.npy` loads with ``allow_pickle=False`` and safetensors headers are
size-checked before they are parsed.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from .errors import InvalidInput

NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound

SAE_DECODER = "W_dec"
SAE_DECODER_BIAS = "b_dec"
SAE_NORMALIZATIONS_HONOURED = (None, "none")


NPY_MAGIC = b"\x93NUMPY"


def read_npy(body: bytes, what: str) -> np.ndarray:
    """A numeric array from `.npy` bytes; object (pickled) arrays are refused."""
    if not body.startswith(NPY_MAGIC):
        raise InvalidInput(
            f"{what}: not a .npy file (it must start with the .npy magic string); "
            "write it with numpy.save",
            code="invalid_npy",
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InvalidInput(
                f"{what}: object arrays (pickled data) are refused; save a numeric array",
                code="invalid_npy",
            ) from None
        raise InvalidInput(f"{what}: not a valid .npy file ({error})", code="invalid_npy") from None
    except Exception as error:  # truncated or garbage bytes
        raise InvalidInput(f"{what}: not a valid .npy file ({error})", code="invalid_npy") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise InvalidInput(f"{what}: the .npy array must be numeric", code="invalid_npy")
    return array


def write_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_safetensors(body: bytes, what: str) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, after checking its header is complete and bounded."""
    if len(body) < 8:
        raise InvalidInput(f"{what}: too short for a safetensors file", code="invalid_safetensors")
    (header_size,) = struct.unpack("<Q", body[:8])
    if header_size > MAX_SAFETENSORS_HEADER or header_size > len(body) - 8:
        raise InvalidInput(
            f"{what}: safetensors header claims {header_size} bytes but the file holds "
            f"{len(body) - 8} after the size field (truncated or corrupt)",
            code="invalid_safetensors",
        )
    try:
        header = json.loads(body[8 : 8 + header_size])
        dtypes = {k: v.get("dtype") for k, v in header.items() if k != "__metadata__"}
    except (ValueError, AttributeError) as error:
        raise InvalidInput(
            f"{what}: safetensors header is not valid JSON ({error})", code="invalid_safetensors"
        ) from None
    unsupported = {k: d for k, d in dtypes.items() if d == "BF16"}
    if unsupported:
        raise InvalidInput(
            f"{what}: bfloat16 tensors {sorted(unsupported)} cannot be read without torch; "
            "save them as float32",
            code="invalid_safetensors",
        )
    try:
        return load_safetensors(body)
    except Exception as error:
        raise InvalidInput(
            f"{what}: not a valid safetensors file ({error})", code="invalid_safetensors"
        ) from None


def write_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def pick_dictionary_tensors(
    tensors: dict[str, np.ndarray], tensor: str | None, bias_tensor: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The directions (and bias) in a safetensors file: named, SAELens's `W_dec`/`b_dec`, or
    the only 2-D tensor."""
    if tensor is None:
        matrices = [name for name, t in tensors.items() if t.ndim == 2]
        if SAE_DECODER in tensors:
            tensor = SAE_DECODER
        elif len(matrices) == 1:
            tensor = matrices[0]
        else:
            raise InvalidInput(
                f"cannot tell which tensor holds the directions among {sorted(tensors)}; "
                "name it with the `tensor` field",
                code="invalid_dictionary",
            )
    if tensor not in tensors:
        raise InvalidInput(
            f"no tensor {tensor!r} in the file; it holds {sorted(tensors)}",
            code="invalid_dictionary",
        )
    if bias_tensor is None and tensor == SAE_DECODER and SAE_DECODER_BIAS in tensors:
        bias_tensor = SAE_DECODER_BIAS
    if bias_tensor is not None and bias_tensor not in tensors:
        raise InvalidInput(
            f"no bias tensor {bias_tensor!r} in the file; it holds {sorted(tensors)}",
            code="invalid_dictionary",
        )
    return tensors[tensor], (tensors[bias_tensor] if bias_tensor else None)


def read_sae_config(body: bytes, directions: np.ndarray) -> dict[str, Any]:
    """Check a SAELens `cfg.json` against the decoder; return the metadata worth keeping.

    Decoding is ``acts @ W_dec + b_dec`` whatever `apply_b_dec_to_input` says (that flag is
    about the encoder's input), so it is recorded, not refused. Activation normalization is
    refused: the service would have to apply it to every request, and does not.
    """
    try:
        cfg = json.loads(body)
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
    except ValueError as error:
        raise InvalidInput(f"cfg.json is not a JSON object ({error})", code="invalid_sae") from None
    n_features, d_model = directions.shape
    expected = {"d_sae": n_features, "d_in": d_model}
    for key, size in expected.items():
        if key in cfg and cfg[key] != size:
            raise InvalidInput(
                f"cfg.json says {key}={cfg[key]} but W_dec has shape {list(directions.shape)}",
                code="invalid_sae",
            )
    normalization = cfg.get("normalize_activations")
    if normalization not in SAE_NORMALIZATIONS_HONOURED:
        raise InvalidInput(
            f"cfg.json asks for normalize_activations={normalization!r}, which Unfold does not "
            "apply; normalize activations yourself and register with 'none'",
            code="unsupported_sae",
        )
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    keep = ("architecture", "dtype", "apply_b_dec_to_input", "d_in", "d_sae")
    return {
        "source": "saelens",
        **{key: cfg[key] for key in keep if key in cfg},
        **{key: metadata[key] for key in ("model_name", "hook_name") if key in metadata},
    }
