"""Prometheus metrics: one registry per app (not the global one) and a request middleware
(exposed by `GET /metrics`, in `routes/metrics.py`).

Series (base units, `unfold_` prefix, `_total` on counters):
- `unfold_requests_total{route,method,status}`: answered HTTP requests; `route` is the route
  template (``/v1/dictionaries/{ref}/unfold``), or ``unmatched`` when no route matched
  (including requests the middleware refused before routing: 401, 413 by Content-Length).
- `unfold_request_duration_seconds{route}`: time to the end of the response body.
- `unfold_batch_size`: rows per solver call (merged batches and lone requests alike).
- `unfold_rows_total`: rows solved.
- `unfold_solver_seconds`: time per solver call (including any compiling it waited for).
- `unfold_compile_seconds{method,cause}`: time per program compiled (`service.programs`),
  `cause` "request" (a request needed it) or "warm-up"; its `_count` counts compilations.
- `unfold_queue_depth{dictionary}`: rows waiting or being solved per dictionary.
- `unfold_memory_budget_bytes`, `unfold_memory_reserved_bytes{kind}`: the memory budget and
  what dictionaries and requests in flight hold of it (`service.memory`).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

UNMATCHED = "unmatched"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
COMPILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class Metrics:
    """The service's metrics, in their own `CollectorRegistry`."""

    def __init__(self):
        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter(
            "unfold_requests", "HTTP requests answered.", ["route", "method", "status"], **kw
        )
        self.request_duration = Histogram(
            "unfold_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.batch_size = Histogram(
            "unfold_batch_size", "Activation rows per solver call.", buckets=BATCH_BUCKETS, **kw
        )
        self.rows = Counter("unfold_rows", "Activation rows solved.", **kw)
        self.solver_seconds = Histogram(
            "unfold_solver_seconds", "Time per solver call.", buckets=LATENCY_BUCKETS, **kw
        )
        self.cancelled_solves = Counter(
            "unfold_cancelled_solves",
            "Solver calls stopped because every request in them had stopped waiting.",
            **kw,
        )
        self.compile_seconds = Histogram(
            "unfold_compile_seconds",
            "Time to compile a solver program (its first run), by method and cause.",
            ["method", "cause"],
            buckets=COMPILE_BUCKETS,
            **kw,
        )
        self.programs = Gauge(
            "unfold_programs", "Compiled solver programs held (one per call size).", **kw
        )
        self.program_families_evicted = Counter(
            "unfold_program_families_evicted",
            "Program families (dictionary shape and static settings) freed, least recently "
            "used first, to stay within UNFOLD_MAX_PROGRAM_FAMILIES.",
            **kw,
        )
        self.queue_depth = Gauge(
            "unfold_queue_depth",
            "Activation rows waiting or being solved, per dictionary.",
            ["dictionary"],
            **kw,
        )
        self.memory_budget = Gauge(
            "unfold_memory_budget_bytes", "The server's memory budget.", **kw
        )
        self.memory_reserved = Gauge(
            "unfold_memory_reserved_bytes",
            "Memory reserved against the budget, by dictionaries and by requests in flight.",
            ["kind"],
            **kw,
        )

    def watch_memory(self, budget) -> None:
        """Report `budget` (a `service.memory.MemoryBudget`) when scraped."""
        self.memory_budget.set_function(lambda: budget.total)
        for kind in budget.used:
            self.memory_reserved.labels(kind=kind).set_function(lambda kind=kind: budget.used[kind])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting and timing every HTTP request by route template."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        self._series: dict[tuple[str, str, int], tuple] = {}  # (counter, histogram) by labels

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            key = (template, scope["method"], status)
            series = self._series.get(key)
            if series is None:  # labelled children, looked up once per label combination
                series = self._series[key] = (
                    self.metrics.requests.labels(
                        route=template, method=scope["method"], status=str(status)
                    ),
                    self.metrics.request_duration.labels(route=template),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - started)
