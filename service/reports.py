"""Per-dictionary reports: how far sparse recovery over a dictionary can be trusted.

A report holds the dictionary's norms, its coherence against the Welch bound (with the most
similar feature pairs) and its empirical recovery curves (OMP and l1, signed and non-negative
codes, simulated on the dictionary itself: `solvers.recovery_curve`) with the recommended k of
each, next to the theoretical l1 transition of a Gaussian dictionary of the same shape. It is
computed once per dictionary, after registration (or at start-up for a stored dictionary
without one), by a child process that a background thread starts one at a time (the programs
a report compiles leave with it), and stored as ``report.json`` next to the dictionary's
arrays.
A dictionary larger than `ReportSettings.max_features` is analysed on a random sample of its
features, which the report says.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import solvers

from .background import BackgroundWork
from .registry import Entry
from .store import DictionaryStore

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
REPORT_VERSION = 1
"""Stored reports of another version are computed again."""
RECOMMENDED_FRACTION = 0.95
"""The recommended k of a method: the largest k up to which this share of codes is recovered."""
CURVES = (("omp", False), ("omp", True), ("lasso", False), ("lasso", True))
"""(method, positive) of each recovery curve; "lasso" stands for l1 minimisation."""


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    max_features: int = 4096
    """Larger dictionaries are analysed on a random sample of this many features."""
    trials: int = 32
    """Synthetic codes per k of a recovery curve."""
    curve_seconds: float = 120.0
    """A recovery curve stops at the first k that starts after this long (said in the report)."""


class Stopped(Exception):
    """The server is shutting down: the report is left for the next start."""


def k_grid(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 11, 16, ...: steps of about sqrt(2), up to `limit`."""
    ks, value = [], 1.0
    while round(value) <= limit:
        if not ks or round(value) != ks[-1]:
            ks.append(round(value))
        value *= math.sqrt(2)
    return ks


def build_report(
    entry: Entry, settings: ReportSettings, stopping: threading.Event | None = None
) -> dict[str, Any]:
    """The report of `entry` (see the module's documentation)."""
    started = time.monotonic()
    record = entry.record
    directions = np.asarray(record.directions)
    n_features, d_model = directions.shape
    labels = record.labels
    sample = np.arange(n_features)
    if n_features > settings.max_features:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n_features, settings.max_features, replace=False))
    atoms = directions[sample]
    norms = np.asarray(entry.prepared.norms, np.float64)
    coherence = solvers.coherence(atoms, max_atoms=len(sample))
    pairs = []
    for i, j, cosine in coherence.top_pairs:
        i, j = int(sample[i]), int(sample[j])
        pair = {"i": i, "j": j, "cosine": cosine}
        if labels is not None:
            pair["labels"] = [labels[i], labels[j]]
        pairs.append(pair)
    prepared = solvers.prepare(atoms) if len(sample) < n_features else entry.prepared
    curves = [
        recovery_curve(prepared, method, positive, settings, stopping)
        for method, positive in CURVES
    ]
    theory = {
        "signed": solvers.l1_transition(len(sample), d_model) if len(sample) > d_model else None,
        "nonnegative": (
            solvers.l1_transition(len(sample), d_model, positive=True)
            if len(sample) > d_model
            else None
        ),
    }
    comparison = None
    if record.encoder is not None:
        comparison = encoder_comparison(entry, settings, stopping)
    return {
        "version": REPORT_VERSION,
        "dictionary": {"id": record.id, "name": record.name, "n_features": n_features,
                       "d_model": d_model},
        "computed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 3),
        "norms": {
            "min": float(norms.min()),
            "max": float(norms.max()),
            "mean": float(norms.mean()),
            "median": float(np.median(norms)),
            "histogram": histogram(norms, 30),
        },
        "coherence": {
            "mutual": coherence.mutual,
            "welch_bound": solvers.welch_bound(n_features, d_model),
            "guaranteed_k": coherence.guaranteed_k,
            "histogram": {"counts": coherence.histogram.tolist(),
                          "edges": coherence.bins.tolist()},
            "top_pairs": pairs,
            "sampled_features": len(sample),
        },
        "recovery": {
            "sampled_features": len(sample),
            "note": sample_note(len(sample), n_features),
            "trials": settings.trials,
            "criterion": "a code counts as recovered when the entries above 1% of its largest "
            "are exactly the true support and least squares on it gives the true codes to "
            "1e-3; codes: uniform random support, magnitudes uniform in [0.5, 2], random "
            "signs (signed) or positive (non-negative); OMP is told the true k, l1 is the "
            "LASSO with a vanishing penalty",
            "curves": curves,
            "recommended_k": {curve_name(c["method"], c["positive"]): c["recommended_k"]
                              for c in curves},
            "l1_transition": {
                **theory,
                "description": "the k at which l1 minimisation over a Gaussian random "
                "dictionary of this shape passes from success to failure: d_model = "
                "n_features psi(k / n_features), psi the l1 descent cone's normalised "
                "statistical dimension (Amelunxen, Lotz, McCoy & Tropp 2014), equal to Donoho "
                "& Tanner's weak threshold (2009)",
            },
        },
        "encoder": comparison,
    }  # fmt: skip


