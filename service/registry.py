"""The dictionaries the service knows: stored records plus their solver precomputation."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import threading

import jax
import numpy as np
import orjson

import solvers

from .encoder import Encoder
from .errors import Conflict, InvalidInput, NotFound, NotReady, TooLarge
from .memory import MemoryBudget
from .store import STORE_DTYPE, DictionaryRecord, DictionaryStore

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
"""What a whole name must match (`fullmatch`: no trailing newline slips through)."""
MAX_METADATA_DEPTH = 8
MAX_METADATA_BYTES = 64 * 1024
MAX_LABEL_CHARS = 256
GRAM_SHARE_OF_BUDGET = 0.5
"""A Gram matrix is built when it takes at most this share of the memory budget left besides its
dictionary (and UNFOLD_GRAM_BUDGET_BYTES, if set)."""


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
    """Thread-safe map of id and name to `Entry`, backed by a `DictionaryStore`, within a
    `MemoryBudget` (each entry reserves its prepared arrays' bytes)."""

    def __init__(
        self,
        store: DictionaryStore,
        *,
        gram_budget_bytes: int | None,
        budget: MemoryBudget | None = None,
        devices: int | str = 1,
        shard: str = "auto",
    ):
        self.store = store
        self.gram_budget_bytes = gram_budget_bytes
        self.devices = local_devices(devices)
        self.shard = shard
        self.budget = budget if budget is not None else MemoryBudget.from_settings(None)
        self._entries: dict[str, Entry] = {}
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()  # the maps; held briefly, so reads never wait long
        self._changes = threading.Lock()  # registrations and deletions, one at a time
        self.loaded = threading.Event()  # set once the stored dictionaries are loaded
        self.ready = threading.Event()  # set when start-up loading (and warm-up) is done

    def load_stored(self) -> int:
        """Load (verify and precompute) every stored dictionary that fits the memory budget;
        one that does not stays on disk, logged. The caller sets `ready` once everything
        start-up does is done."""
        count = 0
        for record in self.store.load_all():
            try:
                with self._changes:
                    self._insert(self._admit(record))
            except TooLarge as error:
                log.error("not loading dictionary %s (%s): %s", record.name, record.id, error)
                continue
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
        encoder: Encoder | None = None,
    ) -> tuple[Entry, bool]:
        """Validate, store and load a dictionary. Returns (entry, created): registering the
        same content under the same name again returns the existing entry, not an error.

        `directions` may be any float array, memory-mapped ones included: it is checked,
        converted to float32 and written a block of rows at a time (`DictionaryStore.stage`),
        and the entry's arrays are views of the stored file. A SAE's `encoder` is stored beside
        it (`DictionaryStore.stage_encoder`).
        """
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidInput(
                f"name {name!r} must start with a letter and hold at most 128 letters, digits, "
                "'.', '_' or '-'",
                code="invalid_name",
            )
        try:
            solvers.validate_dictionary(directions, bias, STORE_DTYPE)
        except ValueError as error:
            raise InvalidInput(str(error), code="invalid_dictionary") from None
        directions = np.asarray(directions)  # a memory map stays one
        if bias is not None:
            bias = np.asarray(bias)
            bias = bias if np.any(bias != 0) else None
        check_labels(labels, directions.shape[0])
        metadata = metadata or {}
        check_metadata(metadata)
        with self._changes:
            staged = self.store.stage(directions, bias)
            try:
                encoder_sha256 = None
                if encoder is not None:
                    encoder, encoder_sha256 = self.store.stage_encoder(staged, encoder)
                existing = self._check_new(staged.id, name, labels, encoder_sha256)
                if existing is not None:
                    return existing, False
                record = DictionaryRecord(
                    id=staged.id,
                    name=name,
                    directions=staged.directions,
                    bias=staged.bias,
                    labels=labels,
                    metadata=metadata,
                    created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    encoder=encoder,
                    encoder_sha256=encoder_sha256,
                )
                entry = self._admit(record)
                try:
                    self.store.commit(staged, record)
                except BaseException:
                    self.budget.release("dictionaries", entry.prepared.device_bytes)
                    raise
                self._insert(entry)
                return entry, True
            finally:
                self.store.discard(staged)

    def delete(self, ref: str) -> Entry:
        with self._changes:
            entry = self.get(ref)
            self.store.delete(entry.record.id)
            with self._lock:
                self._entries.pop(entry.record.id, None)
                self._names.pop(entry.record.name, None)
            self.budget.release("dictionaries", entry.prepared.device_bytes)
        return entry

    def _check_new(
        self, dictionary_id: str, name: str, labels, encoder_sha256: str | None
    ) -> Entry | None:
        """The existing entry if this exact registration was made before; None if it is new;
        409 if its name or content is taken by another (or it has another encoder)."""
        with self._lock:
            existing = self._entries.get(dictionary_id)
            named = self._names.get(name)
        if existing is not None:
            same = existing.record.name == name and existing.record.labels == labels
            if same and existing.record.encoder_sha256 != encoder_sha256:
                raise Conflict(
                    f"{name!r} is registered with "
                    + ("another encoder" if existing.record.encoder else "no encoder")
                    + "; delete it first to register it with this one",
                    code="encoder_differs",
                )
            if same:
                return existing
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
        return None

    def _admit(self, record: DictionaryRecord) -> Entry:
        """Prepare `record` within the memory budget (of one device): with its Gram matrix when
        that fits (the configured Gram budget, and half of what the budget leaves besides the
        dictionary), matrix-free otherwise; on several devices split as `shard` says ("auto":
        by features when it would not fit the budget whole, else by rows); refused (413) when
        even that does not fit."""
        n_features, d_model = record.directions.shape
        free = self.budget.free
        base = solvers.footprint(
            n_features,
            d_model,
            STORE_DTYPE,
            gram=False,
            scan=solvers.default_scan(STORE_DTYPE, gram=False),
        )
        share = max(0, int((free - base) * GRAM_SHARE_OF_BUDGET))
        if self.gram_budget_bytes is None:
            cap, source = share, f"{GRAM_SHARE_OF_BUDGET:.0%} of the memory budget left"
        else:
            cap = min(self.gram_budget_bytes, share)
            source = (
                "UNFOLD_GRAM_BUDGET_BYTES"
                if cap == self.gram_budget_bytes
                else (f"{GRAM_SHARE_OF_BUDGET:.0%} of the memory budget left")
            )
        choice = solvers.choose_path(
            n_features, STORE_DTYPE, gram_budget_bytes=cap, budget_source=source
        )
        scan = solvers.default_scan(STORE_DTYPE, gram=choice.gram)
        nbytes = solvers.footprint(n_features, d_model, STORE_DTYPE, gram=choice.gram, scan=scan)
        placement = {}
        if len(self.devices) > 1:
            shard = self.shard
            if shard == "auto":
                shard = "features" if nbytes > free else "rows"
            placement = {"devices": self.devices, "shard": shard}
            if shard == "features":  # a device's share, padding included
                rows = -(-n_features // len(self.devices))
                nbytes = solvers.footprint(rows, d_model, STORE_DTYPE, gram=False, scan=scan)
                nbytes += rows * n_features * 4 if choice.gram else 0
                nbytes += (n_features - rows) * 4  # norms, replicated
        self.budget.reserve_dictionary(
            nbytes, f"dictionary {record.name!r} ({n_features} x {d_model})"
        )
        try:
            prepared = solvers.prepare(
                record.directions, record.bias, gram=choice.gram, scan=scan, **placement
            )
        except BaseException:
            self.budget.release("dictionaries", nbytes)
            raise
        if prepared.device_bytes != nbytes:  # keep the books exact
            self.budget.release("dictionaries", nbytes - prepared.device_bytes)
        return Entry(record, prepared, choice)

    def _insert(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.record.id] = entry
            self._names[entry.record.name] = entry.record.id


def local_devices(devices: int | str) -> list:
    """The first `devices` local devices of JAX's default backend, or all of them ("all")."""
    available = jax.local_devices()
    if devices == "all":
        return available
    if not 1 <= int(devices) <= len(available):
        raise ValueError(
            f"UNFOLD_DEVICES={devices}, but the {jax.default_backend()} backend has "
            f"{len(available)} local device(s)"
        )
    return available[: int(devices)]


def check_labels(labels: list[str] | None, n_features: int) -> None:
    """422 `invalid_labels` unless `labels` is None or one string of at most `MAX_LABEL_CHARS`
    per feature."""
    if labels is None:
        return
    if len(labels) != n_features:
        raise InvalidInput(
            f"labels has {len(labels)} entries; it needs one per feature (n_features={n_features})",
            code="invalid_labels",
        )
    for index, label in enumerate(labels):
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
            raise InvalidInput(
                f"label {index} must be a string of at most {MAX_LABEL_CHARS} characters",
                code="invalid_labels",
            )


def check_metadata(metadata: dict) -> None:
    """422 `invalid_metadata` unless `metadata` is a JSON object nested at most
    `MAX_METADATA_DEPTH` deep that renders (orjson, as the API does) in at most
    `MAX_METADATA_BYTES`: whatever is stored can be listed."""
    if not isinstance(metadata, dict):
        raise InvalidInput("metadata must be a JSON object", code="invalid_metadata")
    level, depth = [metadata], 1
    while level:
        if depth > MAX_METADATA_DEPTH:
            raise InvalidInput(
                f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it",
                code="invalid_metadata",
            )
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
        depth += 1
    try:
        size = len(orjson.dumps(metadata))
    except TypeError as error:  # orjson.JSONEncodeError: integers past 64 bits, surrogates, ...
        raise InvalidInput(
            f"metadata cannot be rendered as JSON ({error})", code="invalid_metadata"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(
            f"metadata takes {size} bytes as JSON; at most {MAX_METADATA_BYTES} are kept",
            code="invalid_metadata",
        )
