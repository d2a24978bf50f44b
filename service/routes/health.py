"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import RegistryDep
from ..errors import error_body
from ..responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every stored dictionary is loaded",
    responses={503: {"description": "Still loading dictionaries"}},
)
async def readyz(registry: RegistryDep):
    if not registry.ready.is_set():
        return JSONResponse(
            error_body("not_ready", "dictionaries are still loading"),
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return {"status": "ready", "dictionaries": len(registry.entries())}
