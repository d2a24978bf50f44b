"""The FastAPI application, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from . import __version__
from .auth import PUBLIC_PATHS, APIKeyMiddleware
from .background import BackgroundWork
from .batching import Batcher, enable_compilation_cache, settle_heap, warmup, warmup_used
from .demo import demo_registrations
from .errors import install_error_handlers
from .jobs import Jobs
from .limits import BodyLimitMiddleware
from .logs import configure_logging
from .memory import MemoryBudget
from .metrics import Metrics, MetricsMiddleware
from .parsing import JsonParser
from .programs import Programs
from .registry import Registry
from .reports import Reports, ReportSettings
from .routes import dictionaries, health, info, jobs, metrics, oip, reports
from .routes._direct import DirectRoute, DirectRoutes
from .settings import Settings
from .store import DictionaryStore

log = logging.getLogger(__name__)

SHUTDOWN_WAIT_SECONDS = 120.0
"""Shutdown waits this long for background threads (loading, warm-up) to stop."""


def start_loading(
    registry: Registry,
    settings: Settings,
    background: BackgroundWork,
    programs: Programs,
    reports: Reports,
) -> threading.Thread:
    """In the background: load and verify the stored dictionaries, seed the demo on an empty
    store (then `registry.loaded`: unknown names are 404), load the record of settings used,
    compile the default programs; then the registry, hence `/readyz`, is ready. Then compile
    the programs of the settings used most (requests that need one meanwhile share its
    compilation: `Programs.ensure`). Reports missing from stored dictionaries are queued once
    the registry is ready (`settings.reports`)."""

    def load():
        try:
            if registry.load_stored() == 0 and settings.demo:
                for registration in demo_registrations():
                    registry.register(**registration)
                    log.info("registered the demo dictionary %r", registration["name"])
            registry.loaded.set()  # from now on an unknown name is 404, not 503
            programs.usage.load(registry.entries())
            if settings.warmup:  # compile the default method's batch buckets ahead of requests
                for entry in registry.entries():
                    warmup(
                        entry, settings.max_batch_size, stop=background.stopping, programs=programs
                    )
            settle_heap()
            registry.ready.set()
            if settings.reports:
                for entry in registry.entries():
                    reports.schedule(entry)
            if settings.warmup and settings.warmup_used_settings:
                for entry in registry.entries():
                    warmup_used(
                        entry,
                        programs,
                        settings.max_batch_size,
                        limit=settings.warmup_used_settings,
                        max_age_s=settings.warmup_used_days * 86400,
                        stop=background.stopping,
                    )
                settle_heap()
        except Exception:
            log.exception("loading dictionaries failed")
            raise

    return background.start("unfold-loader", load)


ROUTERS = (
    health.router,
    dictionaries.router,
    reports.router,
    info.router,
    metrics.router,
    oip.router,
    jobs.router,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own store and registry under `settings.data_dir`."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_format)
        if settings.compilation_cache:
            enable_compilation_cache(settings.data_dir / "jax-cache")
        if app.state.batcher.closed:  # the app is started again
            app.state.batcher = Batcher.from_settings(settings, app.state.metrics)
        if app.state.background.stopping.is_set():  # likewise
            app.state.background = BackgroundWork()
            app.state.reports.background = app.state.background
        programs = app.state.batcher.programs
        app.state.loader = start_loading(
            app.state.registry, settings, app.state.background, programs, app.state.reports
        )
        app.state.background.start(  # saves the settings used now and then, and at shutdown
            "unfold-usage", programs.usage.keep_saved, app.state.background.stopping
        )
        app.state.jobs.batcher = app.state.batcher
        app.state.jobs.start(app.state.background)
        yield
        app.state.jobs.close()
        await app.state.batcher.close()
        app.state.json_parser.close()
        # At most one compilation to wait for (warm-up checks `stopping` between them).
        await asyncio.to_thread(app.state.background.stop, SHUTDOWN_WAIT_SECONDS)

    # Swagger UI and ReDoc assets come from the fastapi-offline package, not a CDN: /docs works
    # where the browser reaches only this server.
    app = FastAPIOffline(
        title="Unfold",
        version=__version__,
        summary="Compressed-sensing unfolding of superposed neural-network activations.",
        lifespan=lifespan,
        telemetry=dict.fromkeys(("tracing", "metrics", "logs"), settings.opentelemetry),
    )
    app.state.settings = settings
    app.state.registry = Registry(
        DictionaryStore(settings.data_dir),
        gram_budget_bytes=settings.gram_budget_bytes,
        budget=MemoryBudget.from_settings(settings.memory_budget_bytes),
        devices=settings.devices,
        shard=settings.shard,
    )
    app.state.metrics = Metrics()
    app.state.metrics.watch_memory(app.state.registry.budget)
    app.state.batcher = Batcher.from_settings(settings, app.state.metrics)
    app.state.background = BackgroundWork()
    app.state.json_parser = JsonParser()
    app.state.jobs = Jobs(
        settings.data_dir,
        app.state.registry,
        app.state.batcher,
        settings.max_jobs,
        settings.job_shard_rows,
        settings.ray_address,
    )
    app.state.reports = Reports(
        app.state.registry.store.root,
        app.state.background,
        ReportSettings(
            max_features=settings.report_max_features, curve_seconds=settings.report_curve_seconds
        ),
    )
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_middleware(app, settings)
    app.openapi = functools.partial(openapi_with_body_definitions, app)
    return app


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """From inner to outer: direct routes (the hot path, ahead of the router), body-size limit,
    API keys, request metrics, CORS (outermost, so preflight requests are answered without
    credentials)."""
    app.add_middleware(
        DirectRoutes,
        routes=[r for router in ROUTERS for r in router.routes if isinstance(r, DirectRoute)],
        exception_handlers=app.exception_handlers,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_dictionary_bytes=settings.max_dictionary_bytes,
        max_job_input_bytes=settings.max_job_input_bytes,
    )
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )


def openapi_with_body_definitions(app: FastAPI) -> dict:
    """The OpenAPI document, with the schemas of hand-parsed bodies (see
    `schemas.openapi_body`) moved into its components, and with API keys configured, the
    bearer scheme `APIKeyMiddleware` enforces (every operation but the health probes)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        keys = bool(app.state.settings.api_keys)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                schemas.update(operation.pop("x-definitions", {}))
                if keys and path in PUBLIC_PATHS:
                    operation["security"] = []  # the health probes need no key
                elif keys:
                    operation.setdefault("responses", {}).setdefault("401", UNAUTHORIZED)
        if keys:
            components["securitySchemes"] = {BEARER: BEARER_SCHEME}
            schema["security"] = [{BEARER: []}]  # every other operation
        app.openapi_schema = schema
    return app.openapi_schema


UNAUTHORIZED = {"description": "No API key, or a wrong one (`WWW-Authenticate: Bearer`)"}
BEARER = "apiKey"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "One of the server's API keys (UNFOLD_API_KEYS): `Authorization: Bearer <key>`.",
}
