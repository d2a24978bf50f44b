"""A dictionary with its once-per-dictionary precomputation (norms, Gram, Lipschitz constant),
and the choice between the Gram and the matrix-free path, made from the device's memory."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._products import STRICT, matmul
from ._sharding import (
    check_shard,
    device_bytes,
    mesh_of,
    place_features,
    placement,
    replicated,
    resolve_devices,
    split,
)
from ._validation import check_dictionary, check_dtype

GRAM_MEMORY_FRACTION = 0.5
"""By default a Gram matrix is built when it takes at most this share of the memory available
on the device (on a CPU: the host's available memory) when the dictionary is prepared."""
GRAM_BLOCK_BYTES = 256 << 20
"""The Gram matrix is computed this many bytes of rows at a time, into its final buffer."""
SCANS = ("float32", "bfloat16")
"""Precisions of OMP's correlation scan on the matrix-free path (see `solvers._scan`)."""


class Dictionary(NamedTuple):
    """Feature directions and what every solve needs from them, computed once.

    A NamedTuple of arrays, hence a JAX pytree: pass it straight into jitted code. On several
    devices split by features (`solvers._sharding`), `atoms`, `scan_atoms` and the columns of
    `gram` are padded with zero rows (columns) to a multiple of the device count (`unpadded`
    drops them); `norms` has the true `n_features`.

    Attributes:
        atoms: feature directions, of shape (n_features, d_model).
        bias: decoder bias, of shape (d_model,) (zeros when none).
        norms: row norms of `atoms`, of shape (n_features,).
        gram: ``atoms @ atoms.T`` of shape (n_features, n_features), or None (matrix-free).
        lipschitz: largest eigenvalue of ``atoms.T @ atoms``, a scalar (the LASSO step bound).
        scan_atoms: `atoms` rounded to bfloat16, of shape (n_features, d_model), for OMP's
            fast correlation scan on the matrix-free path; None: every scan is strict float32.
        scan_error: a scalar ``e`` such that a bfloat16 scan's norm-scaled score of any atom is
            within ``||r - bf16(r)|| + e ||bf16(r)||`` of its float32 value, for a residual
            ``r`` (`solvers._scan`); None without `scan_atoms`.
    """

    atoms: jax.Array
    bias: jax.Array
    norms: jax.Array
    gram: jax.Array | None
    lipschitz: jax.Array
    scan_atoms: jax.Array | None = None
    scan_error: jax.Array | None = None

    @property
    def n_features(self) -> int:
        return self.norms.shape[0]

    @property
    def d_model(self) -> int:
        return self.atoms.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.atoms.dtype)

    @property
    def path(self) -> str:
        """ "gram" or "matrix-free"."""
        return "matrix-free" if self.gram is None else "gram"

    @property
    def nbytes(self) -> int:
        """Memory of every array held, counted once (however many devices hold a copy)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self))

    @property
    def devices(self) -> tuple:
        """The devices the dictionary lives on (in the order of their mesh)."""
        return placement(self.atoms)[0]

    @property
    def shard(self) -> str | None:
        """How it is split across its devices: "rows" (replicated on each, batches split),
        "features" (atoms split), or None on one device."""
        return placement(self.atoms)[1]

    @property
    def device_bytes(self) -> int:
        """Memory it takes on each device (the most on any one)."""
        return device_bytes(jax.tree_util.tree_leaves(self))

    def unpadded(self) -> Dictionary:
        """The dictionary without the zero rows that pad feature-sharded atoms (usable inside
        jitted code: a slice on the shards' boundaries, which moves nothing); itself when
        there are none."""
        n = self.n_features
        if self.atoms.shape[0] == n:
            return self
        return self._replace(
            atoms=self.atoms[:n],
            gram=None if self.gram is None else self.gram[:, :n],
            scan_atoms=None if self.scan_atoms is None else self.scan_atoms[:n],
        )


def precision(dtype) -> contextlib.AbstractContextManager:
    """A scope in which JAX computes in `dtype` (float32 or float64).

    float64 needs JAX's 64-bit mode; it is switched on for this scope only (thread-locally), so
    importing or using `solvers` never changes global JAX configuration. Run every jitted call
    on a float64 `Dictionary` inside this scope (`unfold` does).
    """
    if np.dtype(dtype) == np.float64 and not jax.config.x64_enabled:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def gram_bytes(n_features: int, dtype="float32") -> int:
    """Memory the Gram matrix of `n_features` atoms takes."""
    return n_features * n_features * np.dtype(dtype).itemsize


def footprint(n_features: int, d_model: int, dtype="float32", *, gram: bool, scan: str) -> int:
    """Device memory a prepared dictionary takes (`Dictionary.nbytes`), known before `prepare`."""
    itemsize = np.dtype(dtype).itemsize
    vectors = n_features * d_model + d_model + n_features + 1  # atoms, bias, norms, lipschitz
    size = vectors * itemsize + (gram_bytes(n_features, dtype) if gram else 0)
    if scan == "bfloat16":
        size += n_features * d_model * 2 + itemsize  # scan_atoms, scan_error
    return size


def default_scan(dtype, gram: bool) -> str:
    """OMP's scan precision when `prepare` is not told: bfloat16 on an accelerator for a float32
    matrix-free dictionary, else float32."""
    accelerator = jax.default_backend() != "cpu"
    return "bfloat16" if accelerator and not gram and np.dtype(dtype) == np.float32 else "float32"


def host_available_bytes() -> int:
    """The host's available memory (Linux's MemAvailable: free plus reclaimable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def available_bytes(device=None) -> int:
    """Memory free for new arrays on `device` (default: JAX's first device): an accelerator's
    limit minus what is in use, or on a CPU the host's available memory."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


class PathChoice(NamedTuple):
    """Which path `prepare` takes, and why (the service reports it)."""

    gram: bool
    gram_bytes: int
    budget_bytes: int | None
    reason: str


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def choose_path(
    n_features: int,
    dtype="float32",
    *,
    gram: bool | None = None,
    gram_budget_bytes: int | None = None,
    budget_source: str = "the configured budget",
    device=None,
) -> PathChoice:
    """The Gram path when `gram` says so, else when the Gram matrix fits `gram_budget_bytes`,
    which defaults to `GRAM_MEMORY_FRACTION` of the memory available on `device` now
    (`budget_source` names a given budget in the reason)."""
    size = gram_bytes(n_features, dtype)
    if gram is not None:
        reason = "Gram path requested" if gram else "matrix-free path requested"
        return PathChoice(bool(gram), size, gram_budget_bytes, reason)
    if gram_budget_bytes is None:
        device = jax.devices()[0] if device is None else device
        available = available_bytes(device)
        budget = int(available * GRAM_MEMORY_FRACTION)
        source = (
            f"{GRAM_MEMORY_FRACTION:.0%} of the {_gb(available)} available on {device.platform}"
        )
    else:
        budget, source = int(gram_budget_bytes), budget_source
    fits = size <= budget
    verb = "fits" if fits else "exceeds"
    reason = f"the Gram matrix ({_gb(size)}) {verb} {source} ({_gb(budget)})"
    return PathChoice(fits, size, budget, reason)


def choose_shard(
    n_features: int, d_model: int, dtype="float32", *, gram: bool, scan: str, device=None
) -> str:
    """How to split a dictionary across several devices: by "features" when the prepared
    dictionary (`footprint`) takes more than `GRAM_MEMORY_FRACTION` of the memory available
    on one device (default: JAX's first), else by "rows" (a replica on each)."""
    size = footprint(n_features, d_model, dtype, gram=gram, scan=scan)
    fits = size <= available_bytes(device) * GRAM_MEMORY_FRACTION
    return "rows" if fits else "features"


def prepare(
    dictionary,
    bias=None,
    *,
    dtype: str | None = None,
    gram: bool | None = None,
    gram_budget_bytes: int | None = None,
    scan: str | None = None,
    devices=None,
    shard: str | None = None,
) -> Dictionary:
    """Validate a dictionary and precompute what every solve over it needs.

    Args:
        dictionary: feature directions, of shape (n_features, d_model); rows need not be
            unit-norm (codes are reported in the dictionary's own units). An existing
            `Dictionary` is returned unchanged when its dtype matches.
        bias: optional decoder bias of shape (d_model,): the model is
            ``x = codes @ dictionary + bias``.
        dtype: "float32" or "float64" (computed in JAX's 64-bit mode, enabled locally: see
            `precision`); None: a prepared dictionary's own, else "float32".
        gram: True to build the Gram matrix, False for the matrix-free path, None to decide by
            memory (`choose_path`).
        gram_budget_bytes: the largest Gram matrix built automatically; None: a share of the
            memory available on the device (`GRAM_MEMORY_FRACTION`).
        scan: precision of OMP's correlation scan on the matrix-free path, "float32" or
            "bfloat16" (selections stay those of float32: see `solvers._scan`); None:
            "bfloat16" on an accelerator (GPU, TPU) for a float32 matrix-free dictionary,
            else "float32".
        devices: where it lives: None (JAX's first device), a count (the first that many of
            `jax.devices()`) or a list of devices.
        shard: on several devices, "rows" (a replica on each; batches are split) or
            "features" (each device holds a block of the atoms and of the Gram matrix's
            columns, placed from host memory a block at a time; see `solvers._sharding`);
            None: `choose_shard`. Answers are those of one device.

    Raises:
        ValueError: non-2-D, empty, non-finite or all-zero rows, bias of the wrong shape.
    """
    if isinstance(dictionary, Dictionary) and dtype is None:
        dtype = dictionary.dtype.name
    np_dtype = check_dtype("float32" if dtype is None else dtype)
    if isinstance(dictionary, Dictionary):
        if dictionary.dtype != np_dtype:
            raise ValueError(f"dictionary was prepared as {dictionary.dtype}, not {np_dtype}")
        if bias is not None:
            raise ValueError("pass bias to prepare() once, not again with a prepared dictionary")
        return dictionary
    if scan is not None and scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if shard is not None:
        check_shard(shard)
    placed = None if devices is None else resolve_devices(devices)
    atoms, bias = check_dictionary(dictionary, bias, np_dtype)
    with_gram = choose_path(
        atoms.shape[0], np_dtype, gram=gram, gram_budget_bytes=gram_budget_bytes
    ).gram
    if scan is None:
        scan = default_scan(np_dtype, with_gram)
    if scan == "bfloat16" and np_dtype != np.float32:
        raise ValueError("a bfloat16 scan needs a float32 dictionary")
    if placed is not None:
        return _prepare_on(placed, shard, atoms, bias, np_dtype, with_gram, scan)
    with precision(np_dtype):
        atoms, bias = jnp.asarray(atoms), jnp.asarray(bias)
        norms = jnp.linalg.norm(atoms, axis=1)
        # d_model x d_model covariance: small even when n_features is huge.
        lipschitz = jnp.linalg.eigvalsh(matmul(atoms.T, atoms))[-1]
        gram_matrix = gram_of(atoms) if with_gram else None
        scan_atoms, scan_error = _scan_atoms(atoms, norms) if scan == "bfloat16" else (None, None)
        return Dictionary(atoms, bias, norms, gram_matrix, lipschitz, scan_atoms, scan_error)


def _prepare_on(devices: list, shard, atoms, bias, dtype, with_gram: bool, scan: str):
    """`prepare` on `devices`: on one, as on JAX's first; on several, replicated from one
    device's dictionary ("rows"), or split by features."""
    if len(devices) == 1:
        with jax.default_device(devices[0]):
            return prepare(atoms, bias, dtype=dtype.name, gram=with_gram, scan=scan)
    if shard is None:
        n_features, d_model = atoms.shape
        shard = choose_shard(n_features, d_model, dtype, gram=with_gram, scan=scan)
    mesh = mesh_of(tuple(devices))
    if shard == "rows":
        with jax.default_device(devices[0]):
            single = prepare(atoms, bias, dtype=dtype.name, gram=with_gram, scan=scan)
        return jax.device_put(single, replicated(mesh))
    with precision(dtype):
        placed = place_features(atoms, mesh)
        norms, lipschitz, gram_matrix, scan_atoms, scan_error = _feature_arrays(
            placed, atoms.shape[0], mesh, with_gram, scan == "bfloat16"
        )
        bias = jax.device_put(bias, replicated(mesh))
        return Dictionary(placed, bias, norms, gram_matrix, lipschitz, scan_atoms, scan_error)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _feature_arrays(atoms: jax.Array, n_features: int, mesh, with_gram: bool, with_scan: bool):
    """(norms, lipschitz, gram, scan_atoms, scan_error) of feature-sharded `atoms` (padded),
    each device computing its features' share: the norms and the Lipschitz constant (from the
    sum of the shards' ``atoms.T @ atoms``) replicated, the Gram matrix's and the scan atoms'
    blocks split like the atoms."""
    norms = jnp.linalg.norm(atoms, axis=1)
    lipschitz = jnp.linalg.eigvalsh(matmul(atoms.T, atoms))[-1]
    gram_matrix = scan_atoms = scan_error = None
    if with_gram:  # (n_features, padded): each device holds the columns of its features
        gram_matrix = jax.lax.dot_general(
            atoms[:n_features], atoms, (((1,), (1,)), ((), ())), precision=STRICT
        )
        gram_matrix = jax.lax.with_sharding_constraint(gram_matrix, split(mesh, axis=1))
    if with_scan:  # padding rows: norm 1, no rounding error
        scan_atoms, scan_error = _scan_atoms(atoms, jnp.where(norms > 0, norms, 1.0))
        scan_error = jax.lax.with_sharding_constraint(scan_error, replicated(mesh))
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=replicated(mesh))
    return constrain(norms[:n_features]), constrain(lipschitz), gram_matrix, scan_atoms, scan_error


def gram_of(atoms: jax.Array) -> jax.Array:
    """``atoms @ atoms.T`` in strict precision, computed a block of rows at a time into one
    buffer (donated from block to block), so it never needs more than its own size plus a
    block."""
    n_features = atoms.shape[0]
    rows = max(1, min(n_features, GRAM_BLOCK_BYTES // (n_features * atoms.dtype.itemsize)))
    gram = jnp.empty((n_features, n_features), atoms.dtype)
    for start in range(0, n_features, rows):
        gram = _gram_rows_into(gram, atoms, start, min(rows, n_features - start))
    return gram


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _gram_rows_into(gram: jax.Array, atoms: jax.Array, start, rows: int) -> jax.Array:
    """`gram` with its `rows` rows from `start` (traced: one program for every full block)
    set to those of ``atoms @ atoms.T``."""
    block = jax.lax.dynamic_slice_in_dim(atoms, start, rows, axis=0)
    block = jax.lax.dot_general(block, atoms, (((1,), (1,)), ((), ())), precision=STRICT)
    return jax.lax.dynamic_update_slice_in_dim(gram, block, start, axis=0)


@jax.jit
def _scan_atoms(atoms: jax.Array, norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bfloat16 atoms and their `Dictionary.scan_error`: the largest relative rounding error
    of an atom, ``||d - bf16(d)|| / ||d||``, plus a bound on float32 accumulation over d_model
    terms (``d_model 2^-22``, four times the worst case ``d_model 2^-24``, times the largest
    ``||bf16(d)|| / ||d||``) and on the rounding of the scaling by ``1 / ||d||`` (``2^-22``)."""
    low = atoms.astype(jnp.bfloat16)
    high = low.astype(atoms.dtype)
    rounding = jnp.linalg.norm(atoms - high, axis=1) / norms
    growth = jnp.linalg.norm(high, axis=1) / norms
    accumulation = atoms.shape[1] * 2.0**-22
    return low, jnp.max(rounding + accumulation * growth) + 2.0**-22
