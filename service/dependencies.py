"""Request-scoped access to the app's state, as `Annotated` dependency aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .batching import Batcher
from .registry import Registry
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]
