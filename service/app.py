"""The FastAPI application, built by `create_app(settings)`."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

from fastapi import FastAPI

from . import __version__
from .demo import DEMO_NAME, demo_dictionary
from .errors import install_error_handlers
from .registry import Registry
from .routes import dictionaries, health
from .settings import Settings
from .store import DictionaryStore

log = logging.getLogger(__name__)


def start_loading(registry: Registry, settings: Settings) -> threading.Thread:
    """Load stored dictionaries in the background (readiness waits for it), then seed the demo."""

    def load():
        try:
            if registry.load_stored() == 0 and settings.demo:
                directions, labels = demo_dictionary()
                registry.register(
                    DEMO_NAME,
                    directions,
                    labels=labels,
                    metadata={"description": "standard basis + Hadamard basis in 16 dimensions"},
                )
                log.info("registered the demo dictionary %r", DEMO_NAME)
        except Exception:
            log.exception("loading dictionaries failed")
            raise

    thread = threading.Thread(target=load, name="unfold-loader", daemon=True)
    thread.start()
    return thread


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own store and registry under `settings.data_dir`."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loader = start_loading(app.state.registry, settings)
        yield

    app = FastAPI(
        title="Unfold",
        version=__version__,
        summary="Compressed-sensing unfolding of superposed neural-network activations.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = Registry(
        DictionaryStore(settings.data_dir), gram_budget_bytes=settings.gram_budget_bytes
    )
    install_error_handlers(app)

    app.include_router(health.router)
    app.include_router(dictionaries.router)
    app.openapi = functools.partial(openapi_with_body_definitions, app)
    return app


def openapi_with_body_definitions(app: FastAPI) -> dict:
    """The OpenAPI document, with the schemas of hand-parsed bodies (see
    `schemas.openapi_body`) moved into its components."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema["paths"].values():
            for operation in operations.values():
                components.update(operation.pop("x-definitions", {}))
        app.openapi_schema = schema
    return app.openapi_schema
