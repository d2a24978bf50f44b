"""What this server is: version, compute backend and the settings that shape its answers."""

from __future__ import annotations

import jax
from fastapi import APIRouter

from .. import __version__
from ..dependencies import RegistryDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["info"])

EXAMPLE = {
    "version": "0.1.0",
    "jax": {"version": "0.10.2", "backend": "cpu", "devices": ["cpu:0"]},
    "batching": {"enabled": True, "max_batch_size": 256, "max_wait_ms": 2.0},
    "limits": {
        "max_rows": 65536,
        "max_body_bytes": 67108864,
        "max_dictionary_bytes": 42949672960,
        "max_dense_answer_bytes": 268435456,
        "max_queue_rows": 4096,
        "request_timeout_s": 60.0,
    },
    "memory": {
        "budget_bytes": 19327352832,
        "source": "80% of the 24.16 GB available on cpu at start-up",
        "dictionaries_bytes": 1049088,
        "requests_bytes": 0,
    },
    "gram_budget_bytes": None,
    "placement": {
        "devices": ["cpu:0"],
        "shard": "auto",
        "dictionaries": [
            {"name": "demo", "devices": ["cpu:0"], "shard": None, "device_bytes": 1049088}
        ],
    },
    "auth": False,
    "cors": False,
}


@router.get(
    "/info",
    summary="Version, JAX backend and devices, and the serving settings (never the API keys)",
    responses={200: {"content": {"application/json": {"example": EXAMPLE}}}},
)
async def info(settings: SettingsDep, registry: RegistryDep) -> dict:
    budget = registry.budget
    return {
        "version": __version__,
        "jax": {
            "version": jax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(device) for device in jax.devices()],
        },
        "batching": {
            "enabled": settings.batching,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
        },
        "limits": {
            "max_rows": settings.max_rows,
            "max_body_bytes": settings.max_body_bytes,
            "max_dictionary_bytes": settings.max_dictionary_bytes,
            "max_dense_answer_bytes": settings.max_dense_answer_bytes,
            "max_queue_rows": settings.max_queue_rows,
            "request_timeout_s": settings.request_timeout_s,
        },
        "memory": {
            "budget_bytes": budget.total,
            "source": budget.source,
            **{f"{kind}_bytes": used for kind, used in budget.used.items()},
        },
        "gram_budget_bytes": settings.gram_budget_bytes,
        "placement": {
            "devices": [str(device) for device in registry.devices],
            "shard": registry.shard,
            "dictionaries": [
                {
                    "name": entry.record.name,
                    "devices": [str(device) for device in entry.prepared.devices],
                    "shard": entry.prepared.shard,
                    "device_bytes": entry.prepared.device_bytes,
                }
                for entry in registry.entries()
            ],
        },
        "auth": bool(settings.api_keys),
        "cors": bool(settings.cors_origins),
    }
