"""Alerts: a run's health verdict, its alerts by state, acknowledging and silencing them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, status

from server.deps import RunDep, RunWriterDep, StoreDep
from server.routes import BODY, errors
from server.schemas import MAX_ID, AlertPublic, AlertsPublic, HealthPublic, SilenceRequest

router = APIRouter(prefix="/runs/{run_id}", tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, le=MAX_ID, description="Alert id, from GET .../alerts")]
StateFilter = Literal["firing", "pending", "resolved", "inactive", "active", "all"]
_STATES: dict[str, list[str] | None] = {
    "firing": ["firing"], "pending": ["pending"], "resolved": ["resolved"],
    "inactive": ["inactive"], "active": ["pending", "firing"], "all": None,
}


@router.get("/health", responses=errors(404, 422))
def read_health(run: RunDep, store: StoreDep) -> HealthPublic:
    """The run's verdict (its detector's, as of the last batch) and its firing alerts."""
    firing = store.alerts(run.id, ["firing"])
    return HealthPublic(run_id=run.id, verdict=run.verdict, firing=[AlertPublic(**a) for a in firing])


@router.get("/alerts", responses=errors(404, 422))
def read_alerts(run: RunDep, store: StoreDep, state: StateFilter = "all") -> AlertsPublic:
    """The run's alerts: ``active`` is pending + firing; ``inactive`` ones went pending and
    cleared before firing."""
    rows = store.alerts(run.id, _STATES[state])
    return AlertsPublic(data=[AlertPublic(**a) for a in rows], count=len(rows))


def _found(alert: dict | None, run_id: int, alert_id: int) -> AlertPublic:
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown alert {alert_id} of run {run_id}")
    return AlertPublic(**alert)


@router.post("/alerts/{alert_id}/ack", responses=errors(401, 403, 404, *BODY))
def ack_alert(run: RunWriterDep, alert_id: AlertId, store: StoreDep) -> AlertPublic:
    """Acknowledge an alert (until its next episode: a re-fire clears the ack)."""
    return _found(store.ack_alert(run.id, alert_id), run.id, alert_id)


@router.post("/alerts/{alert_id}/silence", responses=errors(401, 403, 404, *BODY))
def silence_alert(run: RunWriterDep, alert_id: AlertId, body: SilenceRequest,
                  store: StoreDep) -> AlertPublic:
    """Keep an alert's transitions off the webhooks for ``minutes``; it is still stored and
    streamed."""
    return _found(store.silence_alert(run.id, alert_id, body.minutes), run.id, alert_id)
