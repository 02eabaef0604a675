"""Alert rows: what the ingest transaction writes for each detector transition (the alert's
current state, the transition log, the webhook outbox) and the alert reads. Functions of an open
connection, so they run inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from server import tables as T
from server._ingest import slack_text
from server.rules import AlertState

_NEW_EPISODE = {AlertState.INACTIVE.value, AlertState.RESOLVED.value}


@dataclass
class _Seen:
    id: int
    silenced_until: datetime | None


def store_transitions(conn: sa.Connection, run: sa.Row[Any], transitions: list[Any], now: datetime,
                      webhook_urls: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Upsert each transition's alert row, log the transition, queue its webhook deliveries.
    Returns the transition dicts (with ``alert_id``) and how many deliveries are pending."""
    if not transitions:
        return [], 0
    a = T.alerts.c
    pending = 0
    existing = {(r.rule, r.site, r.layer): r for r in conn.execute(
        sa.select(a.id, a.rule, a.site, a.layer, a.silenced_until)
        .where(a.run_id == run.id))}
    out = []
    for tr in transitions:
        t = tr.to_dict()
        ident = (t["rule"], t["site"], t["layer"])
        row = existing.get(ident)
        values = {"severity": t["severity"], "state": t["state"], "since_step": t["step"],
                  "last_step": t["step"], "value": t["value"], "threshold": t["threshold"],
                  "message": t["message"], "updated": now}
        if row is None:
            alert_id = int(conn.execute(sa.insert(T.alerts).values(
                run_id=run.id, rule=t["rule"], site=t["site"], layer=t["layer"],
                acknowledged=False, silenced_until=None, **values)).inserted_primary_key[0])
            silenced_until = None
        else:
            alert_id, silenced_until = int(row.id), row.silenced_until
            if t["prev"] in _NEW_EPISODE:
                values["acknowledged"] = False  # a new episode needs a new ack
            conn.execute(sa.update(T.alerts).where(a.id == alert_id).values(**values))
        existing[ident] = _Seen(alert_id, silenced_until)
        t["alert_id"] = alert_id
        event_id = int(conn.execute(sa.insert(T.alert_events).values(
            alert_id=alert_id, run_id=run.id, created=now, transition=t)).inserted_primary_key[0])
        if t["state"] in ("firing", "resolved") and webhook_urls:
            silenced = silenced_until is not None and silenced_until > now
            payload = {"text": slack_text(run.name, run.id, t)}
            conn.execute(sa.insert(T.webhook_deliveries), [
                {"event_id": event_id, "url": url, "payload": payload,
                 "status": "silenced" if silenced else "pending", "attempts": 0,
                 "next_attempt": now, "last_error": None, "updated": now}
                for url in webhook_urls])
            pending += 0 if silenced else len(webhook_urls)
        out.append(t)
    return out, pending


def select_alerts(conn: sa.Connection, run_id: int, states: Sequence[str] | None,
                  alert_id: int | None = None) -> list[dict[str, Any]]:
    a = T.alerts.c
    q = sa.select(T.alerts).where(a.run_id == run_id)
    if states is not None:
        q = q.where(a.state.in_(states))
    if alert_id is not None:
        q = q.where(a.id == alert_id)
    return [dict(r._mapping) for r in conn.execute(q.order_by(a.id))]
