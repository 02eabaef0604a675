"""The published contract (every error code and the SSE stream documented) and the live-event
broker's bounded, drop-oldest queues."""

from __future__ import annotations

import asyncio
import threading

from server.events import Broker


def test_openapi_documents_errors_and_the_event_stream(client):
    spec = client.get("/openapi.json").json()
    ops = spec["paths"]
    assert set(ops["/api/v1/runs/{run_id}/stats"]["post"]["responses"]) == {
        "200", "400", "401", "403", "404", "413", "422"}
    for path in ("/api/v1/runs/{run_id}/events", "/api/v1/events"):
        assert "text/event-stream" in ops[path]["get"]["responses"]["200"]["content"]
    err = ops["/api/v1/runs/{run_id}"]["get"]["responses"]["404"]["content"]["application/json"]
    assert err["schema"]["$ref"].endswith("/ErrorResponse")
    names = set(spec["components"]["schemas"])
    assert {"RunCreate", "RunPublic", "RunsPublic", "StatsBatch", "IngestResult", "AlertPublic",
            "Thresholds", "ErrorResponse"} <= names
    assert "HTTPValidationError" not in names  # 422 is documented as our own {"detail": str}


def test_cors_only_when_configured(tmp_path):
    from fastapi.testclient import TestClient

    from server import Settings, create_app

    s = Settings(db_url=f"sqlite:///{tmp_path}/c.db", cors_origins=["http://dash.local"])
    with TestClient(create_app(s)) as c:
        r = c.get("/api/v1/runs", headers={"Origin": "http://dash.local"})
        assert r.headers["access-control-allow-origin"] == "http://dash.local"
        r = c.get("/api/v1/runs", headers={"Origin": "http://evil.local"})
        assert "access-control-allow-origin" not in r.headers


def test_slow_subscriber_loses_its_oldest_events_and_blocks_nobody():
    broker = Broker(queue_size=3)

    async def main() -> tuple[list[int], int, int]:
        mine = broker.subscribe(run_id=7)
        everyone = broker.subscribe(run_id=None)

        def publisher() -> None:  # ingest handlers publish from worker threads
            for i in range(5):
                broker.publish("stats", {"i": i}, run_id=7)
            broker.publish("stats", {"i": 99}, run_id=8)

        t = threading.Thread(target=publisher)
        t.start()
        t.join()
        await asyncio.sleep(0.05)  # let the loop run the handed-over puts
        got = [mine.queue.get_nowait()[1]["i"] for _ in range(mine.queue.qsize())]
        broker.unsubscribe(mine)
        broker.unsubscribe(everyone)
        return got, mine.dropped, everyone.dropped

    got, dropped, dropped_all = asyncio.run(main())
    assert got == [2, 3, 4] and dropped == 2 and dropped_all == 3
    assert broker.subscribers == 0
