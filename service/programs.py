"""Compiled solver programs: which exist, compiling the missing ones once, and what to warm.

`solvers.unfold` runs a batch as compiled calls of a few padded row counts: a program per
(dictionary shape, settings' static fields, `Plan`, rows of the call). `Programs` holds the
service's programs (compiled ahead of time into its families' `executables`, not jit's cache,
so that they can be freed) and its record of them:

- A *family* is the programs of one dictionary shape and one settings structure (the static
  fields: OMP's `k` and `positive`, the LASSO methods' `positive` and `max_nonzero`; numbers
  such as `tol`, `alpha` and `max_iter` are traced). At most `max_families` are kept: the least
  recently used is freed first (``unfold_program_families_evicted``), so callers cycling
  through static values cost compile time, never unbounded memory.

- `ensure` is called before a batch is solved: it compiles the programs that batch will run and
  that do not exist yet, by running the solver on zero rows (which fills jit's cache), one at a
  time per dictionary shape and settings, so concurrent callers that need the same program wait
  for one compilation instead of compiling it again. Requests and warm-up share it.
- `clock` (`CompileClock`) counts the wall time spent compiling: the batcher leaves it out of
  requests' deadlines. Each compilation is timed in ``unfold_compile_seconds{method,cause}``
  and logged (INFO when a request waited for it, DEBUG during warm-up).
- `usage` (`Usage`) records which settings requests use per dictionary, saved to
  ``<data_dir>/warmup.json``, so that start-up warms them (`batching.warmup_used`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orjson

import solvers

log = logging.getLogger(__name__)

METHOD_NAMES = {cls: name for name, cls in solvers.METHODS.items()}
"""The method name of each settings class."""
USAGE_FILE = "warmup.json"
"""The usage record's file under the data directory."""
SAVE_INTERVAL_S = 60.0
"""How often the usage record is saved while it changes (and once at shutdown)."""
MAX_FAMILIES = 64
"""Program families kept by default (`Programs`)."""
MAX_USES_PER_DICTIONARY = 32
"""Most settings recorded per dictionary; a new one replaces the least recently used."""


def calls(plan: solvers.Plan, n_rows: int) -> list[tuple[int, int]]:
    """(rows, padded rows) of each compiled call `solvers.unfold` makes for a batch of
    `n_rows` under `plan`, as its `run` cuts and pads them."""
    return [(len(rows), padded) for rows, padded in plan.calls(n_rows)]


def call_rows(plan: solvers.Plan, n_rows: int) -> frozenset[int]:
    """Rows of the compiled calls of a batch of `n_rows` under `plan`: with given settings and
    dictionary, one program per value."""
    return frozenset(padded for _, padded in calls(plan, n_rows))


def fewest_rows(plan: solvers.Plan, padded: int, n_rows: int) -> int:
    """The fewest rows of a batch that runs a call of `padded` rows, among the batches of one
    to `plan.streams` calls like those of `n_rows` that run it (else `n_rows`)."""
    lengths = {rows for rows, call in calls(plan, n_rows) if call == padded}
    candidates = sorted({rows * m for rows in lengths for m in range(1, plan.streams + 1)})
    return next((n for n in candidates if padded in call_rows(plan, n)), n_rows)


