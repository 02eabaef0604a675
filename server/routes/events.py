"""Live events over SSE: ``stats`` (a batch landed: step and headline numbers) and ``alert``
(a transition, as stored); a ``ready`` event first, once the subscription is in place."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.deps import BrokerDep, RunDep, SettingsDep
from server.events import Broker, Subscriber
from server.routes import errors

router = APIRouter(tags=["events"])

_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An endless ``text/event-stream``: events ``ready``, ``stats``, ``alert``; "
                       "``data`` is one JSON object",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}


async def _stream(broker: Broker, sub: Subscriber) -> AsyncIterator[ServerSentEvent]:
    try:
        yield ServerSentEvent(data=json.dumps({"run_id": sub.run_id}), event="ready")
        n = 0
        while True:
            event, data = await sub.queue.get()
            n += 1
            yield ServerSentEvent(data=json.dumps(data, allow_nan=False), event=event, id=str(n))
    finally:
        broker.unsubscribe(sub)


@router.get("/runs/{run_id}/events", response_class=EventSourceResponse,
            responses={**_SSE_DOC, **errors(404, 422)})
async def stream_run_events(run: RunDep, broker: BrokerDep, settings: SettingsDep) -> EventSourceResponse:
    """Live events of one run."""
    return EventSourceResponse(_stream(broker, broker.subscribe(run.id)), ping=settings.sse_ping_s,
                              send_timeout=30)


@router.get("/events", response_class=EventSourceResponse, responses=_SSE_DOC)
async def stream_events(broker: BrokerDep, settings: SettingsDep) -> EventSourceResponse:
    """Live events of every run."""
    return EventSourceResponse(_stream(broker, broker.subscribe(None)), ping=settings.sse_ping_s,
                              send_timeout=30)
