"""The dictionaries the service knows: stored records plus their solver precomputation."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import threading

import numpy as np

import solvers

from .errors import Conflict, InvalidInput, NotFound, NotReady
from .store import STORE_DTYPE, DictionaryRecord, DictionaryStore, content_id

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered dictionary, ready to solve with."""

    record: DictionaryRecord
    prepared: solvers.Dictionary
    path_choice: solvers.PathChoice
    warm: threading.Event = dataclasses.field(default_factory=threading.Event, compare=False)
    """Set once the default programs are compiled (`batching.warmup`)."""
    settings_cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """Solver settings by request parameters (`unfolding.solver_settings`; event loop only)."""

    @property
    def norms(self) -> np.ndarray:
        return np.asarray(self.prepared.norms)


class Registry:
    """Thread-safe map of id and name to `Entry`, backed by a `DictionaryStore`."""

    def __init__(self, store: DictionaryStore, *, gram_budget_bytes: int | None):
        self.store = store
        self.gram_budget_bytes = gram_budget_bytes
        self._entries: dict[str, Entry] = {}
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self.loaded = threading.Event()  # set once the stored dictionaries are loaded
        self.ready = threading.Event()  # set when start-up loading (and warm-up) is done

    def load_stored(self) -> int:
        """Load (verify and precompute) every stored dictionary. The caller sets `ready` once
        everything start-up does is done."""
        count = 0
        for record in self.store.load_all():
            self._add(record)
            count += 1
        log.info("loaded %d dictionaries", count)
        return count

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.record.name)

    def get(self, ref: str) -> Entry:
        """The dictionary with id or name `ref`."""
        with self._lock:
            entry = self._entries.get(self._names.get(ref, ref))
        if entry is not None:
            return entry
        if not self.loaded.is_set():  # it may be among those not loaded yet
            raise NotReady("dictionaries are still loading; retry shortly")
        raise NotFound(
            f"no dictionary with id or name {ref!r}; list them with GET /v1/dictionaries"
        )

    def register(
        self,
        name: str,
        directions,
        bias=None,
        *,
        labels: list[str] | None = None,
        metadata: dict | None = None,
    ) -> tuple[Entry, bool]:
        """Validate, store and load a dictionary. Returns (entry, created): registering the
        same content under the same name again returns the existing entry, not an error."""
        if not NAME_PATTERN.match(name):
            raise InvalidInput(
                f"name {name!r} must start with a letter and hold at most 128 letters, digits, "
                "'.', '_' or '-'",
                code="invalid_name",
            )
        try:
            directions, bias = solvers.check_dictionary(directions, bias, STORE_DTYPE)
            has_bias = bias is not None and np.any(bias != 0)
        except ValueError as error:
            raise InvalidInput(str(error), code="invalid_dictionary") from None
        bias = bias if has_bias else None
        if labels is not None and len(labels) != directions.shape[0]:
            raise InvalidInput(
                f"labels has {len(labels)} entries; it needs one per feature "
                f"(n_features={directions.shape[0]})",
                code="invalid_labels",
            )
        dictionary_id = content_id(directions, bias)
        with self._lock:
            existing = self._entries.get(dictionary_id)
            named = self._names.get(name)
            if existing is not None:
                if existing.record.name == name and existing.record.labels == labels:
                    return existing, False
                raise Conflict(
                    f"this content is already registered as {existing.record.name!r} "
                    f"(id {dictionary_id}); use that, or delete it first",
                    code="duplicate_content",
                )
            if named is not None:
                raise Conflict(
                    f"name {name!r} is taken by dictionary {named}; choose another name or "
                    "delete that dictionary first",
                    code="name_taken",
                )
            record = DictionaryRecord(
                id=dictionary_id,
                name=name,
                directions=directions,
                bias=bias,
                labels=labels,
                metadata=metadata or {},
                created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            self.store.save(record)
            return self._add_locked(record), True

    def delete(self, ref: str) -> Entry:
        entry = self.get(ref)
        with self._lock:
            self.store.delete(entry.record.id)
            self._entries.pop(entry.record.id, None)
            self._names.pop(entry.record.name, None)
        return entry

    def _add(self, record: DictionaryRecord) -> Entry:
        with self._lock:
            return self._add_locked(record)

    def _add_locked(self, record: DictionaryRecord) -> Entry:
        choice = solvers.choose_path(
            record.directions.shape[0], STORE_DTYPE, gram_budget_bytes=self.gram_budget_bytes
        )
        prepared = solvers.prepare(record.directions, record.bias, gram=choice.gram)
        entry = Entry(record, prepared, choice)
        self._entries[record.id] = entry
        self._names[record.name] = record.id
        return entry
