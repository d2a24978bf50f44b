"""Execution plans: how a batch runs on a backend, apart from the maths of the methods.

A `Plan` says how many rows a compiled call takes, how many of them are solved together,
how many calls run at once, whether a call must run alone, which argmax kernel selects atoms
in which precision OMP scans correlations and how a call is split across devices.
`plan_for` chooses one from the backend, the dictionary (and where it lives) and the device's
memory; every field can be overridden.

- CPU (tuned on 2 cores, jaxlib 0.10): small chunks mapped one after another inside a call
  (a row's working set stays in cache; OMP's on the Gram path as few as the last-level cache
  holds), one call per core at once (XLA's CPU runtime runs
  separate calls side by side but not one program's loops), a vectorised two-level argmax
  (its native argmax is a scalar loop), non-negative OMP alone in the process (two of its
  programs at once deadlock in that runtime), strict float32 scans.
- Accelerators (GPU, TPU): a whole call is one chunk, as many rows as a quarter of the free
  device memory holds (at most `ACCELERATOR_MAX_ROWS`), one stream, native argmax, no lock,
  and OMP's bfloat16 scan with float32 re-scoring where the dictionary was prepared for it.
- Several devices (`solvers._sharding`): split by rows, a call takes a block of rows for
  each device, padded to a multiple of the device count; split by features, one call at a
  time (the devices exchange partial results inside it).
"""

from __future__ import annotations

import dataclasses
import glob
import os

from ._dictionary import SCANS, Dictionary, available_bytes
from ._lasso import _L1Settings
from ._omp import OMP

