"""A dictionary's report: JSON for programs, one self-contained HTML page for people."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from .. import report_page
from ..dependencies import RegistryDep
from ..errors import UnfoldError
from ..registry import Entry
from ..responses import JSONResponse
from ..schemas import DictionaryReport, ReportPending

router = APIRouter(prefix="/v1/dictionaries", tags=["dictionaries"])

RETRY_AFTER_S = 5


class ReportFailed(UnfoldError):
    status_code = 500
    code = "report_failed"


async def report_of(request: Request, entry: Entry) -> tuple[dict, dict | None]:
    """(state, report or None); a report never asked for is scheduled now."""
    reports = request.app.state.reports
    state, report = await run_in_threadpool(reports.get, entry)
    if state["state"] == "absent":
        await run_in_threadpool(reports.schedule, entry)
        state, report = await run_in_threadpool(reports.get, entry)
    if state["state"] == "failed":
        raise ReportFailed(f"the report of {entry.record.name!r} failed: {state.get('error')}")
    return state, report


@router.get(
    "/{ref}/report",
    summary="How far sparse recovery over this dictionary can be trusted",
    response_model=DictionaryReport,
    responses={
        202: {"description": "Being computed: retry after Retry-After", "model": ReportPending},
        404: {"description": "No dictionary with that id or name"},
        500: {"description": "Computing the report failed"},
    },
)
async def get_report(ref: str, request: Request, registry: RegistryDep) -> Response:
    """Norms, coherence against the Welch bound with the most similar pairs, and empirical
    recovery curves per method with the recommended k (README: Reports)."""
    entry = registry.get(ref)
    state, report = await report_of(request, entry)
    if report is None:
        message = f"the report is {state['state']}; retry in {RETRY_AFTER_S} s"
        return JSONResponse(
            {"state": state["state"], "message": message},
            status_code=202,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return JSONResponse({"state": "ready", **report})


@router.get(
    "/{ref}/report.html",
    summary="The report as one self-contained page, with a playground",
    response_class=HTMLResponse,
    responses={404: {"description": "No dictionary with that id or name"}},
)
async def get_report_page(ref: str, request: Request, registry: RegistryDep) -> Response:
    entry = registry.get(ref)
    state, report = await report_of(request, entry)
    page = report_page.render(entry, state["state"], report, refresh_s=RETRY_AFTER_S)
    return HTMLResponse(page)