class CompileClock:
    """Seconds of wall time during which at least one compilation ran. A request's deadline
    moves by as much as this clock advanced while it waited; being wall time, it never
    advances faster than time itself, however many compilations run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0  # when `_running` last went from 0 to 1 (time.monotonic)
        self._total = 0.0  # of intervals that ended

    def now(self) -> float:
        with self._lock:
            if self._running:
                return self._total + time.monotonic() - self._since
            return self._total

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """A scope that compiles: the clock runs while any such scope is open."""
        with self._lock:
            if not self._running:
                self._since = time.monotonic()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._total += time.monotonic() - self._since


@dataclasses.dataclass(eq=False)
class _Family:
    """The programs of one dictionary shape and one settings structure."""

    plan: solvers.Plan  # chosen once: every call of the family runs with it
    executables: dict[int, Any] = dataclasses.field(default_factory=dict)  # by rows of a call
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    compiled: set[int] = dataclasses.field(default_factory=set)  # rows of the calls compiled
    ready: set[int] = dataclasses.field(default_factory=set)  # batch sizes with every call compiled


class Programs:
    """The solver programs compiled in this process for one app (see the module docstring).

    Args:
        metrics: a `service.metrics.Metrics` to time compilations in.
        usage: the record of settings used (default: one kept in memory only).
        max_families: most families kept (least recently used freed first).
    """

    def __init__(self, metrics=None, usage: Usage | None = None, max_families: int = MAX_FAMILIES):
        self.metrics = metrics
        self.usage = usage if usage is not None else Usage()
        self.max_families = max_families
        self.clock = CompileClock()
        self._families: collections.OrderedDict[tuple, _Family] = collections.OrderedDict()
        self._lock = threading.Lock()
        if metrics is not None:
            metrics.programs.set_function(self.count)

    def count(self) -> int:
        """Compiled programs held."""
        with self._lock:
            return sum(len(family.executables) for family in self._families.values())

    def run(
        self, entry, settings, rows: np.ndarray, cancel: threading.Event | None = None
    ) -> solvers.UnfoldResult:
        """`solvers.unfold` of `rows` with `settings` over `entry`, once `ensure` compiled
        what they need, with the family's programs."""
        family = self._ensure(entry, settings, rows.shape[0], "request")
        return solvers.unfold(
            rows,
            entry.prepared,
            method=settings,
            plan=family.plan,
            cancel=cancel,
            executables=family.executables,
        )

    def ensure(self, entry, settings, n_rows: int, *, cause: str = "request") -> solvers.Plan:
        """Compile the programs a batch of `n_rows` rows with `settings` (from
        `solvers.make_settings`) over registry `Entry` `entry` needs and that do not exist yet;
        a caller that finds one being compiled waits for it. Returns the plan to solve with
        (``solvers.unfold(..., plan=plan)``), which the programs were compiled for.

        `cause` ("request" or "warm-up") labels the compile metric and sets the log level."""
        return self._ensure(entry, settings, n_rows, cause).plan

    def _ensure(self, entry, settings, n_rows: int, cause: str) -> _Family:
        family = self._family(entry.prepared, settings)
        if n_rows in family.ready:
            return family
        needed = call_rows(family.plan, n_rows)
        if not needed <= family.compiled:
            with family.lock:  # one compilation at a time per family; waiters then find it done
                for rows in sorted(needed):
                    if rows not in family.compiled:  # an earlier run may have compiled it
                        self._compile(entry, settings, family, rows, n_rows, cause)
        family.ready.add(n_rows)
        return family

    def warm(
        self, entry, settings, sizes: Iterable[int], *, stop: threading.Event | None = None
    ) -> int:
        """`ensure` batches of each of `sizes` rows (a warm-up), until `stop` is set. Returns
        how many sizes were done."""
        done = 0
        for size in sizes:
            if stop is not None and stop.is_set():
                break
            self.ensure(entry, settings, size, cause="warm-up")
            done += 1
        return done

    def compiled(self, entry, settings) -> frozenset[int]:
        """Rows of the calls compiled for `settings` over `entry` (what `ensure` compiled)."""
        family = self._families.get(self._key(entry.prepared, settings))
        return frozenset(family.compiled) if family is not None else frozenset()

    def _family(self, prepared: solvers.Dictionary, settings) -> _Family:
        key = self._key(prepared, settings)
        with self._lock:
            family = self._families.get(key)
            if family is not None:
                self._families.move_to_end(key)
                return family
            family = self._families[key] = _Family(solvers.plan_for(settings, prepared))
            while len(self._families) > self.max_families:
                self._families.popitem(last=False)  # its programs go with the last reference
                if self.metrics is not None:
                    self.metrics.program_families_evicted.inc()
        return family

    @staticmethod
    def _key(prepared: solvers.Dictionary, settings) -> tuple:
        """What jit's programs depend on besides the rows: the dictionary's structure, shapes
        and dtypes (dictionaries of one shape share programs) and the settings' class and
        static fields (not `tol`, `alpha` or `max_iter`, which are traced)."""
        leaves, structure = jax.tree_util.tree_flatten(prepared)
        shapes = tuple((leaf.shape, leaf.dtype) for leaf in leaves)
        return structure, shapes, jax.tree_util.tree_structure(settings)

    def _compile(self, entry, settings, family: _Family, rows: int, n_rows: int, cause: str):
        """Compile the program of calls of `rows` rows (needed by a batch of `n_rows`): run the
        solver on zeros of a batch that runs such a call (`fewest_rows`)."""
        batch = fewest_rows(family.plan, rows, n_rows)
        zeros = np.zeros((batch, entry.prepared.d_model), entry.prepared.dtype)
        started = time.perf_counter()
        with self.clock.running():
            self._run(zeros, entry.prepared, settings, family)
        seconds = time.perf_counter() - started
        family.compiled.update(call_rows(family.plan, batch))
        method = METHOD_NAMES.get(type(settings), type(settings).__name__)
        if self.metrics is not None:
            self.metrics.compile_seconds.labels(method=method, cause=cause).observe(seconds)
        log.log(
            logging.INFO if cause == "request" else logging.DEBUG,
            "compiled %r for dictionary %s (calls of %d rows) in %.2f s, for a %s",
            settings,
            entry.record.name,
            rows,
            seconds,
            cause,
        )

    @staticmethod
    def _run(zeros: np.ndarray, prepared: solvers.Dictionary, settings, family: _Family):
        """The compiling run (tests slow it down to stand for a long compilation)."""
        solvers.unfold(
            zeros, prepared, method=settings, plan=family.plan, executables=family.executables
        )


