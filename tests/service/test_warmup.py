"""Warm-up of the settings users send most: recorded per dictionary, saved under the data
directory, compiled at the next start-up (`service.programs.Usage`, `batching.warmup_used`)."""

from __future__ import annotations

import json
import threading

import numpy as np

import solvers
from service.programs import MAX_USES_PER_DICTIONARY, USAGE_FILE, Usage, call_rows
from tests.service.conftest import running_client

ACTIVATION = [1.0] + [0.0] * 15  # the demo dictionary's d_model is 16
QUIET = {"compilation_cache": False}


class Prepared:
    """What `Usage.load` reads of a registry `Entry`."""

    def __init__(self, dictionary_id: str, prepared):
        self.record = type("Record", (), {"id": dictionary_id})()
        self.prepared = prepared


def identity() -> solvers.Dictionary:
    return solvers.prepare(np.eye(2, dtype=np.float32))


def omp(prepared, **params):
    return solvers.make_settings("omp", prepared, **params)


def test_usage_ranks_by_use_then_recency_within_an_age_and_keeps_a_bound():
    prepared = identity()
    usage = Usage()
    for k, tol, times in ((1, 0.0, 3), (2, 0.0, 1), (1, 0.5, 2)):  # tol is not a new program
        for _ in range(times):
            usage.record("a", omp(prepared, k=k, tol=tol), rows=k * 10)
    lasso = solvers.make_settings("lasso", prepared, alpha=0.1)
    usage.record("a", lasso, rows=1)
    (first, rows), second, third = usage.top("a", limit=3, max_age_s=60)
    assert (first.k, first.tol, rows) == (1, 0.5, 10)  # five times: the latest tol, most rows
    assert second == (lasso, 1)  # once, but after k=2 (once)
    assert third == (omp(prepared, k=2), 20)
    assert len(usage.top("a", limit=2, max_age_s=60)) == 2
    assert usage.top("a", limit=5, max_age_s=60, now=10**12) == []  # too old
    assert usage.top("b", limit=5, max_age_s=60) == []
    wide = solvers.prepare(np.eye(MAX_USES_PER_DICTIONARY + 2, dtype=np.float32))
    for k in range(1, MAX_USES_PER_DICTIONARY + 2):  # k is static: a structure each
        usage.record("a", omp(wide, k=k), 1)
    assert len(usage.top("a", limit=100, max_age_s=60)) == MAX_USES_PER_DICTIONARY


def test_usage_is_saved_atomically_and_merged_on_load(tmp_path):
    prepared = identity()
    path = tmp_path / USAGE_FILE
    first = Usage(path)
    first.record("a", omp(prepared, k=2), rows=7)
    assert not first.save()  # not before the saved record is merged (nothing to lose)
    first.load([])
    assert first.save() and not first.save()  # nothing new the second time
    assert not list(tmp_path.glob(f".{USAGE_FILE}*"))  # no temporary file left
    second = Usage(path)
    second.record("a", omp(prepared, k=2, tol=0.1), rows=3)
    assert second.load([Prepared("a", prepared)]) == 1
    assert [(s.k, s.tol, rows) for s, rows in second.top("a", 5, 60)] == [(2, 0.1, 7)]
    assert second.load([]) == 0  # a dictionary no longer loaded is dropped
    second.save()
    saved = json.loads(path.read_text())["dictionaries"]["a"]
    assert [(u["method"], u["settings"]["k"], u["count"]) for u in saved] == [("omp", 2, 2)]


def test_a_bad_usage_file_is_logged_and_ignored_then_rewritten(tmp_path, caplog):
    prepared = identity()
    path = tmp_path / USAGE_FILE
    for content in ("{not json", '["a list"]', '{"dictionaries": 3}'):
        path.write_text(content)
        usage = Usage(path)
        assert usage.load([Prepared("a", prepared)]) == 0
        assert "cannot be read" in caplog.text
        usage.record("a", omp(prepared, k=1), rows=1)
        assert usage.save()
        assert json.loads(path.read_text())["dictionaries"]["a"][0]["settings"]["k"] == 1
    good = {"method": "omp", "settings": {"k": 2}, "count": 1, "last_used": 1e12, "rows": 1}
    bad = [{"method": "nope", "settings": {}}, {"method": "omp", "settings": {"k": 9}}, 3]
    path.write_text(json.dumps({"version": 1, "dictionaries": {"a": [*bad, good]}}))
    usage = Usage(path)
    assert usage.load([Prepared("a", prepared)]) == 1
    assert "skipping a bad item" in caplog.text


def test_settings_used_are_warmed_after_a_restart(tmp_path):
    """The first app records k=3 (most used) and k=5; the second warms k=3 (a limit of one)
    after the defaults, and a k=3 request then compiles nothing."""
    with running_client(tmp_path, warmup=False, **QUIET) as client:
        for k, times in ((3, 3), (5, 1)):
            for _ in range(times):
                body = {"activations": [ACTIVATION] * 6, "k": k}
                response = client.post("/v1/dictionaries/demo/unfold", json=body)
                assert response.status_code == 200, response.text
    saved = json.loads((tmp_path / USAGE_FILE).read_text())["dictionaries"]
    [uses] = saved.values()
    assert sorted((u["settings"]["k"], u["count"], u["rows"]) for u in uses) == [
        (3, 3, 6),
        (5, 1, 6),
    ]

    overrides = {"max_batch_size": 4, "warmup_used_settings": 1, **QUIET}
    with running_client(tmp_path, **overrides) as client:  # waits for the whole warm-up
        programs = client.app.state.batcher.programs
        entry = client.app.state.registry.get("demo")
        k3, k5 = omp(entry.prepared, k=3), omp(entry.prepared, k=5)
        plan = programs.ensure(entry, k3, 1)
        assert all(call_rows(plan, n) <= programs.compiled(entry, k3) for n in range(1, 9))
        assert programs.compiled(entry, k5) == frozenset()
        assert entry.warm.is_set()  # the defaults' warm-up, as before
        body = {"activations": [ACTIVATION] * 6, "k": 3}
        assert client.post("/v1/dictionaries/demo/unfold", json=body).status_code == 200
        metrics = programs.metrics.registry
        labels = {"method": "omp", "cause": "request"}
        assert metrics.get_sample_value("unfold_compile_seconds_count", labels) is None
        warmed = {"method": "omp", "cause": "warm-up"}
        assert metrics.get_sample_value("unfold_compile_seconds_count", warmed) > 0


def test_the_used_settings_warm_up_stops_on_shutdown(tmp_path, monkeypatch):
    """Like the defaults' warm-up: asked to stop, it compiles nothing more."""
    from service import batching
    from service.programs import Programs

    with running_client(tmp_path, warmup=False, **QUIET) as client:
        entry = client.app.state.registry.get("demo")
        programs = Programs()
        programs.usage.record(entry.record.id, omp(entry.prepared, k=6), rows=1)
        stop = threading.Event()
        stop.set()
        args = (entry, programs, 4)
        assert batching.warmup_used(*args, limit=4, max_age_s=60, stop=stop) == 0
        assert programs.compiled(entry, omp(entry.prepared, k=6)) == frozenset()
        assert batching.warmup_used(*args, limit=4, max_age_s=60) == 1
        assert programs.compiled(entry, omp(entry.prepared, k=6))
