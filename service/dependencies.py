"""Request-scoped access to the app's state, as `Annotated` dependency aliases.

The getters are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread
pool, which would cost every request one thread hop per dependency (three on the unfold route)
for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .batching import Batcher
from .registry import Registry
from .settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