@dataclasses.dataclass(eq=False)
class _Use:
    settings: Any  # the latest settings of this structure (from `solvers.make_settings`)
    count: int = 0  # requests
    last_used: float = 0.0  # time.time() of the latest request
    rows: int = 0  # most rows in one request

    def to_json(self) -> dict:
        return {
            "method": METHOD_NAMES[type(self.settings)],
            "settings": dataclasses.asdict(self.settings),
            "count": self.count,
            "last_used": self.last_used,
            "rows": self.rows,
        }


class Usage:
    """The solver settings requests used, per dictionary id and settings structure (settings
    differing only in `tol`, `alpha` or `max_iter` count as one): how often, when last, and the
    most rows one request sent. Kept in memory (bounded: `MAX_USES_PER_DICTIONARY`), and with a
    `path`, merged with the saved record by `load` and written back by `save` (atomically)."""

    def __init__(self, path: Path | None = None):
        self.path = None if path is None else Path(path)
        self._uses: dict[str, dict[Any, _Use]] = {}
        self._lock = threading.Lock()
        self._dirty = False
        self._loaded = path is None  # no save before the saved record is merged

    def record(self, dictionary_id: str, settings, rows: int) -> None:
        """One request with `settings` for `rows` rows (on the hot path: a few dict updates)."""
        key = jax.tree_util.tree_structure(settings)
        with self._lock:
            use = self._use(dictionary_id, key, settings)
            use.settings = settings
            use.count += 1
            use.last_used = time.time()
            use.rows = max(use.rows, rows)
            self._dirty = True

    def top(
        self, dictionary_id: str, limit: int, max_age_s: float, now: float | None = None
    ) -> list[tuple[Any, int]]:
        """(settings, most rows in one request) of the settings used with a dictionary within
        the last `max_age_s` seconds, most used first, then most recent; at most `limit`."""
        now = time.time() if now is None else now
        with self._lock:
            uses = [
                use
                for use in self._uses.get(dictionary_id, {}).values()
                if now - use.last_used <= max_age_s
            ]
        uses.sort(key=lambda use: (-use.count, -use.last_used))
        return [(use.settings, use.rows) for use in uses[:limit]]

    def load(self, entries: Iterable) -> int:
        """Merge the saved record of the dictionaries among registry `entries` (those of
        others are dropped). A file that cannot be read is logged and ignored, a bad item
        skipped; either is rewritten by the next `save`. Returns the settings loaded."""
        saved = self._read()
        by_id = {entry.record.id: entry for entry in entries}
        count = 0
        for dictionary_id, items in saved.items():
            entry = by_id.get(dictionary_id)
            if entry is None or not isinstance(items, list):
                continue
            for item in items:
                try:
                    settings = solvers.make_settings(
                        item["method"], entry.prepared, **item["settings"]
                    )
                    saved_use = _Use(
                        settings, int(item["count"]), float(item["last_used"]), int(item["rows"])
                    )
                except (KeyError, TypeError, ValueError) as error:
                    log.warning("skipping a bad item of %s: %r (%s)", self.path, item, error)
                    continue
                with self._lock:
                    use = self._use(dictionary_id, jax.tree_util.tree_structure(settings), settings)
                    use.count += saved_use.count
                    use.rows = max(use.rows, saved_use.rows)
                    if saved_use.last_used > use.last_used:  # the newer settings stay
                        use.settings, use.last_used = settings, saved_use.last_used
                count += 1
        with self._lock:
            self._loaded = True
        return count

    def save(self) -> bool:
        """Write the record to `path` if it changed since the last save (and `load` ran, so
        nothing saved before is lost). Returns whether it wrote."""
        if self.path is None:
            return False
        with self._lock:
            if not (self._dirty and self._loaded):
                return False
            data = {
                "version": 1,
                "dictionaries": {
                    dictionary_id: [use.to_json() for use in uses.values()]
                    for dictionary_id, uses in self._uses.items()
                },
            }
            self._dirty = False
        try:
            _write_atomically(self.path, orjson.dumps(data, option=orjson.OPT_INDENT_2))
        except OSError as error:
            log.warning("could not save the warm-up record %s: %s", self.path, error)
            with self._lock:
                self._dirty = True
            return False
        return True

    def keep_saved(self, stop: threading.Event, interval_s: float = SAVE_INTERVAL_S) -> None:
        """Save every `interval_s` seconds until `stop` is set, then once more (shutdown)."""
        while not stop.wait(interval_s):
            self.save()
        self.save()

    def _use(self, dictionary_id: str, key, settings) -> _Use:
        """The record of `key` (a settings structure) for a dictionary, new if need be (which
        may replace the least recently used). Holding `_lock`."""
        uses = self._uses.setdefault(dictionary_id, {})
        use = uses.get(key)
        if use is None:
            if len(uses) >= MAX_USES_PER_DICTIONARY:
                del uses[min(uses, key=lambda k: uses[k].last_used)]
            use = uses[key] = _Use(settings)
        return use

    def _read(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_bytes())["dictionaries"]
            if not isinstance(saved, dict):
                raise TypeError(f"dictionaries is a {type(saved).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring the warm-up record %s (cannot be read: %s)", self.path, error)
            return {}
        return saved


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` into `path` by a fsynced temporary file renamed over it."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
