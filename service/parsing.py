"""Where request bodies are parsed, so that parsing never blocks the event loop.

Small bodies are parsed in place. Larger binary bodies (`.npy`, compressed data) are parsed on
a worker thread: numpy's copies and zlib release the interpreter while they work. Larger JSON
bodies are parsed in a child process: a JSON parser holds the interpreter for the whole
document (orjson: about 0.6 s for 58 MiB on one core, several seconds on a busy machine), and
building millions of Python numbers costs gigabytes that the server would otherwise keep. The
child sends back what the parse function returns (numpy arrays, validated parameters) or the
client error it raised.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from .errors import NotReady

OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are parsed off the event loop (thread or child process)."""


async def off_loop(size: int, function, *args):
    """`function(*args)`, on a worker thread when `size` (bytes to parse) passes
    `OFFLOAD_BYTES`. For parsers that release the interpreter while they work (numpy, zlib);
    JSON parsers go to `parse_json`."""
    if size > OFFLOAD_BYTES:
        return await run_in_threadpool(function, *args)
    return function(*args)


async def parse_json(request: Request, size: int, function, *args):
    """`function(*args)`, in the app's `JsonParser` child process when `size` (bytes of JSON)
    passes `OFFLOAD_BYTES`. `function` must be importable by name (a module-level function)
    and its arguments and result picklable."""
    if size > OFFLOAD_BYTES:
        return await request.app.state.json_parser.run(function, *args)
    return function(*args)


class JsonParser:
    """A child process (started on first use, started again if it dies) that runs parse
    functions. `processes` children parse that many large bodies at once; more wait in turn."""

    def __init__(self, processes: int = 1):
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # spawn, not fork: the server runs threads (JAX's among them) that a forked
                # child would inherit mid-operation.
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._executor

    async def run(self, function, *args):
        pool = self._pool()
        try:
            return await asyncio.wrap_future(pool.submit(function, *args))
        except BrokenProcessPool:
            with self._lock:
                if self._executor is pool:
                    self._executor = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise NotReady(
                "the process parsing large JSON bodies stopped (out of memory?) while it held "
                "this request; retry, or send the activations as .npy or safetensors",
                code="parser_unavailable",
            ) from None

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
