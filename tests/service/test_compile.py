"""Compiling programs: once per program however many callers need it, timed in the metrics,
and left out of requests' deadlines (`service.programs`, `Batcher.submit`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import NamedTuple

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import solvers
from service.batching import Batcher
from service.errors import Timeout
from service.metrics import Metrics
from service.programs import CompileClock, Programs, call_rows
from tests.service.conftest import running_client

QUIET = {"demo": False, "compilation_cache": False}


class Result(NamedTuple):
    rows: np.ndarray  # (batch, d)


def rows_of(n: int) -> np.ndarray:
    return np.ones((n, 3), np.float32)


def jit_programs() -> int:
    """Programs in jit's cache of the solver (process-wide)."""
    from solvers import _api

    size = getattr(_api._solve_jit, "_cache_size", None)
    if size is None:
        pytest.skip("this JAX has no jit cache size")
    return size()


class FakeEntry(NamedTuple):
    """What `Programs` reads of a registry `Entry`."""

    record: object
    prepared: solvers.Dictionary


class FakeRecord(NamedTuple):
    name: str


def entry_of(n_features: int, d_model: int, seed: int = 0) -> FakeEntry:
    """A dictionary of a shape that no other test uses (so nothing is compiled for it)."""
    directions = np.random.default_rng(seed).standard_normal((n_features, d_model))
    return FakeEntry(FakeRecord(f"d{n_features}x{d_model}"), solvers.prepare(directions))


def slowed(monkeypatch, seconds: float) -> list:
    """Make every compiling run of `Programs` take `seconds` longer; returns the list of the
    batch sizes they ran."""
    runs = []
    run = Programs._run

    def slow_run(zeros, prepared, settings, family):
        runs.append(zeros.shape[0])
        time.sleep(seconds)
        run(zeros, prepared, settings, family)

    monkeypatch.setattr(Programs, "_run", staticmethod(slow_run))
    return runs


# The compile clock and the deadline.


def test_the_compile_clock_counts_wall_time_with_any_compilation_running():
    clock = CompileClock()
    assert clock.now() == 0
    outer = clock.running()
    outer.__enter__()
    time.sleep(0.05)
    with clock.running():  # overlapping: counted once
        time.sleep(0.05)
    during = clock.now()
    outer.__exit__(None, None, None)
    after = clock.now()
    time.sleep(0.05)
    assert 0.1 <= during <= after < 0.15 and clock.now() == after  # stopped with the last one


@pytest.mark.parametrize("batching", [True, False])
def test_a_request_waiting_for_a_compilation_is_answered_but_a_slow_solve_times_out(batching):
    """Timeout 0.2 s: compiling for 0.6 s (while this request's own solve or another key's runs
    on the only thread) does not count; solving for 0.6 s, or 0.3 s after a compilation,
    does."""

    async def main():
        batcher = Batcher(enabled=batching, timeout_s=0.2, threads=1)
        clock = batcher.programs.clock

        def compiling(rows, cancel):
            with clock.running():
                time.sleep(0.6)
            return Result(rows)

        def solving(rows, cancel):
            time.sleep(0.6)
            return Result(rows)

        def compiling_then_solving(rows, cancel):
            with clock.running():
                time.sleep(0.3)
            time.sleep(0.3)
            return Result(rows)

        try:
            # Another key's compilation holds the only thread while this one waits.
            compiled, queued = await asyncio.gather(
                batcher.submit("new", rows_of(1), compiling),
                batcher.submit("other", rows_of(2), lambda rows, cancel: Result(rows)),
            )
            assert compiled.rows.shape == (1, 3) and queued.rows.shape == (2, 3)
            with pytest.raises(Timeout) as slow:
                await batcher.submit("slow", rows_of(1), solving)
            while batcher.queued_rows("slow"):  # its thread is still solving
                await asyncio.sleep(0.01)
            with pytest.raises(Timeout) as both:
                await batcher.submit("both", rows_of(1), compiling_then_solving)
            return slow.value, both.value
        finally:
            await batcher.close()

    slow, both = asyncio.run(main())
    assert slow.status_code == 504 and "compiling" not in str(slow)
    assert "spent compiling" in str(both)


# Programs: one compilation per program.


def test_concurrent_callers_needing_a_new_program_compile_it_once(monkeypatch):
    entry = entry_of(41, 13)
    settings = solvers.make_settings("omp", entry.prepared, k=3)
    metrics = Metrics()
    programs = Programs(metrics)
    runs = slowed(monkeypatch, 0.3)  # so that every caller arrives during the compilation
    before = jit_programs()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        plans = list(pool.map(lambda _: programs.ensure(entry, settings, 6), range(8)))
    needed = call_rows(plans[0], 6)
    compiled = programs.compiled(entry, settings)
    assert len(runs) == len(needed) and compiled >= needed
    assert programs.count() == len(compiled)  # the record is the programs held
    assert jit_programs() == before  # compiled ahead of time, not into jit's cache
    count = metrics.registry.get_sample_value(
        "unfold_compile_seconds_count", {"method": "omp", "cause": "request"}
    )
    assert count == len(needed)
    # The real solve compiles nothing more; nor does another tolerance (traced, not static).
    x = np.random.default_rng(1).standard_normal((6, 13)).astype(np.float32)
    programs.run(entry, settings, x)
    other = solvers.make_settings("omp", entry.prepared, k=3, tol=0.5)
    assert programs.ensure(entry, other, 6) == plans[0]
    programs.run(entry, other, x)
    assert len(runs) == len(needed) and programs.count() == len(compiled)
    assert jit_programs() == before


