"""Service configuration: pydantic-settings with the `UNFOLD_` environment prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; each is also an environment variable `UNFOLD_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="UNFOLD_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    data_dir: Path = Field(Path("data"), description="Where dictionaries are stored.")
    demo: bool = Field(True, description="Register the demo dictionary when the store is empty.")
    gram_budget_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Largest Gram matrix precomputed per dictionary; larger ones run matrix-free. "
            "Whether set or not, a Gram matrix takes at most half of the memory budget left "
            "besides its dictionary (memory_budget_bytes)."
        ),
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=0,
        description="Memory the server may hold in dictionaries (Gram matrices included) and "
        "in answers being computed; what would pass it is refused. Unset: 80% of the memory "
        "available on the device when the server starts (the host's available memory on a CPU).",
    )
    max_rows: int = Field(65536, ge=1, description="Most activation rows in one request.")
    log_level: str = Field("info", description="uvicorn log level.")

    # Serving: dynamic batching, limits, observability, access (service/batching.py, limits.py,
    # metrics.py, auth.py).
    batching: bool = Field(
        True, description="Merge concurrent unfold requests with the same dictionary and settings."
    )
    max_batch_size: int = Field(256, ge=1, description="Most rows in one merged solver call.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long a batch waits for requests to join it. 0: none; batches "
        "still form from the requests that arrive while the previous batch is solved. After "
        "it, a batch also waits while requests keep arriving (a burst already received), at "
        "most 50 ms more.",
    )
    max_queue_rows: int = Field(
        4096,
        ge=1,
        description="Rows waiting or being solved per dictionary and settings before new requests "
        "are refused with 429 (a request is always admitted when nothing is queued).",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A request waiting longer than this for its solve gets a 504."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 429 answers, in seconds.")
    solver_threads: int = Field(
        2, ge=1, description="Worker threads running solver calls (one at a time per batch key)."
    )
    solver_share: int | None = Field(
        None,
        ge=1,
        description="Most solver threads one dictionary, or one client alone in its batches, "
        "holds at once (default: all but one, at least one), so that others still find one.",
    )
    max_program_families: int = Field(
        64,
        ge=1,
        description="Compiled program families kept (a dictionary shape and a method's static "
        "settings: OMP's k and positive, the LASSO methods' positive and max_nonzero); the least "
        "recently used is freed first.",
    )
    warmup: bool = Field(
        True, description="Compile the common batch sizes for loaded dictionaries at start-up."
    )
    compilation_cache: bool = Field(
        True, description="Use JAX's persistent compilation cache under <data_dir>/jax-cache."
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Largest request body (but dictionary uploads); larger ones get a 413.",
    )
    max_dictionary_bytes: int = Field(
        40 * 1024**3,
        ge=0,
        description="Largest dictionary upload (.npy, safetensors or multipart; streamed to "
        "disk), enough for a 1M x 4096 float32 SAE with its encoder. JSON registrations stay "
        "within max_body_bytes.",
    )
    max_dense_answer_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Largest dense answer (rows x n_features float32, as .npy or JSON "
        "output=dense); larger ones get a 413 pointing to sparse output.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, every route but /healthz and /readyz "
        "needs `Authorization: Bearer <key>`.",
    )
    job_input_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated folders whose files and sub-folders jobs may read as "
        'input ({"input": PATH}); none: jobs take uploaded files only.',
    )
    max_jobs: int = Field(1, ge=1, description="Jobs running at once.")
    job_shard_rows: int = Field(
        16384, ge=1, description="Rows per shard of a job's codes (what a resume redoes)."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster that solves jobs (host:port, ray://host:port, auto, or 'local' "
        "for one started on this machine; needs the ray extra); none: jobs run in-process.",
    )
    max_job_input_bytes: int = Field(
        64 * 1024**3, ge=0, description="Largest job input upload (streamed to disk)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS ('*' for any); CORS is off if empty.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as plain text or one JSON object per line."
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (traces, HTTP metrics, error logs) to the "
        "providers the process configures. Off by default: /metrics and the logs cover the "
        "service, and the per-request check costs about 50 us of CPU on the unfold hot path.",
    )
    warmup_used_settings: int = Field(
        4,
        ge=0,
        description="Besides the defaults, start-up warms this many of the solver settings used "
        "most with each dictionary (k, method; recorded in <data_dir>/warmup.json), after "
        "/readyz turns ready. 0: only the defaults.",
    )
    warmup_used_days: float = Field(
        7.0, gt=0, description="Settings count as used for warm-up if used within this many days."
    )
    reports: bool = Field(
        True,
        description="Compute each dictionary's report (GET /v1/dictionaries/{ref}/report) in the "
        "background after registration and at start-up; false: only when first asked for.",
    )
    report_max_features: int = Field(
        4096,
        ge=2,
        description="Larger dictionaries are analysed on a sample of this many features.",
    )
    report_curve_seconds: float = Field(
        120.0, gt=0, description="Time budget of each recovery curve of a report (said when spent)."
    )

    devices: int | Literal["all"] = Field(
        "all",
        description="How many of the default backend's local devices hold dictionaries (the "
        "first that many), or 'all'.",
    )
    shard: Literal["auto", "rows", "features"] = Field(
        "auto",
        description="On several devices, how a dictionary is split: 'rows' (a replica on each, "
        "batches split), 'features' (each device holds a block of its features), or 'auto' "
        "(features when the prepared dictionary would not fit one device's memory budget, "
        "else rows).",
    )

    @field_validator("devices")
    @classmethod
    def _device_count(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("devices must be at least 1, or 'all'")
        return value

    @field_validator("api_keys", "cors_origins", "job_input_dirs", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
