"""Dynamic batching: concurrent unfold requests with the same key are merged into one solve.

A *key* names everything that must match for rows to share a solver call: the dictionary and
the (hashable) solver settings. Requests for one key queue up; a worker task takes up to
`max_batch_size` rows from the queue (waiting at most `max_wait_ms` after the oldest request
arrived for others to join, then while requests keep arriving turn after turn of the event
loop), concatenates them, solves them in one call on a worker thread and hands each caller its
own rows of the result. One solver call runs at a time per key, so while it runs the next batch
fills up by itself under load. Rows just over a power of two are left to the next batch
(`batch_rows`): the solver pads to powers of two.

Guarantees:
- A request never fails because of another one: validate before `submit`; if a merged solve
  raises anyway, each of its requests is solved alone, so only the culprit gets the error.
- Overload is refused early: when the rows waiting or being solved for a key would exceed
  `max_queue_rows`, `submit` raises `Overloaded` (429 with Retry-After) at once, unless the
  client has nothing outstanding for the key (so every request within the row limit can run,
  and no client locks out the others).
- A request waits at most `timeout_s` for its answer (`Timeout`, 504), not counting the time
  spent compiling programs meanwhile (`programs.clock`: a request whose batch needs a new
  program waits for it to compile, `Programs.ensure`, then gets its full time to solve). A
  request that times out while still queued is dropped from the queue; a solve already
  running is cancelled once every request in it has stopped waiting (`solve`'s cancel event
  is set: `solvers.unfold` stops within a few iterations), so its thread is free again.
- Fair shares: one client (`client` of `submit`: its API key, else its address) cannot lock
  the others out. A full queue refuses only clients that already have rows in it: a client
  with none is admitted (its request may pass `max_queue_rows`), and a batch takes the
  waiting clients' requests in turns (each one's oldest, then each one's next), not first
  come first served. The solver threads are handed out fairly too (`_Slots`): a dictionary,
  or a client alone in its batches, holding `solver_share` of them already gets another only
  while nobody under their share waits for it; a freed thread goes first to those under
  their share. With running solves cancelled at their deadline, the others wait at most one
  solve for a thread, however much one dictionary or client sends.
- With `enabled=False` every request is solved on its own, still on a worker thread, with the
  same limits (the threads taken first come first served: no turns, no shares).

How requests use it (`unfolding.solve`: validate first, then submit; the closure solves any
rows)::

    settings = unfolding.solver_settings(entry, params)  # a bad parameter: 422, never batched
    result = await batcher.submit(
        (entry.record.id, settings),
        activations,
        lambda rows, cancel: batcher.programs.run(entry, settings, rows, cancel),
        label=entry.record.id,
        client=client,
    )  # an UnfoldResult for exactly this request's rows

`solve(rows, cancel)` must accept any number of rows of shape (n, d_model) and a
`threading.Event` that is set when nobody waits for the answer any more (stopping early is
then welcome: raise anything), and return a NamedTuple of arrays with a leading batch axis
(like `solvers.UnfoldResult`); requests merged together must give equivalent `solve` functions
(same key), and the first one's is used for the batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

import solvers

from .errors import Overloaded, Timeout
from .programs import USAGE_FILE, CompileClock, Programs, Usage

log = logging.getLogger(__name__)

R = TypeVar("R")

SETTLE_TURNS = 3
"""Turns of the event loop without a new request after which a batch is taken (`_fill`)."""
SETTLE_LIMIT_S = 0.05
"""... and the longest a batch waits for requests still arriving: enough for the event loop of
a 2-core machine to receive a burst of about a hundred single-vector requests."""
CALL_COST_ROWS = 8
"""A solver call's fixed cost in rows of work (`batch_rows`): on this 2-core CPU, OMP k=32
costs about 4 ms + 0.56 ms a row on the Gram path (8192 x 512), i.e. ~7 rows, and more on the
matrix-free path."""


def slice_result(result: R, rows: slice) -> R:
    """Rows `rows` of a NamedTuple whose array fields have a batch axis (`UnfoldResult`).

    Fields that are not arrays with at least one axis (such as `n_features`) are kept as is.
    """
    return result._replace(
        **{
            name: value[rows]
            for name, value in result._asdict().items()
            if isinstance(value, np.ndarray) and value.ndim >= 1
        }
    )


@dataclasses.dataclass(eq=False)
class _Request:
    rows: np.ndarray  # (n, d_model)
    solve: Callable[[np.ndarray], Any]
    split: Callable[[Any, slice], Any]
    future: asyncio.Future
    arrived: float
    state: str = "waiting"  # "waiting" -> "running" -> "done"; or "dropped" (left the queue)
    abandoned: bool = False  # the caller stopped waiting (timeout or cancellation)
    client: Hashable = None  # who sent it (fair shares)
    batch: list[_Request] = dataclasses.field(default_factory=list)  # solved with, once running
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)  # the batch's

    @property
    def n(self) -> int:
        return self.rows.shape[0]


@dataclasses.dataclass(eq=False)
class _Queue:
    label: str
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)
    waiting_rows: int = 0  # rows in `pending`
    outstanding_rows: int = 0  # rows admitted and not yet answered (waiting or being solved)
    client_rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    wakeup: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    worker: asyncio.Task | None = None


class Batcher:
    """Merges concurrent requests per key into batched solver calls. Use on one event loop.

    Args:
        enabled: merge requests; when False each request is solved alone (still in a thread).
        max_batch_size: most rows in one merged call (a larger request runs alone).
        max_wait_ms: longest the oldest queued request waits for others to join its batch.
        max_queue_rows: most rows outstanding per key before `submit` refuses with 429.
        timeout_s: longest a caller waits for its result before a 504.
        retry_after_s: the Retry-After of 429 answers.
        threads: worker threads for solver calls (shared by all keys).
        solver_share: most of them one dictionary (``key[0]``), or one client alone in its
            batches, holds at once (default: all but one, at least one).
        metrics: a `service.metrics.Metrics` to record batch sizes, solver time and queue depth.
        settle_limit_s: longest a batch waits, after `max_wait_ms`, for requests that keep
            arriving (see `_fill`).
        programs: the `Programs` solves compile through; its clock's time is left out of
            deadlines (default: a new one, with `metrics`).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        max_batch_size: int = 256,
        max_wait_ms: float = 0.0,
        max_queue_rows: int = 4096,
        timeout_s: float = 60.0,
        retry_after_s: int = 1,
        threads: int = 2,
        solver_share: int | None = None,
        metrics=None,
        settle_limit_s: float = SETTLE_LIMIT_S,
        programs: Programs | None = None,
    ):
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.settle_limit_s = settle_limit_s
        self.max_queue_rows = max_queue_rows
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.programs = programs if programs is not None else Programs(metrics)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="unfold-solver"
        )
        share = max(1, threads - 1) if solver_share is None else min(solver_share, threads)
        self._slots = _Slots(threads, share)
        self._queues: dict[Hashable, _Queue] = {}
        self._label_rows: dict[str, int] = {}  # outstanding rows per label (queue-depth metric)
        self._closed = False

    @classmethod
    def from_settings(cls, settings, metrics=None) -> Batcher:
        return cls(
            enabled=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_rows=settings.max_queue_rows,
            timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            threads=settings.solver_threads,
            solver_share=settings.solver_share,
            metrics=metrics,
            programs=Programs(
                metrics,
                Usage(settings.data_dir / USAGE_FILE),
                max_families=settings.max_program_families,
            ),
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def busy(self) -> bool:
        """Whether any request is waiting or being solved."""
        return any(self._label_rows.values())

    def queued_rows(self, key: Hashable) -> int:
        """Rows admitted for `key` and not yet answered."""
        queue = self._queues.get(key)
        return queue.outstanding_rows if queue else 0

    async def submit(
        self,
        key: Hashable,
        rows: np.ndarray,
        solve: Callable[[np.ndarray], R],
        *,
        split: Callable[[R, slice], R] = slice_result,
        label: str | None = None,
        client: Hashable = None,
    ) -> R:
        """The result of `solve` for `rows` (of shape (n, d_model)), possibly solved in a batch.

        Args:
            key: hashable; requests with equal keys may be merged (dictionary id, settings).
            rows: validated activations of shape (n, d_model), n >= 1.
            solve: solves any rows of shape (m, d_model); runs on a worker thread.
            split: `split(result, slice)` is the part of a batch result for those rows.
            label: the `dictionary` label of the queue-depth metric and of the solver share
                (default: ``key[0]``).
            client: who asks (fair shares); None: one anonymous client.

        Raises:
            Overloaded: too many rows are outstanding for `key`, or for this client and `key`
                (429, Retry-After).
            Timeout: no result within `timeout_s`, besides time spent compiling (504).
            Whatever `solve` raises for these rows alone.
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if label is None:
            label = str(key[0]) if isinstance(key, tuple) and key else str(key)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(label)
        n = rows.shape[0]
        mine = queue.client_rows[client]
        if mine and queue.outstanding_rows + n > self.max_queue_rows:
            raise Overloaded(
                f"{queue.outstanding_rows} rows are already queued for this dictionary and these "
                f"settings, {mine} of them yours (limit {self.max_queue_rows}); retry after "
                f"{self.retry_after_s} s",
                retry_after=self.retry_after_s,
            )
        self._admit(queue, n, client)
        loop = asyncio.get_running_loop()
        if not self.enabled:
            cancel = threading.Event()
            future = loop.run_in_executor(self._executor, self._call, solve, rows, cancel)
            future.add_done_callback(lambda _: self._release(key, queue, n, client))
            request = None
        else:
            future = loop.create_future()
            request = _Request(rows, solve, split, future, time.monotonic(), client=client)
            cancel = request.cancel
            queue.pending.append(request)
            queue.waiting_rows += n
            queue.wakeup.set()
            if queue.worker is None:
                queue.worker = asyncio.create_task(self._work(key, queue))
        try:
            async with asyncio.timeout(None) as scope:
                deadline = _Deadline(scope, self.timeout_s, self.programs.clock)
                try:
                    # Unbatched, the thread's future is shielded: it releases the rows when the
                    # thread is done, even if this caller stopped waiting. Batched, the future
                    # is this request's own: cancelling it is what `_abandon` expects.
                    return await (future if request is not None else asyncio.shield(future))
                finally:
                    deadline.cancel()
        except TimeoutError:
            if not scope.expired():  # the solve's own error
                raise
            self._abandon(key, queue, request, future, cancel)
            spent = deadline.compiling()
            raise Timeout(
                f"the solve did not finish within {self.timeout_s:g} s"
                + (f" (besides {spent:.1f} s spent compiling)" if spent >= 0.1 else "")
                + "; send fewer rows per request, or retry later"
            ) from None
        except asyncio.CancelledError:
            self._abandon(key, queue, request, future, cancel)
            raise

    async def close(self) -> None:
        """Stop the workers, fail what is still queued, and release the threads."""
        self._closed = True
        workers = [q.worker for q in self._queues.values() if q.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for queue in self._queues.values():
            for request in queue.pending:
                if not request.future.done():
                    request.future.set_exception(RuntimeError("the service is shutting down"))
                    request.future.exception()  # retrieved: no warning if nobody waits
        self._executor.shutdown(wait=False, cancel_futures=True)

    # Accounting.

    def _admit(self, queue: _Queue, n: int, client: Hashable) -> None:
        queue.outstanding_rows += n
        queue.client_rows[client] += n
        label = queue.label
        if label not in self._label_rows:
            self._label_rows[label] = 0
            if self.metrics is not None:  # read when scraped: nothing to update per request
                gauge = self.metrics.queue_depth.labels(dictionary=label)
                gauge.set_function(lambda: self._label_rows[label])
        self._label_rows[label] += n

    def _release(self, key: Hashable, queue: _Queue, n: int, client: Hashable) -> None:
        queue.outstanding_rows -= n
        queue.client_rows[client] -= n
        if not queue.client_rows[client]:
            del queue.client_rows[client]
        self._label_rows[queue.label] -= n
        if queue.outstanding_rows == 0 and queue.worker is None and self._queues.get(key) is queue:
            del self._queues[key]

    def _abandon(
        self, key, queue: _Queue, request: _Request | None, future, cancel: threading.Event
    ) -> None:
        if request is None:  # unbatched: the thread stops soon; rows released then
            cancel.set()
            future.add_done_callback(_retrieve)
            return
        request.abandoned = True
        if request.state == "waiting":  # never started: leave the queue, free the rows now
            queue.pending.remove(request)
            queue.waiting_rows -= request.n
            request.state = "dropped"
            self._release(key, queue, request.n, request.client)
        elif request.state == "running" and all(other.abandoned for other in request.batch):
            request.cancel.set()  # nobody waits for this solve any more

    # The worker of one key.

    async def _work(self, key: Hashable, queue: _Queue) -> None:
        try:
            while queue.pending:
                await self._fill(queue)
                batch = self._take(queue)
                if batch:
                    await self._solve_batch(key, queue, batch)
        finally:
            queue.worker = None
            if queue.outstanding_rows == 0 and self._queues.get(key) is queue:
                del self._queues[key]

    async def _fill(self, queue: _Queue) -> None:
        """Let the next batch fill up before it is taken: until `max_batch_size` rows wait, for
        at most `max_wait_s` after the oldest request arrived, then for as long as requests
        keep arriving from one turn of the event loop to the next, at most `settle_limit_s`
        (requests already received join at the cost of a few turns, instead of waiting a whole
        solve for the next batch: after a batch ends, its callers' next requests arrive in a
        burst)."""
        deadline = queue.pending[0].arrived + self.max_wait_s
        settle_until = None
        quiet_turns = 0
        while queue.pending and queue.waiting_rows < self.max_batch_size:
            now = time.monotonic()
            if now < deadline:
                queue.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.wakeup.wait(), deadline - now)
                continue
            settle_until = settle_until or now + self.settle_limit_s
            if quiet_turns >= SETTLE_TURNS or now >= settle_until:
                return
            before = queue.waiting_rows
            await asyncio.sleep(0)
            quiet_turns = 0 if queue.waiting_rows > before else quiet_turns + 1

    def _take(self, queue: _Queue) -> list[_Request]:
        """The first requests, clients taking turns (`_in_turns`), totalling at most
        `batch_rows` rows; but if whole requests fill no more than half of that (a large
        request next in line), that call would be mostly padding and fixed cost: then at most
        `max_batch_size` rows. Always at least one request."""
        limit = batch_rows(queue.waiting_rows, self.max_batch_size)
        order = _in_turns(queue.pending)
        count, rows = _leading(order, limit)
        if limit < self.max_batch_size and 2 * rows <= limit:
            count, _ = _leading(order, self.max_batch_size)
        if order is queue.pending:
            batch = [queue.pending.popleft() for _ in range(count)]
        else:
            batch = order[:count]
            queue.pending = collections.deque(order[count:])
        cancel = threading.Event()
        for request in batch:
            queue.waiting_rows -= request.n
            request.state = "running"
            request.batch, request.cancel = batch, cancel
        return batch

    async def _solve_batch(self, key: Hashable, queue: _Queue, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        owners = _owners(queue.label, {request.client for request in batch})
        try:
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([r.rows for r in batch])
            try:
                async with self._slots.held(owners):
                    result = await loop.run_in_executor(
                        self._executor, self._call, batch[0].solve, rows, batch[0].cancel
                    )
            except Exception as error:
                if batch[0].cancel.is_set():  # cancelled: nobody waits (`finally` ends them)
                    return
                if len(batch) == 1:
                    self._finish(batch[0], error=error)
                    return
                log.warning(
                    "a merged solve of %d requests failed (%s); solving each alone",
                    len(batch),
                    error,
                )
                for request in batch:  # only the request that caused the failure fails
                    if request.abandoned:
                        self._finish(request)
                        continue
                    try:
                        async with self._slots.held(owners):
                            alone = await loop.run_in_executor(
                                self._executor,
                                self._call,
                                request.solve,
                                request.rows,
                                request.cancel,
                            )
                    except Exception as single_error:
                        self._finish(request, error=single_error)
                    else:
                        self._finish(request, result=alone)
                return
            start = 0
            for request in batch:
                try:
                    part = request.split(result, slice(start, start + request.n))
                except Exception as error:
                    self._finish(request, error=error)
                else:
                    self._finish(request, result=part)
                start += request.n
        finally:
            for request in batch:
                if request.state != "done":
                    self._finish(request, error=RuntimeError("the batch was interrupted"))
            for request in batch:
                self._release(key, queue, request.n, request.client)

    def _finish(self, request: _Request, *, result=None, error: BaseException | None = None):
        request.state = "done"
        if request.abandoned or request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    def _call(self, solve: Callable, rows: np.ndarray, cancel: threading.Event) -> R:
        """One solver call, on a worker thread, recorded in the metrics."""
        started = time.perf_counter()
        try:
            return solve(rows, cancel)
        except Exception:
            if cancel.is_set() and self.metrics is not None:
                self.metrics.cancelled_solves.inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.batch_size.observe(rows.shape[0])
                self.metrics.rows.inc(rows.shape[0])
                self.metrics.solver_seconds.observe(time.perf_counter() - started)


class _Deadline:
    """Expires an `asyncio.timeout` `scope` `timeout_s` seconds from now, not counting the
    time `clock` (a `CompileClock`) advances meanwhile: when due it looks at the clock, and
    while compiling has pushed the deadline back, waits again."""

    __slots__ = ("_clock", "_due", "_handle", "_loop", "_scope", "_start")

    def __init__(self, scope: asyncio.Timeout, timeout_s: float, clock: CompileClock):
        self._scope, self._clock = scope, clock
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + timeout_s
        self._start = clock.now()
        self._handle = self._loop.call_at(self._due, self._check)

    def compiling(self) -> float:
        """Seconds spent compiling since the deadline was set."""
        return self._clock.now() - self._start

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        due = self._due + self.compiling()
        if due <= self._loop.time():
            self._scope.reschedule(self._loop.time())  # expires on the next turn
        else:
            self._handle = self._loop.call_at(due, self._check)


def _in_turns(pending: collections.deque) -> collections.deque | list:
    """`pending` in the order clients take turns: each client's oldest request (clients in the
    order of their oldest), then each one's next, and so on. `pending` itself when it holds a
    single client's requests."""
    first = pending[0].client
    if all(request.client == first for request in pending):
        return pending
    by_client: dict[Hashable, list[_Request]] = {}
    for request in pending:
        by_client.setdefault(request.client, []).append(request)
    turns = itertools.zip_longest(*by_client.values())
    return [request for turn in turns for request in turn if request is not None]


