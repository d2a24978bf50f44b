"""Dataset-scale unfolding as jobs, durable on the embedded default.

A job unfolds a dataset of activations (`datasets.Activations`: a file or a folder of shards)
over a registered dictionary, a shard at a time, into ``<data_dir>/jobs/<id>/``:
``codes/`` (the shards and their manifest, `datasets.CodesWriter`), then ``result.safetensors``
(every row, in input order) and ``features.safetensors`` (per-feature statistics).

- State lives in SQLite (``<data_dir>/jobs.sqlite``): ``queued`` -> ``running`` ->
  ``succeeded`` | ``failed`` | ``cancelled``, with rows done and total, times and the error.
- `max_jobs` jobs run at once, each on its own thread. Interactive requests keep priority:
  before each batch a job waits while the batcher has rows outstanding.
- A job stopped by a crash or a restart resumes from its last finished shard (the shards are
  written atomically, solved with the same shard and batch boundaries): its results are those
  of an uninterrupted run.
- Cancelling stops a running job at once (`solvers.unfold`'s cancel event); on Ray, within a
  batch (`cluster.unfold_shards`' `stop_requested`).
- With a Ray address (``UNFOLD_RAY_ADDRESS``) the shards are solved on that cluster
  (`cluster.unfold_shards`) and written here as they come back: the same files, the same codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

import solvers

from . import cluster
from .datasets import MANIFEST, Activations, CodesWriter, unfold_shards
from .errors import Conflict, NotFound
from .registry import Registry

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
BATCH_ROWS = 1024
"""Rows per solver call of a job."""
IDLE_WAIT_S = 0.05
"""How long a job waits, between checks, while interactive requests are outstanding."""


@dataclasses.dataclass
class Job:
    id: str
    state: str
    dictionary: str  # the dictionary's id
    method: str
    params: dict  # the solver's parameters, as given
    input: str  # the input file or folder
    rows_total: int
    rows_done: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    rows_at_start: int = 0  # rows done before this run of it (a resumed job's earlier ones)

    def describe(self) -> dict:
        """The job as the API shows it, with its speed and the time left."""
        speed = eta = None
        if self.started_at is not None:
            elapsed = (self.finished_at or time.time()) - self.started_at
            solved = self.rows_done - self.rows_at_start
            if elapsed > 0 and solved > 0:
                speed = solved / elapsed
                if self.state == "running":
                    eta = (self.rows_total - self.rows_done) / speed
        fields = dataclasses.asdict(self)
        del fields["rows_at_start"]
        return {**fields, "rows_per_s": speed, "eta_s": eta}


COLUMNS = [field.name for field in dataclasses.fields(Job)]


class JobStore:
    """Jobs in a SQLite table (one connection, serialised by a lock)."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT, dictionary "
                "TEXT, method TEXT, params TEXT, input TEXT, rows_total INTEGER, rows_done "
                "INTEGER, created_at REAL, started_at REAL, finished_at REAL, error TEXT, "
                "rows_at_start INTEGER)"
            )

    def add(self, job: Job) -> None:
        values = [json.dumps(v) if k == "params" else v for k, v in dataclasses.asdict(job).items()]
        with self._lock:
            self._db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * len(COLUMNS))})", values)

    def update(self, job_id: str, **fields) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", [*fields.values(), job_id]
            )

    def get(self, job_id: str) -> Job | None:
        jobs = self._select("WHERE id = ?", job_id)
        return jobs[0] if jobs else None

    def all(self) -> list[Job]:
        return self._select("ORDER BY created_at")

    def claim(self) -> Job | None:
        """The oldest queued job, now marked running."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", row)
        return self.get(row[0])

    def requeue_running(self) -> int:
        """Jobs left running by a process that stopped: queued again (they resume)."""
        with self._lock:
            return self._db.execute(
                "UPDATE jobs SET state = 'queued' WHERE state = 'running'"
            ).rowcount

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", [job_id])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _select(self, clause: str, *args) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs {clause}", args)
            rows = rows.fetchall()
        return [
            Job(
                **{
                    k: json.loads(v) if k == "params" else v
                    for k, v in zip(COLUMNS, row, strict=True)
                }
            )
            for row in rows
        ]


class Jobs:
    """Runs the jobs of an app (see the module docstring).

    Args:
        data_dir: where ``jobs.sqlite`` and ``jobs/`` live.
        registry: the app's dictionaries.
        batcher: the app's `Batcher` (its programs solve; its queues have priority).
        max_jobs: jobs running at once.
        shard_rows: rows per shard of a job's codes (what a resume redoes at most).
        ray_address: solve on this Ray cluster instead (`cluster`), where given.
    """

    def __init__(
        self,
        data_dir: Path,
        registry: Registry,
        batcher,
        max_jobs: int = 1,
        shard_rows: int = 16384,
        ray_address: str | None = None,
    ):
        self.root = Path(data_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(Path(data_dir) / "jobs.sqlite")
        self.registry, self.batcher, self.max_jobs = registry, batcher, max_jobs
        self.shard_rows = shard_rows
        self.ray_address = ray_address
        if ray_address:
            cluster.require()
        self._wakeup = threading.Event()
        self._closed = threading.Event()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, background) -> None:
        """Resume the jobs a stopped process left running, and start the workers."""
        self._closed.clear()
        resumed = self.store.requeue_running()
        if resumed:
            log.info("resuming %d job(s) left running", resumed)
        for number in range(self.max_jobs):
            background.start(f"unfold-jobs-{number}", self._work, background.stopping)

    def submit(
        self, entry, method: str, params: dict, source: Activations, input_path: Path
    ) -> Job:
        """A new queued job (inputs already checked)."""
        job = Job(
            id=uuid.uuid4().hex[:16],
            state="queued",
            dictionary=entry.record.id,
            method=method,
            params=params,
            input=str(input_path),
            rows_total=source.rows,
            created_at=time.time(),
        )
        self.store.add(job)
        self._wakeup.set()
        return job

    def new_folder(self) -> Path:
        """A folder for an uploaded input, moved to its job by `adopt`."""
        folder = self.root / f".upload-{uuid.uuid4().hex[:16]}"
        folder.mkdir()
        return folder

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}; GET /v1/jobs lists them")
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished one is deleted with its files."""
        job = self.get(job_id)
        if job.state in FINISHED:
            self.store.remove(job_id)
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
            if Path(job.input).parent.parent == self.root:  # an uploaded input (`new_folder`)
                shutil.rmtree(Path(job.input).parent, ignore_errors=True)
            return job
        self.store.update(job_id, state="cancelled", finished_at=time.time())
        with self._lock:
            event = self._cancels.get(job_id)
        if event is not None:
            event.set()
        return self.get(job_id)

    def result_path(self, job_id: str, name: str) -> Path:
        job = self.get(job_id)
        if job.state != "succeeded":
            raise Conflict(
                f"job {job_id} is {job.state}; its {name} exist once it has succeeded",
                code="job_not_done",
            )
        return self.folder(job_id) / name

    def manifest(self, job_id: str) -> dict:
        """The manifest of a succeeded job's shards (`datasets.CodesWriter`)."""
        path = self.result_path(job_id, "codes") / MANIFEST
        return json.loads(path.read_text())

    def close(self) -> None:
        """Stop the workers now (running jobs stop too; they resume at the next start)."""
        self._closed.set()
        with self._lock:
            for event in self._cancels.values():
                event.set()
        self._wakeup.set()

    def _work(self, stopping: threading.Event) -> None:
        while not self._closed.is_set() and not self.registry.ready.wait(0.1):
            pass  # the stored dictionaries first
        while not (stopping.is_set() or self._closed.is_set()):
            job = self.store.claim()
            if job is None:
                self._wakeup.wait(1.0)
                self._wakeup.clear()
                continue
            cancel = threading.Event()
            with self._lock:
                self._cancels[job.id] = cancel
            try:
                self._run(job, cancel, stopping)
            except solvers.Cancelled:
                pass  # cancelled (its state says so), or stopping (it stays running: resumed)
            except Exception as error:  # noqa: BLE001 (the job fails, the worker goes on)
                log.warning("job %s failed: %s", job.id, error)
                message = getattr(error, "message", None) or str(error)
                self.store.update(job.id, state="failed", error=message, finished_at=time.time())
            finally:
                with self._lock:
                    self._cancels.pop(job.id, None)

    def _run(self, job: Job, cancel: threading.Event, stopping: threading.Event) -> None:
        from .unfolding import PARAMS_ADAPTER, answer_tensors, checked, solver_settings, validate

        entry = self.registry.get(job.dictionary)
        params = validate(PARAMS_ADAPTER, {"method": job.method, **job.params})
        settings = solver_settings(entry, params)
        source = Activations(Path(job.input))
        folder = self.folder(job.id)
        header = {"dictionary": job.dictionary, "method": job.method, "params": job.params,
                  "input": source.fingerprint(), "shard_rows": self.shard_rows,
                  "batch_size": BATCH_ROWS}  # fmt: skip
        writer = CodesWriter(folder / "codes", header, resume=(folder / "codes").exists())
        pending = writer.pending(source.rows, self.shard_rows)
        done = writer.rows_done
        self.store.update(job.id, started_at=time.time(), rows_done=done, rows_at_start=done)
        if self.ray_address:
            record = entry.record
            solved = cluster.unfold_shards(
                self.ray_address, record.directions, record.bias, job.method, job.params,
                Path(job.input), None, pending, BATCH_ROWS,
                stop_requested=lambda: cancel.is_set() or stopping.is_set(),
            )  # fmt: skip
        else:

            def solve(rows: np.ndarray) -> dict[str, np.ndarray]:
                result = self.batcher.programs.run(entry, settings, rows, cancel)
                return answer_tensors(checked(entry.prepared, entry.record, rows, result, params))

            solved = unfold_shards(
                source,
                pending,
                BATCH_ROWS,
                solve,
                lambda: self._yield_to_requests(cancel, stopping),
            )
        with contextlib.closing(solved):
            for shard, tensors in solved:
                writer.write(shard.index, shard.start, tensors)
                done += shard.stop - shard.start
                self.store.update(job.id, rows_done=done)
                self._check(cancel, stopping)
        metadata = {"dictionary": job.dictionary, "method": job.method,
                    "params": json.dumps(job.params)}  # fmt: skip
        writer.assemble(folder / "result.safetensors", source.shape, metadata)
        save_file(_feature_statistics(writer.shards(), entry.record.n_features, source.rows),
                  folder / "features.safetensors")  # fmt: skip
        self.store.update(job.id, state="succeeded", finished_at=time.time())

    @staticmethod
    def _check(cancel: threading.Event, stopping: threading.Event) -> None:
        """Stop (`solvers.Cancelled`) if the job is cancelled or the server stopping."""
        if stopping.is_set():
            cancel.set()
        if cancel.is_set():
            raise solvers.Cancelled("the job was cancelled")

    def _yield_to_requests(self, cancel: threading.Event, stopping: threading.Event) -> None:
        """Wait while interactive requests are outstanding; stop if cancelled or stopping."""
        while True:
            self._check(cancel, stopping)
            if not self.batcher.busy():
                return
            time.sleep(IDLE_WAIT_S)


def _feature_statistics(shards: list[Path], n_features: int, rows: int) -> dict[str, np.ndarray]:
    """Per feature, over every row: how often it fires (`frequency`, a fraction of rows),
    its mean code where it fires (`mean`), its largest code in absolute value (`max_abs`) and
    `count`; read a shard at a time."""
    count = np.zeros(n_features, np.int64)
    total = np.zeros(n_features, np.float64)
    largest = np.zeros(n_features, np.float32)
    for path in shards:
        with safe_open(path, "np") as shard:
            indices, values = shard.get_tensor("indices"), shard.get_tensor("values")
        fired = (indices >= 0) & (values != 0)
        features, codes = indices[fired], values[fired]
        count += np.bincount(features, minlength=n_features)
        total += np.bincount(features, weights=codes, minlength=n_features)
        np.maximum.at(largest, features, np.abs(codes))
    mean = np.divide(total, count, out=np.zeros(n_features), where=count > 0)
    return {
        "count": count,
        "frequency": (count / max(rows, 1)).astype(np.float32),
        "mean": mean.astype(np.float32),
        "max_abs": largest,
    }
