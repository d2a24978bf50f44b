"""Service configuration: pydantic-settings with the `UNFOLD_` environment prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import solvers


class Settings(BaseSettings):
    """Every knob of the service; each is also an environment variable `UNFOLD_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="UNFOLD_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    data_dir: Path = Field(Path("data"), description="Where dictionaries are stored.")
    demo: bool = Field(True, description="Register the demo dictionary when the store is empty.")
    gram_budget_bytes: int = Field(
        solvers.DEFAULT_GRAM_BUDGET_BYTES,
        ge=0,
        description="Largest Gram matrix precomputed per dictionary; larger ones run matrix-free.",
    )
    max_rows: int = Field(65536, ge=1, description="Most activation rows in one request.")
    log_level: str = Field("info", description="uvicorn log level.")