def test_each_program_a_batch_runs_is_compiled_by_the_fewest_rows(monkeypatch):
    """A large batch's programs are compiled on zeros of a block, not of the whole batch; a
    dictionary of the same shape shares them."""
    entry = entry_of(43, 13)
    settings = solvers.make_settings("omp", entry.prepared, k=2)
    programs = Programs()
    runs = slowed(monkeypatch, 0)
    plan = programs.ensure(entry, settings, 5000)
    assert call_rows(plan, 5000) <= programs.compiled(entry, settings)
    assert runs and max(runs) <= plan.block_rows
    runs.clear()
    programs.ensure(entry, settings, 4096)  # full blocks only: compiled already
    assert runs == []
    twin = entry_of(43, 13, seed=1)
    programs.ensure(twin, settings, 5000)
    held = programs.count()
    programs.run(twin, settings, np.ones((5000, 13), np.float32))
    assert runs == [] and programs.count() == held


# Through the app.


def metric(client, name: str, **labels) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def register(client, name: str, n_features: int, d_model: int) -> None:
    directions = np.random.default_rng(n_features).standard_normal((n_features, d_model))
    created = client.post(
        "/v1/dictionaries", json={"name": name, "directions": directions.tolist()}
    )
    assert created.status_code == 201, created.text


def test_a_request_for_a_new_program_is_answered_though_compiling_outlasts_its_timeout(
    tmp_path, monkeypatch, caplog
):
    runs = slowed(monkeypatch, 1.0)
    with running_client(tmp_path, warmup=False, request_timeout_s=0.5, **QUIET) as client:
        register(client, "slow", 47, 13)
        body = {"activations": [[1.0] * 13] * 3, "k": 4}
        with caplog.at_level("INFO", logger="service.programs"):
            response = client.post("/v1/dictionaries/slow/unfold", json=body)
        assert response.status_code == 200, response.text
        assert len(runs) >= 1
        labels = {"method": "omp", "cause": "request"}
        assert metric(client, "unfold_compile_seconds_count", **labels) == len(runs)
        assert metric(client, "unfold_compile_seconds_sum", **labels) >= len(runs) * 1.0
        assert "compiled OMP(k=4" in caplog.text and "dictionary slow" in caplog.text
        compiled = len(runs)
        again = client.post("/v1/dictionaries/slow/unfold", json={**body, "tol": 0.1})
        assert again.status_code == 200 and len(runs) == compiled
        assert metric(client, "unfold_compile_seconds_count", **labels) == compiled


def test_concurrent_requests_with_a_new_program_compile_it_once(tmp_path, monkeypatch):
    """Different tolerances are different batch keys (solved apart) but one program."""
    runs = slowed(monkeypatch, 0.5)
    with running_client(tmp_path, warmup=False, **QUIET) as client:
        register(client, "shared", 53, 13)
        start = threading.Barrier(6)

        def post(i):
            start.wait()
            body = {"activations": [[1.0] * 13] * 2, "k": 5, "tol": i / 10}
            return client.post("/v1/dictionaries/shared/unfold", json=body).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(post, range(6))) == [200] * 6
        entry = client.app.state.registry.get("shared")
        settings = solvers.make_settings("omp", entry.prepared, k=5)
        plan = client.app.state.batcher.programs.ensure(entry, settings, 2)
        assert len(runs) == len(call_rows(plan, 2)) >= 1


def test_program_families_past_the_limit_are_freed_least_recently_used_first():
    """A caller cycling through static values (OMP's k) costs compilations, not memory."""
    entry = entry_of(40, 8)
    metrics = Metrics()
    programs = Programs(metrics, max_families=2)
    x = np.ones((3, 8), np.float32)
    omp = {k: solvers.make_settings("omp", entry.prepared, k=k) for k in (1, 2, 3)}
    for k in (1, 2, 1, 3):  # k=2 is then the least recently used
        programs.run(entry, omp[k], x)
    assert programs.compiled(entry, omp[2]) == frozenset()
    assert programs.compiled(entry, omp[1]) and programs.compiled(entry, omp[3])
    assert metrics.registry.get_sample_value("unfold_program_families_evicted_total") == 1
    held = metrics.registry.get_sample_value("unfold_programs")
    assert (
        held
        == programs.count()
        == len(programs.compiled(entry, omp[1])) + len(programs.compiled(entry, omp[3]))
    )
    again = programs.run(entry, omp[2], x)  # compiled again, same answer
    np.testing.assert_array_equal(again.indices, solvers.unfold(x, entry.prepared, k=2).indices)
