"""What every probe sink shares: one warning per fault kind, and a writer thread behind a bounded
queue for sinks that touch disk or network (the training thread only ever does ``put_nowait``)."""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from probes.sink import Histogram, SinkStats

log = logging.getLogger("deltascope.sinks")


class Faults:
    """Counts faults into ``stats`` and logs the first of each kind only."""

    def __init__(self, owner: str, stats: SinkStats) -> None:
        self.owner, self.stats = owner, stats
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, where: str, e: BaseException, count: bool = True) -> None:
        kind = f"{where}:{type(e).__name__}"
        with self._lock:
            if count:
                self.stats.errors += 1
            self.stats.last_error = f"{kind}: {e}"
            first = kind not in self._seen
            self._seen.add(kind)
        if first:
            log.warning("%s %s failed (further %s faults are counted, not logged): %r",
                        self.owner, where, kind, e)


class _Marker:
    """A flush or stop request travelling through the queue behind the writes before it."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.done = threading.Event()


class ThreadedSink(ABC):
    """Base of disk and network sinks: ``write`` enqueues without blocking (drops and counts when
    the queue is full); a daemon thread calls ``_write`` / ``_flush`` / ``_close`` in order.

    Subclasses implement ``_write(step, scalars, hists)`` and may implement ``_flush`` and
    ``_close``; whatever they raise is counted in ``stats`` and logged once per kind.
    """

    def __init__(self, queue_size: int = 1024, timeout: float = 30.0) -> None:
        self.stats = SinkStats()
        self._fault = Faults(type(self).__name__, self.stats)
        self._timeout = timeout
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"deltascope-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------------------------------
    def write(self, step: int, scalars: Mapping[str, float],
              hists: Mapping[str, Histogram] | None = None) -> None:
        if self._closed:
            self.stats.dropped += 1
            return
        try:
            self._q.put_nowait((step, dict(scalars), dict(hists or {})))
        except queue.Full as e:
            self.stats.dropped += 1
            self._fault("write (queue full, dropped)", e, count=False)

    def flush(self) -> None:
        """Wait (up to ``timeout`` s) until everything written so far is handed on."""
        if not self._closed:
            self._send(_Marker(stop=False))

    def close(self) -> None:
        """Drain, close and stop the thread. Idempotent; later writes are dropped, not raised."""
        if self._closed:
            return
        self._closed = True
        self._send(_Marker(stop=True))
        self._thread.join(timeout=self._timeout)

    def _send(self, m: _Marker) -> None:
        try:
            self._q.put(m, timeout=self._timeout)
        except queue.Full as e:
            self._fault("flush (queue stuck)", e)
            return
        if not m.done.wait(self._timeout):
            self._fault("flush", TimeoutError(f"not drained in {self._timeout} s"))

    # -- writer-thread side ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if isinstance(item, _Marker):
                self._guard("flush", self._flush)
                if item.stop:
                    self._guard("close", self._close)
                item.done.set()
                if item.stop:
                    return
                continue
            step, scalars, hists = item
            if self._guard("write", self._write, step, scalars, hists):
                self.stats.written += 1

    def _guard(self, where: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:
            self._fault(where, e)
            return False

    @abstractmethod
    def _write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        """Deliver one log step; runs on the sink's thread, may raise (counted, logged once)."""

    def _flush(self) -> None:  # noqa: B027 (optional hook: most sinks have nothing to flush)
        """Push buffered writes out; runs on the sink's thread."""

    def _close(self) -> None:  # noqa: B027 (optional hook)
        """Release files or connections; runs on the sink's thread."""