DEFAULT_BLOCK_ROWS = 1024
"""CPU: rows per compiled call; larger batches run as several calls of this size."""
CPU_GRAM_CHUNK_ROWS = {OMP: 4, _L1Settings: 64}
"""CPU, Gram path: rows solved together, by method (at most, for OMP). OMP: each row keeps its
own Gram rows (up to k + 1 of n_features), and few rows keep them in cache (P1, k=32,
interleaved medians: 1879 rows/s in chunks of 4 against 1631 in 8 and 1189 in 16;
non-negative OMP 1234 against 1013). LASSO methods: each proximal-gradient step or working-set
refresh multiplies the chunk by the whole dictionary, which pays off for many rows (P1, FISTA
alpha=0.05: 29 rows/s in chunks of 64 against 13 in 8; the LASSO: 1060 against 1004 in 32 and
923 in 128)."""
CPU_OMP_CACHE_SHARE = 0.5
"""CPU, Gram path, OMP: fewer rows per chunk (down to `CPU_OMP_MIN_CHUNK_ROWS`) while the
chunks of all streams would keep more than this share of the last-level cache busy with their
rows' working sets (24576 x 768 on a 32 MiB L3, rows/s in chunks of 2 against 4: k=32 603 and
874 against 531 and 729, k=64 218 and 270 against 156 and 181)..."""
CPU_OMP_MIN_CHUNK_ROWS = 2
"""... but not below 2 rows (one row alone: 47 rows/s against 218 for 2, k=64)."""
DEFAULT_CACHE_BYTES = 32 << 20
"""The last-level cache assumed where the system does not say."""
CPU_CHUNK_ROWS = 8
"""CPU: rows solved together otherwise (the fewest on the matrix-free path)."""
CPU_CHUNK_BYTES = 64 << 20
"""CPU, matrix-free path: chunks as large as keeps a (chunk, n_features) array under this
size (every step multiplies the chunk by the whole dictionary: more rows use it better)..."""
CPU_MAX_CHUNK_ROWS = 256
"""... and at most this many rows."""
MAX_STREAMS = 8
"""Most calls solved at once."""
ACCELERATOR_MEMORY_FRACTION = 0.25
"""Accelerators: a call's working memory is at most this share of the free device memory..."""
ACCELERATOR_MAX_ROWS = 4096
"""... and it takes at most this many rows."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How `solvers.unfold` runs a batch (hashable: static under jit).

    Attributes:
        backend: "cpu", "gpu" or "tpu".
        block_rows: most rows of one compiled call (larger batches run as several calls).
        chunk_rows: rows solved together inside a call, which maps over its chunks.
        streams: calls solved at once, each from its own thread.
        min_rows: fewest rows a call is padded to.
        run_alone: the call holds a process-wide lock (no other such call alongside).
        native_argmax: select atoms with ``jnp.argmax`` (else a vectorised two-level search).
        scan: OMP's correlation scan on the matrix-free path, "float32" or "bfloat16" (float32
            selections either way: `solvers._scan`).
        shard: the dictionary's split across devices: None (one device), "rows" or "features".
        devices: how many devices it lives on; split by rows, a call's padded rows are a
            multiple of it.
    """

    backend: str
    block_rows: int
    chunk_rows: int
    streams: int = 1
    min_rows: int = 1
    run_alone: bool = False
    native_argmax: bool = False
    scan: str = "float32"
    shard: str | None = None
    devices: int = 1

    def calls(self, n_rows: int) -> list[tuple[range, int]]:
        """(rows, padded rows) of each compiled call that a batch of `n_rows` runs as
        (`split_rows`, `padded_rows`, then `shared_rows` when split by rows): with given
        settings and dictionary, one program per padded size."""
        sizes = (self.chunk_rows, self.block_rows, self.min_rows)
        return [
            (rows, self.shared_rows(padded_rows(len(rows), *sizes)))
            for rows in split_rows(n_rows, self.chunk_rows, self.block_rows, self.streams)
        ]

    def shared_rows(self, n_padded: int) -> int:
        """Split by rows: `n_padded` rows grown to the same whole number of chunks for each
        device (a device solves chunks of the rows one device would solve together, so its
        answers are one device's); else `n_padded`."""
        if self.shard != "rows":
            return n_padded
        unit = min(self.chunk_rows, n_padded)
        return -(-n_padded // (unit * self.devices)) * unit * self.devices


def padded_rows(n_rows: int, chunk_rows: int, block_rows: int, min_rows: int = 1) -> int:
    """Rows of the compiled call for a (partial) block: a power of two times `chunk_rows`, or
    for fewer rows than a chunk, a power of two, at least `min_rows` (at most a chunk; 1: a single
    row is solved alone)."""
    n_rows = max(1, min(min_rows, chunk_rows), min(n_rows, block_rows))
    if n_rows <= chunk_rows:
        return min(chunk_rows, 1 << (n_rows - 1).bit_length())
    chunks = -(-n_rows // chunk_rows)
    return chunk_rows * (1 << (chunks - 1).bit_length())


def split_rows(n_rows: int, chunk_rows: int, block_rows: int, streams: int) -> list[range]:
    """The rows of each call for a batch of `n_rows`: full calls of ``block_rows // streams``
    rows (a multiple of `chunk_rows`), then the rest split evenly into as many calls as keep a
    chunk each, at most `streams` (so that even a small batch keeps every stream busy)."""
    per_call = max(chunk_rows, block_rows // streams // chunk_rows * chunk_rows)
    full = n_rows // per_call * per_call
    rest = n_rows - full
    pieces = min(streams, -(-rest // chunk_rows))
    starts = [*range(0, full, per_call), *(full + rest * i // pieces for i in range(pieces))]
    if not starts:  # no rows: one empty call (padded to a row) gives empty results
        return [range(0)]
    return [range(a, b) for a, b in zip(starts, [*starts[1:], n_rows], strict=True)]


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cache_bytes() -> int:
    """The CPU's last-level cache (Linux's sysfs, sizes such as "32768K"), else
    `DEFAULT_CACHE_BYTES`."""
    shifts = {"K": 10, "M": 20, "G": 30}
    caches = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as level, open(f"{index}/size") as size:
                text = size.read().strip()
                caches[int(level.read())] = int(text.rstrip("KMG")) << shifts.get(text[-1], 0)
        except (OSError, ValueError, IndexError):
            continue
    return caches[max(caches)] if caches else DEFAULT_CACHE_BYTES


def _power_of_two_below(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def plan_for(
    settings,
    dictionary: Dictionary,
    *,
    backend: str | None = None,
    chunk_rows: int | None = None,
    block_rows: int | None = None,
    streams: int | None = None,
    scan: str | None = None,
) -> Plan:
    """The plan for `settings` over `dictionary` on `backend` (default: where the dictionary
    lives); the keyword arguments override its fields."""
    if backend is None:
        backend = next(iter(dictionary.atoms.devices())).platform
    gram = dictionary.gram is not None
    scannable = isinstance(settings, OMP) and not settings.positive and not gram
    if scan is None:
        scan = "bfloat16" if scannable and dictionary.scan_atoms is not None else "float32"
    elif scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    elif scan == "bfloat16" and (not scannable or dictionary.scan_atoms is None):
        raise ValueError(
            "the bfloat16 scan is for OMP (not positive) on a matrix-free dictionary prepared "
            "with prepare(..., gram=False, scan='bfloat16')"
        )
    if backend == "cpu":
        plan = _cpu_plan(settings, dictionary, gram)
    else:
        plan = _accelerator_plan(settings, dictionary, gram, backend)
    plan = dataclasses.replace(plan, scan=scan)
    shard = dictionary.shard
    if shard is not None:
        n_devices = len(dictionary.devices)
        plan = dataclasses.replace(
            plan,
            shard=shard,
            devices=n_devices,
            # Split by rows: each device takes a call's worth; split by features: one call.
            block_rows=plan.block_rows * n_devices if shard == "rows" else plan.block_rows,
            streams=plan.streams if shard == "rows" else 1,
        )
    if chunk_rows is not None:
        plan = dataclasses.replace(plan, chunk_rows=chunk_rows)
    if streams is not None:
        plan = dataclasses.replace(plan, streams=1 if plan.run_alone else streams)
    block = plan.block_rows if block_rows is None else block_rows
    # A call holds whole chunks.
    return dataclasses.replace(
        plan, block_rows=max(plan.chunk_rows, block - block % plan.chunk_rows)
    )


def _cpu_plan(settings, dictionary: Dictionary, gram: bool) -> Plan:
    if gram:
        chunk = next(
            (rows for kind, rows in CPU_GRAM_CHUNK_ROWS.items() if isinstance(settings, kind)),
            CPU_CHUNK_ROWS,
        )
    else:
        rows = CPU_CHUNK_BYTES // (dictionary.n_features * dictionary.dtype.itemsize)
        chunk = _power_of_two_below(min(max(rows, CPU_CHUNK_ROWS), CPU_MAX_CHUNK_ROWS))
    omp = isinstance(settings, OMP)
    # Non-negative OMP factors its support's Gram block with LAPACK's Cholesky inside its loop,
    # and two such programs at once deadlock in jaxlib 0.10's CPU runtime.
    alone = omp and settings.positive
    # On the matrix-free path each product uses every core already.
    streams = 1 if alone or not gram else max(1, min(_cpu_cores(), MAX_STREAMS))
    if omp and gram:
        row_bytes = settings.row_floats(dictionary.n_features, dictionary.d_model, gram)
        row_bytes *= dictionary.dtype.itemsize
        fits = CPU_OMP_CACHE_SHARE * _cache_bytes() / (row_bytes * streams)
        chunk = max(CPU_OMP_MIN_CHUNK_ROWS, min(chunk, _power_of_two_below(fits)))
    return Plan(
        backend="cpu",
        block_rows=DEFAULT_BLOCK_ROWS,
        chunk_rows=chunk,
        streams=streams,
        # A lone row on the Gram path is solved padded to two: XLA compiles the one-row loop
        # with copies of the stored Gram rows at every step, and two rows take less time than
        # one (8192 x 512, k=32: OMP 3.8 against 5.6 ms, non-negative OMP 5.2 against 7.9).
        min_rows=2 if omp and gram else 1,
        run_alone=alone,
    )


def _accelerator_plan(settings, dictionary: Dictionary, gram: bool, backend: str) -> Plan:
    device = next(iter(dictionary.atoms.devices()))
    row_bytes = settings.row_floats(dictionary.n_features, dictionary.d_model, gram) * (
        dictionary.dtype.itemsize
    )
    budget = available_bytes(device) * ACCELERATOR_MEMORY_FRACTION
    rows = _power_of_two_below(min(max(budget // row_bytes, 1), ACCELERATOR_MAX_ROWS))
    return Plan(backend=backend, block_rows=rows, chunk_rows=rows, native_argmax=True)