def encoder_comparison(
    entry: Entry, settings: ReportSettings, stopping: threading.Event | None
) -> dict[str, Any]:
    """The SAE's encoder against Unfold (non-negative OMP told the true k) on synthetic
    non-negative k-sparse codes over the whole dictionary: per k, the mean support F1 of each
    (entries above 1% of the row's largest against the true support) and the mean relative
    reconstruction error of each."""
    record = entry.record
    directions = np.asarray(record.directions, np.float64)
    bias = None if record.bias is None else np.asarray(record.bias, np.float64)
    fields = ("ks", "encoder_f1", "unfold_f1", "encoder_relative_error",
              "unfold_relative_error", "encoder_l0")  # fmt: skip
    rows: dict[str, list] = {key: [] for key in fields}
    started, truncated = time.monotonic(), None
    for k in k_grid(min(record.d_model, record.n_features, 64)):
        if stopping is not None and stopping.is_set():
            raise Stopped
        if time.monotonic() - started > settings.curve_seconds:
            truncated = f"time budget of {settings.curve_seconds:g} s spent"
            break
        rng = np.random.default_rng(k)
        truth = solvers.synthetic_codes(
            settings.trials, record.n_features, k, positive=True, rng=rng
        )
        centred = truth @ directions
        x = (centred + (0 if bias is None else bias)).astype(np.float32)
        indices, values = record.encoder.encode(x, record.bias)
        encoded = np.zeros_like(truth)
        for row, (i, v) in enumerate(zip(indices, values, strict=True)):
            encoded[row, i[i >= 0]] = v[i >= 0]
        unfolded = solvers.unfold(x, entry.prepared, "omp", k=k, positive=True).to_dense()
        scale = np.linalg.norm(centred, axis=1)
        for name, codes in (("encoder", encoded), ("unfold", unfolded)):
            rows[f"{name}_f1"].append(float(np.mean(support_f1(codes, truth))))
            error = np.linalg.norm(codes @ directions - centred, axis=1) / scale
            rows[f"{name}_relative_error"].append(float(np.mean(error)))
        rows["encoder_l0"].append(float(np.mean((indices >= 0).sum(axis=1))))
        rows["ks"].append(k)
    return {
        **record.encoder.describe(),
        **rows,
        "trials": settings.trials,
        "truncated": truncated,
        "note": "synthetic non-negative codes (magnitudes uniform in [0.5, 2]) over every "
        "feature; a SAE's encoder is trained on its model's activations, whose magnitudes "
        "may differ: compare on your own activations with compare_encoder",
    }


