"""One memory budget for the whole server.

Dictionaries (their device arrays, Gram matrix included) and the requests being answered
reserve their bytes here before they are made. A dictionary that would pass the budget is
refused (its Gram matrix, if any, is left out first: `Registry`); a request that could never
fit is refused, one that cannot fit now is told to retry. The default budget is a share of
the memory available on the dictionaries' device (the host's, on a CPU) when the server starts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax

import solvers

from .errors import Overloaded, TooLarge

DEFAULT_FRACTION = 0.8
"""The default budget's share of the memory available at start-up: the rest is left to the
process's own working memory (programs, buffers of solves, HTTP bodies) and to the machine."""
KINDS = ("dictionaries", "requests")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class MemoryBudget:
    """Bytes reserved by kind ("dictionaries", "requests") against `total`. Thread-safe."""

    def __init__(self, total: int, source: str):
        self.total = int(total)
        self.source = source
        self.used = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, budget_bytes: int | None) -> MemoryBudget:
        if budget_bytes is not None:
            return cls(budget_bytes, "UNFOLD_MEMORY_BUDGET_BYTES")
        device = jax.devices()[0]
        available = solvers.available_bytes(device)
        return cls(
            int(available * DEFAULT_FRACTION),
            f"{DEFAULT_FRACTION:.0%} of the {gb(available)} available on {device.platform} at "
            "start-up",
        )

    @property
    def free(self) -> int:
        with self._lock:
            return self.total - sum(self.used.values())

    def reserve(self, kind: str, nbytes: int) -> bool:
        """Reserve `nbytes` if they fit; False (nothing reserved) if not."""
        with self._lock:
            if nbytes > self.total - sum(self.used.values()):
                return False
            self.used[kind] += nbytes
            return True

    def release(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.used[kind] -= nbytes

    def reserve_dictionary(self, nbytes: int, what: str) -> None:
        """Reserve a dictionary's bytes, or refuse it (413 `over_memory_budget`)."""
        if not self.reserve("dictionaries", nbytes):
            raise TooLarge(
                f"{what} needs {gb(nbytes)} of memory, and {gb(self.free)} of the server's "
                f"{gb(self.total)} budget ({self.source}) is free; delete a dictionary, or raise "
                "UNFOLD_MEMORY_BUDGET_BYTES if the machine has the memory",
                code="over_memory_budget",
            )

    @contextlib.contextmanager
    def hold_request(self, nbytes: int, retry_after: int) -> Iterator[None]:
        """Reserve a request's working bytes while it is answered: 413 if it could not fit even
        with no other request in flight, 429 (retry) if it cannot fit now."""
        if not self.reserve("requests", nbytes):
            free_when_idle = self.total - self.used["dictionaries"]
            if nbytes > free_when_idle:
                raise TooLarge(
                    f"answering this request takes about {gb(nbytes)} of memory, more than the "
                    f"{gb(free_when_idle)} the server's budget leaves besides its dictionaries; "
                    "send fewer rows per request",
                    code="over_memory_budget",
                )
            raise Overloaded(
                f"the requests in flight hold the server's memory budget; retry after "
                f"{retry_after} s",
                retry_after=retry_after,
                code="memory_busy",
            )
        try:
            yield
        finally:
            self.release("requests", nbytes)


def request_bytes(
    rows: int, d_model: int, n_features: int, *, dense: bool, dense_limit: int, advice: str
) -> int:
    """Memory answering `rows` activations holds, estimated: the activations, the solver's
    scores over every feature for a block of rows, and the answer (dense: rows x n_features
    float32, refused with 413 `answer_too_large` over `dense_limit`; `advice` says what to ask
    for instead)."""
    dense_bytes = rows * n_features * 4
    if dense and dense_bytes > dense_limit:
        raise TooLarge(
            f"a dense answer of {rows} rows x {n_features} features is {gb(dense_bytes)}, over "
            f"the limit of {gb(dense_limit)} (UNFOLD_MAX_DENSE_ANSWER_BYTES); {advice}, or "
            "send fewer rows per request",
            code="answer_too_large",
        )
    scores = min(rows, solvers.DEFAULT_BLOCK_ROWS) * n_features * 4
    return rows * d_model * 4 + scores + (dense_bytes if dense else 0)
