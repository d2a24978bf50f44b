"""Where a dictionary lives: on one device, or on several, split by rows or by features.

- ``shard="rows"``: every array of the `Dictionary` is replicated on each device and a batch's
  rows are split evenly between them; each device runs the one-device program on its share
  (`over_rows`, a `jax.shard_map`).
- ``shard="features"``: the atoms (the Gram matrix's columns, the bfloat16 scan atoms) are cut
  into equal blocks of features, one per device, the last padded with zero rows to a multiple
  of the device count; the norms, the bias and the Lipschitz constant are replicated. jit's
  SPMD partitioner runs the one-device program over them: each device computes its features'
  correlations, a selection is a maximum across devices whose ties go to the lowest index
  (as one device's), and a chosen atom's row comes from the device that holds it. Inside the
  program `Dictionary.unpadded` drops the padding (a slice on the shards' boundaries: nothing
  moves).

`place_features` builds such arrays a shard at a time from host memory (a numpy array or a
memory map), so no device ever holds the whole dictionary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"
"""The name of the mesh axis the devices form."""
SHARDS = ("rows", "features")
"""How a dictionary is split across several devices."""


def resolve_devices(devices) -> list:
    """The devices `devices` names: None (JAX's first device), a count (the first that many of
    `jax.devices()`), or a sequence of devices."""
    available = jax.devices()
    if devices is None:
        return available[:1]
    if isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices must be between 1 and the {len(available)} device(s) JAX sees, "
                f"got {devices}"
            )
        return available[: int(devices)]
    if (
        isinstance(devices, Sequence)
        and devices
        and all(isinstance(d, jax.Device) for d in devices)
    ):
        if len(set(devices)) != len(devices):
            raise ValueError("devices lists a device more than once")
        return list(devices)
    raise ValueError(f"devices must be None, a count or a list of jax devices, got {devices!r}")


def check_shard(shard: str) -> str:
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    return shard


@functools.cache
def mesh_of(devices: tuple) -> Mesh:
    """A one-axis mesh (`AXIS`) over `devices`, the same object for the same devices."""
    return Mesh(np.array(devices, dtype=object), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split(mesh: Mesh, axis: int = 0, ndim: int = 2) -> NamedSharding:
    """Dimension `axis` of an `ndim`-D array split across the mesh's devices."""
    spec = [None] * ndim
    spec[axis] = AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def placement(array: jax.Array) -> tuple[tuple, str | None]:
    """(devices in mesh order, shard) of a dictionary's atoms: shard is None on one device,
    "rows" when replicated on several, "features" when split by rows of atoms."""
    sharding = array.sharding
    mesh = getattr(sharding, "mesh", None)
    devices = tuple(mesh.devices.flat) if mesh is not None else tuple(sharding.device_set)
    if len(devices) == 1:
        return devices, None
    return devices, "rows" if sharding.is_fully_replicated else "features"


def padded_features(n_features: int, n_devices: int) -> int:
    """Rows of feature-sharded atoms: `n_features` rounded up to a multiple of `n_devices`, so
    that each device holds ``ceil(n_features / n_devices)`` (XLA's own split of the unpadded
    size, which keeps `Dictionary.unpadded` aligned with the shards)."""
    return -(-n_features // n_devices) * n_devices


def place_features(atoms: np.ndarray, mesh: Mesh) -> jax.Array:
    """`atoms` (n_features, d_model) in host memory as a feature-sharded device array of
    `padded_features` rows (zeros past the end), placed one shard at a time."""
    n_features, d_model = atoms.shape
    padded = padded_features(n_features, mesh.size)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(padded)
        if stop <= n_features:
            return np.ascontiguousarray(atoms[start:stop])
        block = np.zeros((stop - start, d_model), atoms.dtype)
        real = atoms[start:n_features]
        block[: len(real)] = real
        return block

    return jax.make_array_from_callback((padded, d_model), split(mesh), shard)


def device_bytes(arrays) -> int:
    """The most memory the device arrays among `arrays` take on any one device."""
    per_device: dict = {}
    for array in arrays:
        for piece in array.addressable_shards:
            per_device[piece.device] = per_device.get(piece.device, 0) + piece.data.nbytes
    return max(per_device.values(), default=0)


@functools.cache
def over_rows(function: Callable, mesh: Mesh) -> Callable:
    """``function(settings, dictionary, x, plan, cancel)`` jitted (`plan` static) with the
    rows of `x` split across the mesh's devices: each runs `function` on its share against its
    replica of `settings`, `dictionary` and `cancel`; every output is split by rows likewise."""

    def program(settings, dictionary, x, plan, cancel=None):
        local = jax.shard_map(
            lambda settings, dictionary, x, cancel: function(settings, dictionary, x, plan, cancel),
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(AXIS), PartitionSpec()),
            out_specs=PartitionSpec(AXIS),
            check_vma=False,
        )
        return local(settings, dictionary, x, cancel)

    return jax.jit(program, static_argnames="plan")