def support_f1(codes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row: F1 of the support of `codes` (entries above 1% of the row's largest |code|)
    against the support of `truth`."""
    largest = np.max(np.abs(codes), axis=1, keepdims=True)
    found = np.abs(codes) > 0.01 * np.where(largest > 0, largest, np.inf)
    true = truth != 0
    hits = (found & true).sum(axis=1)
    return 2 * hits / np.maximum(found.sum(axis=1) + true.sum(axis=1), 1)


def curve_name(method: str, positive: bool) -> str:
    return f"{method}_positive" if positive else method


def sample_note(sampled: int, n_features: int) -> str | None:
    if sampled == n_features:
        return None
    return (
        f"analysed on a random sample of {sampled} of the {n_features} features (seed 0): "
        "coherence is that of the sample, and recovery is simulated over the sample, which is "
        "easier than over every feature (fewer atoms to confuse): read it as an upper bound"
    )


def recovery_curve(
    prepared: solvers.Dictionary,
    method: str,
    positive: bool,
    settings: ReportSettings,
    stopping: threading.Event | None,
) -> dict[str, Any]:
    """One curve over `k_grid`, stopped after two ks in a row recover nothing or when the time
    budget is spent; `Stopped` at shutdown."""
    ks, shares, truncated = [], [], None
    started = time.monotonic()
    for k in k_grid(min(prepared.d_model, prepared.n_features)):
        if stopping is not None and stopping.is_set():
            raise Stopped
        if time.monotonic() - started > settings.curve_seconds:
            truncated = f"time budget of {settings.curve_seconds:g} s spent"
            break
        curve = solvers.recovery_curve(
            prepared, method, [k], trials=settings.trials, positive=positive, seed=k
        )
        ks.append(k)
        shares.append(curve.recovered[0])
        if len(shares) >= 2 and shares[-1] == 0 and shares[-2] == 0:
            break
    curve = solvers.RecoveryCurve(method, positive, ks, shares, settings.trials)
    return {
        "method": method,
        "positive": positive,
        "ks": ks,
        "recovered": shares,
        "recommended_k": curve.largest_k(RECOMMENDED_FRACTION),
        "half_k": curve.crossing(0.5) if shares and shares[0] >= 0.5 > shares[-1] else None,
        "truncated": truncated,
    }


def histogram(values: np.ndarray, bins: int) -> dict[str, list]:
    counts, edges = np.histogram(values, bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


class Reports:
    """Reports of the registered dictionaries: computed one at a time on a background thread,
    stored under each dictionary's folder, read back from there."""

    def __init__(self, root: Path, background: BackgroundWork, settings: ReportSettings):
        self.root = Path(root)
        self.background = background
        self.settings = settings
        self._queue: queue.Queue[Entry] = queue.Queue()
        self._states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def path(self, dictionary_id: str) -> Path:
        return self.root / dictionary_id / REPORT_FILE

    def schedule(self, entry: Entry) -> None:
        """Compute `entry`'s report unless it is stored or on its way."""
        dictionary_id = entry.record.id
        with self._lock:
            if dictionary_id in self._states and self._states[dictionary_id]["state"] != "failed":
                return
            if self.read(dictionary_id) is not None:
                self._states[dictionary_id] = {"state": "ready"}
                return
            self._states[dictionary_id] = {"state": "queued"}
            self._queue.put(entry)
            if self._worker is None or not self._worker.is_alive():
                self._worker = self.background.start("unfold-reports", self._work)

    def get(self, entry: Entry) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(state, report or None): state ``queued``, ``running``, ``ready`` or ``failed``
        (with its ``error``), or ``absent`` when reports are not computed here."""
        dictionary_id = entry.record.id
        with self._lock:
            state = dict(self._states.get(dictionary_id, {"state": "absent"}))
        report = self.read(dictionary_id) if state["state"] in ("ready", "absent") else None
        if report is not None:
            state = {"state": "ready"}
        return state, report

    def read(self, dictionary_id: str) -> dict[str, Any] | None:
        """The stored report, or None when there is none (or one of another version)."""
        try:
            report = json.loads(self.path(dictionary_id).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(report, dict) or report.get("version") != REPORT_VERSION:
            return None
        return report

    def _work(self) -> None:
        stopping = self.background.stopping
        while not stopping.is_set():
            try:
                entry = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            dictionary_id = entry.record.id
            self._set(dictionary_id, state="running", started_at=now())
            outcome = self._compute_apart(dictionary_id, stopping)
            if outcome == "stopped":
                self._set(dictionary_id, state="queued")
                return
            if outcome is not None:
                log.error("report of dictionary %s failed: %s", entry.record.name, outcome)
                self._set(dictionary_id, state="failed", error=outcome)
                continue
            self._set(dictionary_id, state="ready")

    def _compute_apart(self, dictionary_id: str, stopping: threading.Event) -> str | None:
        """Compute and write a report in a child process (`main`): the programs it compiles,
        tens per dictionary, leave with it instead of staying in the server's memory. Returns
        None when done, "stopped" at shutdown (the child is ended, nothing is written), or
        what went wrong."""
        settings = self.settings
        limits = (settings.max_features, settings.trials, settings.curve_seconds)
        command = [sys.executable, "-m", "service.reports", str(self.root), dictionary_id,
                   *(str(limit) for limit in limits)]  # fmt: skip
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # share an accelerator
        with tempfile.TemporaryFile() as errors:
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
            while child.poll() is None:
                if stopping.wait(0.5):
                    child.terminate()
                    child.wait()
                    return "stopped"
            if child.returncode == 0:
                return None
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
            return f"exit status {child.returncode}: {' '.join(tail)}"

    def _set(self, dictionary_id: str, **state) -> None:
        with self._lock:
            self._states[dictionary_id] = state


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write(root: Path, dictionary_id: str, report: dict[str, Any]) -> None:
    """Write atomically; a dictionary deleted meanwhile keeps no report."""
    folder = Path(root) / dictionary_id
    if not folder.is_dir():
        return
    temporary = folder / f".{REPORT_FILE}.{os.getpid()}.tmp"
    try:
        temporary.write_text(json.dumps(report))
        os.replace(temporary, folder / REPORT_FILE)
    except OSError:
        temporary.unlink(missing_ok=True)
        if folder.is_dir():
            raise


def main(argv: list[str]) -> int:
    """``python -m service.reports ROOT ID MAX_FEATURES TRIALS CURVE_SECONDS``: compute the
    report of the stored dictionary ROOT/ID and write it beside it."""
    root, dictionary_id, max_features, trials, curve_seconds = argv
    record = DictionaryStore.load(Path(root) / dictionary_id)
    prepared = solvers.prepare(record.directions, record.bias, gram=False)
    entry = Entry(record, prepared, path_choice=None)
    settings = ReportSettings(int(max_features), int(trials), float(curve_seconds))
    write(Path(root), dictionary_id, build_report(entry, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
