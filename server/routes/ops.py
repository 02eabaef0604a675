"""Operations at the root: liveness, Prometheus exposition and the dashboard page."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import MetricsDep, SettingsDep, StoreDep
from server.schemas import ErrorResponse, Healthz

router = APIRouter(tags=["ops"])


@router.get("/healthz", responses={503: {"model": ErrorResponse, "description": "Database down"}})
def read_healthz(store: StoreDep) -> Healthz:
    """Liveness and database reachability."""
    try:
        store.ping()
    except Exception as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database unreachable: {e}") from e
    return Healthz(status="ok", db="ok")


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def read_metrics(metrics: MetricsDep) -> Response:
    """Latest stats of every run as gauges (labels run, run_name, site, layer) and the server's
    ingest counters."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, responses={
    200: {"description": "The dashboard page", "content": {"text/html": {"schema": {"type": "string"}}}},
    404: {"model": ErrorResponse, "description": "No page at dashboard_path"}})
def read_dashboard(settings: SettingsDep) -> HTMLResponse:
    """The live page (the file at ``dashboard_path``)."""
    try:
        return HTMLResponse(settings.dashboard_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no dashboard page at {settings.dashboard_path} (dashboard_path)") from e
