"""Webhooks: Slack-style JSON on firing/resolved, retried with backoff, silenced alerts skipped,
and a dead endpoint never costs the alert."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from server import Settings, create_app
from server.webhooks import redact
from tests.server.conftest import Run, batch
from tests.server.live import wait_for


class Receiver:
    """A real HTTP endpoint on 127.0.0.1 that records POSTed JSON; fails the first ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.fail, self.calls, self.bodies = fail, 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.calls += 1
                ok = outer.calls > outer.fail
                if ok:
                    outer.bodies.append(json.loads(body))
                self.send_response(200 if ok else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail=2)
    yield r
    r.close()


def app_with(tmp_path, urls: list[str]) -> TestClient:
    return TestClient(create_app(Settings(
        db_url=f"sqlite:///{tmp_path}/w.db", webhook_urls=urls, webhook_backoff_s=0.05,
        webhook_max_attempts=4, webhook_timeout_s=2)))


def test_firing_and_resolved_reach_the_webhook_after_retries(tmp_path, receiver):
    with app_with(tmp_path, [receiver.url]) as c:
        run = Run(c, "hooked")
        run.post(batch("a", [1], nonfinite__attn__0=1.0))
        run.post(batch("b", [2, 3]))
        assert wait_for(lambda: len(receiver.bodies) == 2)
        store = c.app.state.store
        assert wait_for(lambda: all(d["status"] == "delivered" for d in store.deliveries()))
        deliveries = store.deliveries()
    texts = [b["text"] for b in receiver.bodies]
    assert "nonfinite firing" in texts[0] and "'hooked'" in texts[0] and "[critical]" in texts[0]
    assert "nonfinite resolved" in texts[1]
    assert receiver.calls == 4  # two failures, then both delivered
    assert [d["attempts"] for d in deliveries] == [3, 1]


def test_a_dead_webhook_fails_the_delivery_not_the_alert_and_logs_no_secret(tmp_path, caplog):
    secret = "http://127.0.0.1:9/services/T0000/B0000/s3cr3tXYZ?token=abc"
    with caplog.at_level(logging.INFO, "deltascope"), app_with(tmp_path, [secret]) as c:
        run = Run(c)
        r = run.post(batch("a", [1], nonfinite__mlp__1=1.0))
        assert r.status_code == 200
        store = c.app.state.store
        assert wait_for(lambda: store.deliveries()[0]["status"] == "failed")
        (d,) = store.deliveries()
        assert d["attempts"] == 4 and d["last_error"]
        assert run.get("/alerts", state="firing")["count"] == 1
    lines = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert len(lines) == 2  # one "failing" warning for the endpoint, one "giving up" for the delivery
    assert all("http://127.0.0.1:9/…" in m and "s3cr3t" not in m and "abc" not in m for m in lines), lines


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T1/B2/XYZ", "https://hooks.slack.com/…"),
    ("https://user:pw@example.org:8443/?k=v", "https://example.org:8443/…"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
])
def test_webhook_urls_are_redacted_to_scheme_host_port(url, shown):
    assert redact(url) == shown


def test_silenced_alert_skips_the_webhook(tmp_path):
    receiver = Receiver()
    try:
        with app_with(tmp_path, [receiver.url]) as c:
            run = Run(c)
            t = run.post(batch("a", [1], nonfinite__attn__1=1.0)).json()["alerts"][0]
            assert wait_for(lambda: len(receiver.bodies) == 1)
            r = c.post(f"{run.base}/alerts/{t['alert_id']}/silence", json={"minutes": 5},
                       headers=run.headers)
            assert r.status_code == 200
            run.post(batch("b", [2, 3]))  # resolves while silenced
            store = c.app.state.store
            assert [d["status"] for d in store.deliveries()] == ["delivered", "silenced"]
            time.sleep(0.3)
    finally:
        receiver.close()
    assert len(receiver.bodies) == 1
