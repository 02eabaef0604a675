"""WebhookWorker: delivers alert notifications from the database's outbox, with retries.

The ingest transaction writes one ``webhook_deliveries`` row per (transition to firing/resolved,
URL), so a notification survives a failing endpoint and a server restart alike: this thread only
moves rows from ``pending`` to ``delivered`` or, after ``webhook_max_attempts`` tries spaced by
exponential backoff, to ``failed``. The alert itself is in the database regardless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from server.store import Store, utcnow

log = logging.getLogger("deltascope.webhooks")

MAX_BACKOFF_S = 60.0



def redact(url: str) -> str:
    """What a log line may show of a webhook URL: scheme, host and port. Incoming-webhook URLs
    carry their secret in the path (Slack's /services/T.../B.../SECRET) or the query."""
    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    tail = "/…" if u.path not in ("", "/") or u.query else ""
    return f"{u.scheme}://{u.host}{port}{tail}"

class WebhookWorker:
    def __init__(self, store: Store, timeout_s: float, max_attempts: int, backoff_s: float,
                 on_result: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.timeout_s, self.max_attempts, self.backoff_s = timeout_s, max_attempts, backoff_s
        self._on_result = on_result
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltascope-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """New deliveries are pending: look now instead of at the next timer."""
        self._wake.set()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                wait = 5.0
                try:
                    heads = self.store.pending_heads()
                    now = utcnow()
                    for d in heads:
                        if self._stop.is_set():
                            break
                        if d.next_attempt <= now:
                            self._deliver(client, d)
                            wait = 0.0  # look again at once: the next in line may be due
                        else:
                            wait = min(wait, (d.next_attempt - now).total_seconds())
                except Exception as e:  # a database hiccup must not kill the thread
                    log.warning("webhook worker: %r", e)
                if wait > 0:
                    self._wake.wait(wait)
                    self._wake.clear()

    def _deliver(self, client: httpx.Client, d: Any) -> None:
        """One attempt; records delivered, failed (out of attempts) or pending (backoff)."""
        attempts = d.attempts + 1
        error: str | None = None
        try:
            r = client.post(d.url, json=d.payload)
            if r.status_code >= 300:
                error = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}".replace(d.url, redact(d.url))
        where = redact(d.url)
        if error is None:
            status, nxt = "delivered", utcnow()
            if d.url in self._failing:
                self._failing.discard(d.url)
                log.info("webhook %s delivers again", where)
        elif attempts >= self.max_attempts:
            status, nxt = "failed", utcnow()
            log.warning("webhook %s: giving up on delivery %s after %d attempts (%s); "
                        "the alert stays in the database", where, d.id, attempts, error)
        else:
            status = "pending"
            delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 1))
            nxt = utcnow() + timedelta(seconds=delay)
            if d.url not in self._failing:  # one warning per failing endpoint, not per try
                self._failing.add(d.url)
                log.warning("webhook %s failing (%s); retrying with backoff", where, error)
        self.store.record_delivery(d.id, status, attempts, nxt, error)
        if self._on_result is not None:
            self._on_result(status)
