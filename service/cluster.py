"""Dataset-scale unfolding on a Ray cluster with Ray Data (the `ray` extra).

The shards still to solve (`datasets.Shard`) become a Ray dataset; `map_batches` solves them on
a pool of actors, each of which prepares the dictionary once (`unfolding.RowSolver`) and reads
its shards' rows from the input itself (`datasets.solve_shard`: the same batches as in-process,
so the same answers). The codes come back to the caller shard by shard, in the order they
finish, and the caller writes them (`datasets.CodesWriter`): the output needs no shared
filesystem, the input does (every node reads it at the same path).

A caller that passes `stop_requested` (the server's jobs: a cancel, a shutdown) is heard within
a batch: a small flag actor is set when it answers True, and the actors ask it before each
batch of a shard, so the shard in flight stops there and the pool is shut down.

The pool has one actor per GPU where the cluster has GPUs, else one per node, each holding a
node's CPUs (XLA uses every core of its process). Every node needs Unfold installed with the
same Python (``pip install 'unfold[ray]'``).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from .datasets import Activations, Shard, Tensors, solve_shard

log = logging.getLogger(__name__)

LOCAL = "local"
"""The address that starts a private Ray instance on this machine (on 127.0.0.1)."""

STOP_POLL_S = 0.2
"""How often the driver asks `stop_requested`."""

_connected: str | None = None
_connect_lock = threading.Lock()


class ClusterError(RuntimeError):
    """Ray is missing, unreachable, or failed a job for a reason other than its input."""


def require() -> None:
    """A `ClusterError` now, rather than at the first job, when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise ClusterError(
            "Ray is not installed: pip install 'unfold[ray]' (on every node of the cluster)"
        )


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("host:port", "ray://host:port", "auto", or `LOCAL`),
    once per process."""
    global _connected
    require()
    import ray

    with _connect_lock:
        if _connected is not None:
            if _connected != address:
                raise ClusterError(f"this process is already connected to Ray at {_connected}")
            return
        options = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address == LOCAL:
                ray.init(**options, _node_ip_address="127.0.0.1", include_dashboard=False)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterError(f"cannot connect to Ray at {address}: {error}") from None
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no line per execution
        _connected = address


def pool(shards: int, actors: int | None = None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for `shards` shards on the connected cluster."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpus = int(sum(node.get("GPU", 0) for node in nodes))
    if gpus:
        return min(actors or gpus, shards), 1.0, 1.0
    cpus = min(node.get("CPU", 1) for node in nodes if node.get("CPU"))
    return min(actors or len(nodes), shards), max(1.0, cpus), 0.0


class _StopFlag:
    """A Ray actor holding one flag: set by the driver, read by the shard solvers."""

    def __init__(self):
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


class _ShardSolver:
    """A Ray Data actor: solves whole shards, answers each one's codes as safetensors bytes;
    with a `stop_flag` (a `_StopFlag` actor), stops a shard before a batch once it is set."""

    def __init__(
        self, directions, bias, method, params, input_path, input_tensor, batch_rows, stop_flag
    ):
        from .unfolding import RowSolver

        self.solve = RowSolver(directions, bias, method, params)
        self.source = Activations(Path(input_path), input_tensor)
        self.batch_rows = batch_rows
        self.stop_flag = stop_flag

    def check_stop(self) -> None:
        import ray

        import solvers

        if ray.get(self.stop_flag.is_set.remote()):
            raise solvers.Cancelled("stopped by the driver")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = []
        check = None if self.stop_flag is None else self.check_stop
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"], strict=True):
            shard = Shard(int(index), int(start), int(stop))
            codes = solve_shard(self.source, shard, self.batch_rows, self.solve, check)
            data.append(save_tensors(codes))
        return {"index": batch["index"], "data": np.array(data, dtype=object)}


def unfold_shards(
    address: str,
    directions: np.ndarray,
    bias: np.ndarray | None,
    method: str,
    params: dict,
    input_path: Path,
    input_tensor: str | None,
    shards: Iterable[Shard],
    batch_rows: int,
    actors: int | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> Iterator[tuple[Shard, Tensors]]:
    """Each of `shards` of the activations at `input_path` with its codes, solved on the Ray
    cluster at `address` (see the module docstring); closing the iterator stops the work, and
    so does `stop_requested()` answering True (`solvers.Cancelled`, within a batch).
    `method` and `params` are checked here first (`unfolding.check_params`)."""
    import ray
    import ray.data

    import solvers

    from .unfolding import check_params

    check_params(*np.shape(directions), method, params)
    connect(address)
    shards = {shard.index: shard for shard in shards}
    if not shards:
        return
    size, cpus, gpus = pool(len(shards), actors)
    log.info("unfolding %d shard(s) on Ray at %s: %d actor(s)", len(shards), address, size)
    flag = None if stop_requested is None else ray.remote(num_cpus=0)(_StopFlag).remote()
    codes = ray.data.from_items([shard._asdict() for shard in shards.values()]).map_batches(
        _ShardSolver,
        fn_constructor_args=(
            np.asarray(directions),
            None if bias is None else np.asarray(bias),
            method,
            params,
            str(Path(input_path).resolve()),
            input_tensor,
            batch_rows,
            flag,
        ),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=cpus,
        num_gpus=gpus,
        batch_format="numpy",
    )
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(STOP_POLL_S):
            if stop_requested():
                flag.set.remote()
                return

    if flag is not None:
        threading.Thread(target=watch, name="unfold-ray-stop", daemon=True).start()
    try:
        for row in codes.iter_rows():
            yield shards[int(row["index"])], load_tensors(bytes(row["data"]))
    except ray.exceptions.RayError as error:
        if stop_requested is not None and stop_requested():
            raise solvers.Cancelled("stopped while the shards were being solved") from None
        raise _failure(error) from None
    finally:
        finished.set()
        if flag is not None:
            ray.kill(flag)


def _failure(error: Exception) -> ClusterError:
    """A `ClusterError` saying what failed on the cluster: the last line of the remote
    traceback (the exception raised there), not Ray's wrapping of it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(error, "error_msg", None) or str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return ClusterError(f"the Ray job failed: {lines[-1] if lines else type(error).__name__}")
