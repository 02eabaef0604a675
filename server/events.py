"""Broker: fans live events out to SSE subscribers, one bounded asyncio queue each.

Publishers are the ingest handlers, which run in worker threads: ``publish`` hands each event to
the subscriber's own event loop with ``call_soon_threadsafe``. A subscriber that falls behind
loses its oldest events (counted in ``dropped``), never slows ingest and never grows memory.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Subscriber:
    run_id: int | None
    """Only this run's events; None for every run."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]]
    loop: asyncio.AbstractEventLoop
    dropped: int = field(default=0)

    def offer(self, item: tuple[str, dict[str, Any]]) -> None:
        """Runs on the subscriber's loop: enqueue, dropping the oldest event when full."""
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.dropped += 1


class Broker:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subs: set[Subscriber] = set()
        self._lock = threading.Lock()

    def subscribe(self, run_id: int | None) -> Subscriber:
        """Call from the event loop that will read the queue."""
        sub = Subscriber(run_id, asyncio.Queue(self.queue_size), asyncio.get_running_loop())
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, event: str, data: dict[str, Any], run_id: int) -> None:
        """Thread-safe and non-blocking; events reach each subscriber in publish order."""
        with self._lock:
            targets = [s for s in self._subs if s.run_id is None or s.run_id == run_id]
        for sub in targets:
            try:
                sub.loop.call_soon_threadsafe(sub.offer, (event, data))
            except RuntimeError:  # its loop has closed: the subscriber is gone
                self.unsubscribe(sub)
