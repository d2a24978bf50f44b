"""The dynamic batcher: merging, slicing, isolation of failures, queue limit, timeout."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from typing import NamedTuple

import numpy as np
import pytest

import solvers
from service.batching import (
    SETTLE_TURNS,
    Batcher,
    batch_rows,
    bucket_sizes,
    settle_heap,
    slice_result,
)
from service.demo import demo_dictionary
from service.errors import Overloaded, Timeout
from service.metrics import Metrics


class Result(NamedTuple):
    doubled: np.ndarray  # (batch, d)
    row_sum: np.ndarray  # (batch,)
    width: int


class Recorder:
    """A solve function that records the rows of every call; fails on rows holding NaN."""

    def __init__(self, release: threading.Event | None = None):
        self.calls: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = release

    def __call__(self, rows: np.ndarray, cancel: threading.Event) -> Result:
        self.calls.append(rows.copy())
        self.started.set()
        if self.release is not None and not self.release.wait(timeout=30):
            raise RuntimeError("test never released the solve")
        if np.isnan(rows).any():
            raise ValueError("NaN in rows")
        return Result(2 * rows, rows.sum(axis=1), rows.shape[1])


def rows_of(n: int, start: float, d: int = 3) -> np.ndarray:
    return (start + np.arange(n * d, dtype=np.float32)).reshape(n, d)


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_are_merged_into_one_call_with_correct_slices():
    solve = Recorder()
    requests = [rows_of(n, 100 * i) for i, n in enumerate([1, 2, 3, 1, 1])]

    async def main():
        # A long wait: the batch fires because it is full (8 rows), not because time ran out.
        batcher = Batcher(max_batch_size=8, max_wait_ms=10_000)
        try:
            return await asyncio.gather(*(batcher.submit("k", r, solve) for r in requests))
        finally:
            await batcher.close()

    results = run(main())
    assert len(solve.calls) == 1 and solve.calls[0].shape == (8, 3)
    for rows, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.doubled, 2 * rows)
        np.testing.assert_array_equal(result.row_sum, rows.sum(axis=1))
        assert result.width == 3


def test_batches_respect_max_batch_size_and_big_requests_run_alone():
    solve = Recorder()
    sizes = [3, 3, 3, 20, 1]

    async def main():
        batcher = Batcher(max_batch_size=6, max_wait_ms=20)
        try:
            return await asyncio.gather(
                *(batcher.submit("k", rows_of(n, i), solve) for i, n in enumerate(sizes))
            )
        finally:
            await batcher.close()

    results = run(main())
    assert [c.shape[0] for c in solve.calls] == [6, 3, 20, 1]
    assert [r.doubled.shape[0] for r in results] == sizes


def test_requests_arriving_turn_after_turn_join_one_batch():
    """No wait is configured, yet requests still arriving on the next turns of the event loop
    (a burst being parsed) join the batch instead of the first being solved alone."""
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=64, max_wait_ms=0)

        async def after(turns: int, rows: np.ndarray):
            for _ in range(turns):
                await asyncio.sleep(0)
            return await batcher.submit("k", rows, solve)

        try:
            burst = [after(i, rows_of(1, i)) for i in range(10)]
            # One more request, after the burst and more quiet turns than the batcher waits.
            late = after(10 + SETTLE_TURNS + 2, rows_of(1, 99))
            return await asyncio.gather(*burst, late)
        finally:
            await batcher.close()

    results = run(main())
    assert [c.shape[0] for c in solve.calls] == [10, 1]
    np.testing.assert_array_equal(results[-1].doubled, 2 * rows_of(1, 99))


def test_rows_just_over_a_power_of_two_leave_the_rest_to_the_next_batch():
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=256)
        try:
            return await asyncio.gather(
                *(batcher.submit("k", rows_of(1, i), solve) for i in range(33))
            )
        finally:
            await batcher.close()

    results = run(main())
    assert [c.shape[0] for c in solve.calls] == [32, 1]  # not one call padded to 64 rows
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.doubled, 2 * rows_of(1, i))


def test_a_large_request_next_in_line_is_not_left_for_a_lone_small_one():
    """33 rows would be trimmed to 32, but whole requests [1, 32] would then give a call for the
    1-row request alone, mostly fixed cost: one call of 33 solves more rows per unit of work."""
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=256)
        try:
            return await asyncio.gather(
                batcher.submit("k", rows_of(1, 0), solve),
                batcher.submit("k", rows_of(32, 1), solve),
            )
        finally:
            await batcher.close()

    run(main())
    assert [c.shape[0] for c in solve.calls] == [33]


def test_waiting_for_a_burst_is_bounded_in_time():
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=64, settle_limit_s=0.0)

        async def after(turns: int):
            for _ in range(turns):
                await asyncio.sleep(0)
            return await batcher.submit("k", rows_of(1, turns), solve)

        try:
            return await asyncio.gather(*(after(i) for i in range(10)))
        finally:
            await batcher.close()

    run(main())
    assert solve.calls[0].shape[0] < 10 and sum(c.shape[0] for c in solve.calls) == 10


def test_a_continuous_stream_of_requests_does_not_hold_a_batch_back_forever():
    """Requests arriving every turn for 0.3 s: the first batch starts after `settle_limit_s`
    (0.02 s), long before the stream ends or fills `max_batch_size`."""
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=1_000_000, settle_limit_s=0.02)
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.3
        tasks = []
        try:
            while loop.time() < end:
                tasks.append(asyncio.ensure_future(batcher.submit("k", rows_of(1, 0), solve)))
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            return len(tasks)
        finally:
            await batcher.close()

    total = run(main())
    assert len(solve.calls) >= 2 and solve.calls[0].shape[0] < total
    assert sum(c.shape[0] for c in solve.calls) == total


@pytest.mark.parametrize(
    ("waiting", "taken"),
    [
        (0, 0), (1, 1), (3, 3), (9, 9), (16, 16),  # small: a call's own cost dominates
        (17, 16), (20, 16), (24, 24),  # 24 fill 32 well enough
        (33, 32), (47, 32), (48, 32), (49, 49), (64, 64), (65, 64),
        (129, 128), (200, 200), (300, 256), (1000, 256),  # at most max_batch_size
    ],
)  # fmt: skip
def test_batch_rows_avoids_padding_a_batch_to_twice_its_size(waiting, taken):
    assert batch_rows(waiting, 256) == taken


def test_batch_rows_leaves_batches_of_whole_blocks_alone():
    """The solver pads only the last block of `block_rows`: no trimming past one block."""
    assert batch_rows(1500, 4096, block_rows=1024) == 1500
    assert batch_rows(1000, 4096, block_rows=1024) == 1000  # 1000 fills 1024 well
    assert batch_rows(520, 4096, block_rows=1024) == 512


def test_different_keys_are_not_merged():
    solve = Recorder()

    async def main():
        batcher = Batcher(max_batch_size=2, max_wait_ms=10_000)
        try:
            return await asyncio.gather(
                batcher.submit(("a", 1), rows_of(1, 0), solve),
                batcher.submit(("b", 1), rows_of(1, 10), solve),
                batcher.submit(("a", 1), rows_of(1, 20), solve),
                batcher.submit(("b", 1), rows_of(1, 30), solve),
            )
        finally:
            await batcher.close()

    results = run(main())
    assert sorted(c[0, 0] for c in solve.calls) == [0, 10]  # two calls, one per key
    assert [r.doubled[0, 0] for r in results] == [0, 20, 40, 60]


def test_a_failing_merged_solve_falls_back_so_only_the_culprit_fails():
    solve = Recorder()
    bad = rows_of(2, 50)
    bad[1, 1] = np.nan
    requests = [rows_of(1, 0), bad, rows_of(3, 10)]

    async def main():
        batcher = Batcher(max_batch_size=6, max_wait_ms=10_000)
        try:
            return await asyncio.gather(
                *(batcher.submit("k", r, solve) for r in requests), return_exceptions=True
            )
        finally:
            await batcher.close()

    good_1, failed, good_2 = run(main())
    assert isinstance(failed, ValueError) and "NaN" in str(failed)
    np.testing.assert_array_equal(good_1.doubled, 2 * requests[0])
    np.testing.assert_array_equal(good_2.doubled, 2 * requests[2])
    assert [c.shape[0] for c in solve.calls] == [6, 1, 2, 3]  # merged, then each alone


def test_batching_off_solves_each_request_alone():
    solve = Recorder()
    requests = [rows_of(n, 10 * i) for i, n in enumerate([1, 2, 1, 4])]

    async def main():
        batcher = Batcher(enabled=False, max_batch_size=64, max_wait_ms=10_000)
        try:
            return await asyncio.gather(*(batcher.submit("k", r, solve) for r in requests))
        finally:
            await batcher.close()

    results = run(main())
    assert sorted(c.shape[0] for c in solve.calls) == [1, 1, 2, 4]
    for rows, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.doubled, 2 * rows)


@pytest.mark.parametrize("enabled", [True, False])
def test_full_queue_refuses_at_once_with_retry_after(enabled):
    release = threading.Event()
    solve = Recorder(release)

    async def main():
        batcher = Batcher(enabled=enabled, max_queue_rows=3, max_wait_ms=0, retry_after_s=7)
        try:
            first = asyncio.create_task(batcher.submit("k", rows_of(2, 0), solve))
            await asyncio.to_thread(solve.started.wait, 30)  # 2 rows are being solved
            assert batcher.queued_rows("k") == 2
            second = asyncio.create_task(batcher.submit("k", rows_of(1, 0), solve))  # 3: fits
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:
                await batcher.submit("k", rows_of(1, 0), solve)  # 4 > 3
            other_key = asyncio.create_task(batcher.submit("other", rows_of(1, 0), solve))
            release.set()
            results = await asyncio.gather(first, second, other_key)
            assert batcher.queued_rows("k") == 0
            after = await batcher.submit("k", rows_of(3, 0), solve)  # room again
            return refused.value, results, after
        finally:
            release.set()
            await batcher.close()

    error, results, after = run(main())
    assert error.status_code == 429 and error.headers == {"Retry-After": "7"}
    assert [r.doubled.shape[0] for r in results] == [2, 1, 1] and after.doubled.shape[0] == 3


@pytest.mark.parametrize("enabled", [True, False])
def test_queue_depth_metric_counts_rows_waiting_and_being_solved_per_dictionary(enabled):
    release = threading.Event()
    solve = Recorder(release)
    metrics = Metrics()

    def depth(label: str) -> float | None:
        return metrics.registry.get_sample_value("unfold_queue_depth", {"dictionary": label})

    async def main():
        batcher = Batcher(enabled=enabled, max_wait_ms=0, threads=1, metrics=metrics)
        try:
            # Two settings of one dictionary share its label; another dictionary has its own.
            first = asyncio.create_task(batcher.submit(("d1", 4), rows_of(2, 0), solve))
            await asyncio.to_thread(solve.started.wait, 30)  # 2 rows being solved
            waiting = [
                asyncio.create_task(batcher.submit(key, rows_of(n, 0), solve))
                for key, n in ((("d1", 8), 3), (("d2", 4), 1))
            ]
            await asyncio.sleep(0.05)  # queued behind the running solve
            during = depth("d1"), depth("d2")
            release.set()
            await asyncio.gather(first, *waiting)
            return during, (depth("d1"), depth("d2"))
        finally:
            release.set()
            await batcher.close()

    during, after = run(main())
    assert during == (5, 1) and after == (0, 0)


def test_a_request_larger_than_the_queue_limit_is_admitted_when_nothing_is_queued():
    solve = Recorder()

    async def main():
        batcher = Batcher(max_queue_rows=2, max_batch_size=2)
        try:
            return await batcher.submit("k", rows_of(5, 0), solve)
        finally:
            await batcher.close()

    assert run(main()).doubled.shape == (5, 3)


def test_timeout_answers_504_and_drops_the_queued_request():
    release = threading.Event()
    solve = Recorder(release)

    async def main():
        batcher = Batcher(max_batch_size=1, max_wait_ms=0, timeout_s=0.2)
        try:
            running = asyncio.create_task(batcher.submit("k", rows_of(1, 0), solve))
            await asyncio.to_thread(solve.started.wait, 30)
            queued = asyncio.create_task(batcher.submit("k", rows_of(2, 100), solve))
            outcomes = await asyncio.gather(running, queued, return_exceptions=True)
            assert batcher.queued_rows("k") == 1  # the running solve still holds its row
            release.set()
            while batcher.queued_rows("k"):
                await asyncio.sleep(0.01)
            return outcomes
        finally:
            release.set()
            await batcher.close()

    outcomes = run(main())
    assert all(isinstance(o, Timeout) for o in outcomes)
    assert outcomes[0].status_code == 504 and outcomes[0].code == "timeout"
    assert [c[0, 0] for c in solve.calls] == [0]  # the queued request never reached the solver


def test_merged_unfold_results_equal_solving_each_request_alone():
    directions, _ = demo_dictionary()
    prepared = solvers.prepare(directions)
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 3, 2)]
    metrics = Metrics()

    def solve(rows, cancel):
        return solvers.unfold(rows, prepared, method="omp", k=4, cancel=cancel)

    async def main():
        batcher = Batcher(max_batch_size=6, max_wait_ms=10_000, metrics=metrics)
        try:
            return await asyncio.gather(*(batcher.submit(("demo", 4), r, solve) for r in requests))
        finally:
            await batcher.close()

    results = run(main())
    for rows, result in zip(requests, results, strict=True):
        alone = solve(rows, None)
        assert isinstance(result, solvers.UnfoldResult) and result.n_features == 32
        for name, value in alone._asdict().items():
            np.testing.assert_allclose(getattr(result, name), value, rtol=1e-5, atol=1e-6)
    registry = metrics.registry
    assert registry.get_sample_value("unfold_batch_size_count") == 1
    assert registry.get_sample_value("unfold_batch_size_sum") == 6
    assert registry.get_sample_value("unfold_rows_total") == 6
    assert registry.get_sample_value("unfold_queue_depth", {"dictionary": "demo"}) == 0


def test_slice_result_and_bucket_sizes():
    result = Result(np.arange(12).reshape(4, 3), np.arange(4), 3)
    part = slice_result(result, slice(1, 3))
    np.testing.assert_array_equal(part.doubled, [[3, 4, 5], [6, 7, 8]])
    assert part.row_sum.tolist() == [1, 2] and part.width == 3
    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bucket_sizes(1) == [1] and bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert bucket_sizes(5000)[-1] == 1024


def test_start_up_warm_up_compiles_every_program_a_default_request_needs(tmp_path):
    """After the warm-up, default-settings requests of any size up to max_batch_size compile
    nothing new; other settings do (so this test can tell). The dictionary has a shape no other
    test uses, so nothing was compiled for it before."""
    from tests.service.conftest import running_client

    directions = np.random.default_rng(5).standard_normal((37, 11)).tolist()
    quiet = {"demo": False, "compilation_cache": False}
    with running_client(tmp_path, warmup=False, **quiet) as client:
        created = client.post("/v1/dictionaries", json={"name": "odd", "directions": directions})
        assert created.status_code == 201, created.text
    with running_client(tmp_path, max_batch_size=16, **quiet) as client:
        assert client.app.state.registry.ready.is_set()
        programs = client.app.state.batcher.programs
        before = programs.count()
        assert before > 0
        for rows in (1, 3, 5, 9, 16):
            response = client.post(
                "/v1/dictionaries/odd/unfold", json={"activations": [[1.0] * 11] * rows}
            )
            assert response.status_code == 200, response.text
        assert programs.count() == before
        response = client.post(
            "/v1/dictionaries/odd/unfold", json={"activations": [[1.0] * 11] * 3, "k": 3}
        )
        assert response.status_code == 200 and programs.count() > before


class _Node:
    """A garbage-collected object that can reference itself (a cycle)."""


def test_settle_heap_collects_garbage_cycles_and_freezes_the_survivors():
    survivor, garbage = _Node(), _Node()
    survivor.me, garbage.me = survivor, garbage  # two cycles: only `survivor` is referenced
    dead = weakref.ref(garbage)
    del garbage
    settle_heap()
    assert dead() is None  # collected first, not frozen
    assert not any(o is survivor for o in gc.get_objects())  # out of every generation
    survivor.me = None  # a frozen object is still freed by reference counting
    alive = weakref.ref(survivor)
    del survivor
    assert alive() is None


def test_the_loaded_app_and_a_warmed_dictionary_settle_the_heap(tmp_path):
    """The objects of start-up and of a registration's warm-up leave the collector's care, so
    a full collection does not scan them (see `settle_heap`)."""
    from tests.service.conftest import running_client

    gc.unfreeze()
    with running_client(tmp_path, max_batch_size=4) as client:  # loaded and warmed: the demo
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        created = client.post("/v1/dictionaries", json={"name": "w", "directions": [[1, 0]]})
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 120
        while not client.get("/v1/dictionaries/w").json()["warm"]:
            assert time.monotonic() < deadline, "never warmed"
            time.sleep(0.05)
        assert gc.get_freeze_count() > 0


def test_clients_take_turns_in_a_batch_and_a_full_queue_refuses_only_those_in_it():
    release = threading.Event()
    solve = Recorder(release)

    async def main():
        batcher = Batcher(max_batch_size=2, max_queue_rows=5, max_wait_ms=0, threads=1)
        try:
            held = asyncio.create_task(batcher.submit("k", rows_of(1, 0), solve, client="a"))
            await asyncio.to_thread(solve.started.wait, 30)
            backlog = [
                asyncio.create_task(batcher.submit("k", rows_of(1, i), solve, client="a"))
                for i in (1, 2, 3, 4)
            ]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:  # full, and a has rows in it
                await batcher.submit("k", rows_of(1, 5), solve, client="a")
            # b has none: admitted past the limit, and not behind a's four.
            other = asyncio.create_task(batcher.submit("k", rows_of(1, 100), solve, client="b"))
            await asyncio.sleep(0)
            assert batcher.queued_rows("k") == 6
            release.set()
            await asyncio.gather(held, *backlog, other)
            return refused.value
        finally:
            release.set()
            await batcher.close()

    error = run(main())
    assert error.status_code == 429 and "5 of them yours" in error.message
    firsts = [sorted(call[:, 0].tolist()) for call in solve.calls]
    assert firsts[:2] == [[0.0], [1.0, 100.0]]


def test_a_freed_solver_thread_goes_first_to_a_dictionary_under_its_share():
    """Two threads, both taken by dictionary d (nobody else waited). d's third solve waits,
    then e's: the first thread freed goes to e, under its share, though d's came first."""
    names = ("d1", "d2", "d3", "e")
    releases = {name: threading.Event() for name in names}
    started = {name: threading.Event() for name in names}
    order: list[str] = []

    def solver(name):
        def solve(rows, cancel):
            order.append(name)
            started[name].set()
            assert releases[name].wait(30)
            return Result(2 * rows, rows.sum(axis=1), rows.shape[1])

        return solve

    async def main():
        batcher = Batcher(max_wait_ms=0, threads=2)
        tasks = {}
        try:
            for name in names:
                key = (name[0], name)  # one key each; the dictionary is its first letter
                tasks[name] = asyncio.create_task(batcher.submit(key, rows_of(1, 0), solver(name)))
                if name in ("d1", "d2"):
                    await asyncio.to_thread(started[name].wait, 30)
                else:
                    await asyncio.sleep(0.05)  # d3 waits, then e
            assert order == ["d1", "d2"]
            releases["d1"].set()
            await tasks["d1"]
            assert await asyncio.to_thread(started["e"].wait, 30)
            assert not started["d3"].is_set()
            for name in names:
                releases[name].set()
            await asyncio.gather(*tasks.values())
        finally:
            for release in releases.values():
                release.set()
            await batcher.close()

    run(main())
    assert order == ["d1", "d2", "e", "d3"]