def _owners(label: str, clients: set) -> tuple:
    """What a solve counts against in the solver share: its dictionary, and its client when
    it serves only one (and that one is known)."""
    if len(clients) == 1 and None not in clients:
        return (("dictionary", label), ("client", next(iter(clients))))
    return (("dictionary", label),)


class _Slots:
    """The solver threads, handed out fairly. A solve takes a free thread at once (no one
    waits while a thread is free). A freed thread goes to the longest-waiting solve whose
    owners (`_owners`) each hold fewer than `share` threads, else to the longest-waiting."""

    def __init__(self, threads: int, share: int):
        self.free = threads
        self.share = share
        self.held_by: collections.Counter = collections.Counter()
        self.waiting: list[tuple[tuple, asyncio.Future]] = []

    def _under_share(self, owners: tuple) -> bool:
        return all(self.held_by[owner] < self.share for owner in owners)

    def _take(self, owners: tuple) -> None:
        self.free -= 1
        self.held_by.update(owners)

    @contextlib.asynccontextmanager
    async def held(self, owners: tuple):
        if self.free:
            self._take(owners)
        else:
            granted = asyncio.get_running_loop().create_future()
            self.waiting.append((owners, granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._give_back(owners)  # granted as this waiter was cancelled
                elif (owners, granted) in self.waiting:
                    self.waiting.remove((owners, granted))
                raise
        try:
            yield
        finally:
            self._give_back(owners)

    def _give_back(self, owners: tuple) -> None:
        self.free += 1
        self.held_by.subtract(owners)
        for owner in owners:
            if not self.held_by[owner]:
                del self.held_by[owner]
        self.waiting = [(o, granted) for o, granted in self.waiting if not granted.done()]
        while self.free and self.waiting:
            index = next((i for i, (o, _) in enumerate(self.waiting) if self._under_share(o)), 0)
            waiter, granted = self.waiting.pop(index)
            self._take(waiter)
            granted.set_result(None)


def _leading(pending, limit: int) -> tuple[int, int]:
    """(count, rows) of the first requests of `pending` totalling at most `limit` rows (at
    least one request)."""
    count = rows = 0
    for request in pending:
        if count and rows + request.n > limit:
            break
        count += 1
        rows += request.n
    return count, rows


def batch_rows(
    waiting: int, max_batch_size: int, block_rows: int = solvers.DEFAULT_BLOCK_ROWS
) -> int:
    """How many of `waiting` rows to solve in the next batch: all of them (at most
    `max_batch_size`), unless they just overflow a power of two.

    The solver pads a batch to a power of two of rows (`bucket_sizes`), so 33 rows cost as much
    as 64. With a call costing about `CALL_COST_ROWS` rows of work besides its rows, solving
    the 32 now and the rest with the next batch is cheaper, even if nothing else arrives, when
    ``32 - padded(rest) > CALL_COST_ROWS``; under load the rest joins rows that arrive
    meanwhile and nothing is wasted. Batches of `block_rows` or more are not trimmed: the
    solver runs them as full calls and pads only the rest.
    """
    rows = min(waiting, max_batch_size)
    if rows >= block_rows:
        return rows
    bucket = 1 << (rows.bit_length() - 1) if rows > 0 else 0
    rest = rows - bucket
    if rest and bucket - (1 << (rest - 1).bit_length()) > CALL_COST_ROWS:
        return bucket
    return rows


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


def bucket_sizes(max_batch_size: int, block_rows: int = solvers.DEFAULT_BLOCK_ROWS) -> list[int]:
    """Batch sizes to compile ahead for batches of up to `max_batch_size` rows: the powers of
    two up to the first one >= min(max_batch_size, block_rows).

    `solvers.unfold` cuts a batch into calls of at most `block_rows` rows (`Plan.calls`: a few
    of about equal size for a small batch) and pads each to a power of two (see `padded_rows`
    in `solvers._plan`), so every program a batch of at most `max_batch_size` rows runs is one
    that the next power of two of rows runs too: these sizes reach them all.
    """
    top = min(max_batch_size, block_rows)
    return [1 << i for i in range((top - 1).bit_length() + 1)]


def warmup(
    entry,
    max_batch_size: int,
    *,
    k: int = 8,
    stop: threading.Event | None = None,
    programs: Programs | None = None,
) -> int:
    """Compile the default method's programs (OMP, `k` atoms) for every batch bucket up to
    `max_batch_size`, for one registry `Entry`, through `programs` (the app's, which requests
    share; default: a record of its own), unless `stop` is set first (then the entry is not
    marked warm). Returns the number of sizes warmed."""
    programs = programs if programs is not None else Programs()
    record = entry.record
    settings = solvers.make_settings("omp", entry.prepared, k=min(k, record.n_features))
    sizes = bucket_sizes(max_batch_size)
    started = time.perf_counter()
    done = programs.warm(entry, settings, sizes, stop=stop)
    if done < len(sizes):
        log.info("warm-up of %s stopped after %d of %d sizes", record.name, done, len(sizes))
        return done
    log.info("warmed %s for %s rows in %.1f s", record.name, sizes, time.perf_counter() - started)
    settle_heap()
    entry.warm.set()
    return done


def warmup_used(
    entry,
    programs: Programs,
    max_batch_size: int,
    *,
    limit: int,
    max_age_s: float,
    stop: threading.Event | None = None,
) -> int:
    """Compile the programs of the settings used most with one registry `Entry` within the
    last `max_age_s` seconds, at most `limit` of them (`Usage.top`; the defaults may be among
    them), for every batch bucket up to `max_batch_size`, or up to the most rows one request
    sent (such a request runs alone), unless `stop` is set. Returns the settings warmed."""
    used = programs.usage.top(entry.record.id, limit, max_age_s)
    started = time.perf_counter()
    for done, (settings, rows) in enumerate(used):
        sizes = bucket_sizes(max(max_batch_size, rows))
        if programs.warm(entry, settings, sizes, stop=stop) < len(sizes):
            log.info("warm-up of %s's used settings stopped after %d", entry.record.name, done)
            return done
    if used:
        log.info(
            "warmed %s for its %d most used settings (%s) in %.1f s",
            entry.record.name,
            len(used),
            ", ".join(repr(settings) for settings, _ in used),
            time.perf_counter() - started,
        )
    return len(used)


def settle_heap() -> None:
    """Collect garbage, then exempt every object alive now from the cyclic garbage collector
    (`gc.freeze`): what start-up, registration and compilation leave behind (JAX's programs and
    tracing caches, the dictionaries) lives as long as the process, and left in the collector's
    care it makes each full collection scan ~150k objects, a ~100 ms pause of the event loop
    on this 2-core machine, every few thousand requests. Frozen objects are still freed when no
    longer referenced; only garbage cycles among them would stay."""
    gc.collect()
    gc.freeze()


def enable_compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache under `path`, for every program however small."""
    import jax

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
