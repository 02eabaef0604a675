"""What every probe sink shares: one warning per fault kind, and a writer thread behind a bounded
queue for sinks that touch disk or network (the training thread only ever does ``put_nowait``).

A destination that fails (server unreachable, directory unwritable, disk full) is not hammered:
after a failed write the writer thread drops records, counting them, for a backoff that doubles
from ``retry_initial`` to ``retry_max`` seconds, then tries again. So a dead destination costs one
attempt per backoff period, not one per step, and the queue keeps draining: ``flush`` and ``close``
return promptly, and never later than their timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
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

    def __call__(self, where: str, e: BaseException, count: bool = True, then: str = "") -> None:
        kind = f"{where}:{type(e).__name__}"
        with self._lock:
            if count:
                self.stats.errors += 1
            self.stats.last_error = f"{kind}: {e}"
            first = kind not in self._seen
            self._seen.add(kind)
        if first:
            log.warning("%s %s failed: %r%s. Further %s faults are counted, not logged",
                        self.owner, where, e, f"; {then}" if then else "", kind)


class _Marker:
    """A flush or stop request travelling through the queue behind the writes before it."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.done = threading.Event()


class ThreadedSink(ABC):
    """Base of disk and network sinks: ``write`` enqueues without blocking (drops and counts when
    the queue is full); a daemon thread calls ``_write`` / ``_flush`` / ``_close`` in order.

    Subclasses implement ``_write(step, scalars, hists)`` and may implement ``_flush`` and
    ``_close``; whatever they raise is counted in ``stats`` and logged once per kind. A record whose
    ``_write`` raised, or that arrived while the destination was backing off, counts as dropped:
    once the thread is idle, ``written + dropped`` is every record handed to ``write``.
    ``timeout``: the longest ``flush`` or ``close`` waits for the thread, in seconds.
    """

    moves_to_worker = True
    """A probe in process mode may run this sink in its worker (``probes._worker``): until its
    first write it holds configuration only, opened lazily on its thread, so it pickles as that."""

    def __init__(self, queue_size: int = 1024, timeout: float = 30.0, retry_initial: float = 1.0,
                 retry_max: float = 60.0) -> None:
        self.stats = SinkStats()
        self._fault = Faults(type(self).__name__, self.stats)
        self._timeout = timeout
        self._retry_initial, self._retry_max = retry_initial, retry_max
        self._lock = threading.Lock()  # dropped is counted on both threads
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._abandoned = False  # close gave up waiting: the thread drops what is left
        self._down_until: float | None = None  # writer thread: backing off until (monotonic)
        self._backoff = retry_initial
        self._down_dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"deltascope-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    _RUNTIME = ("stats", "_fault", "_lock", "_q", "_thread", "_closed", "_abandoned", "_down_until",
                "_backoff", "_down_dropped")

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only, and only before the first write: after it the sink owns files,
        writers or a run on this thread, which cannot follow it."""
        if self._closed or self.stats.written or self.stats.dropped or self.stats.errors or not self._q.empty():
            raise TypeError(f"{type(self).__name__} has been used already: it cannot move to another process")
        state = {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}
        state["_queue_size"] = self._q.maxsize
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        queue_size = state.pop("_queue_size")
        self.__dict__.update(state)
        ThreadedSink.__init__(self, queue_size, self._timeout, self._retry_initial, self._retry_max)

    # -- training-thread side -------------------------------------------------------------------
    def write(self, step: int, scalars: Mapping[str, float],
              hists: Mapping[str, Histogram] | None = None) -> None:
        if self._closed:
            self._drop()
            return
        try:
            self._q.put_nowait((step, dict(scalars), dict(hists or {})))
        except queue.Full:
            self._drop()
            self._fault("write", queue.Full(f"{self._q.maxsize}-record queue full"), count=False,
                        then="the writer thread is behind: records are dropped until it drains (counted in "
                             "stats.dropped)")

    def flush(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout`` s, default the sink's) until everything written so far is
        handed on, or dropped because the destination is failing."""
        if not self._closed:
            self._send("flush", _Marker(stop=False), self._deadline(timeout))

    def close(self, timeout: float | None = None) -> None:
        """Drain, close and stop the thread, within ``timeout`` s (default the sink's) in all.
        Idempotent; later writes are dropped, not raised."""
        if self._closed:
            return
        self._closed = True
        deadline = self._deadline(timeout)
        if not self._send("close", _Marker(stop=True), deadline):
            self._abandoned = True
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self._timeout if timeout is None else timeout)

    def _send(self, where: str, m: _Marker, deadline: float) -> bool:
        """Queue ``m`` behind the writes and wait for the thread to reach it, until ``deadline``."""
        then = ("the writer thread is stuck in a slow call" +
                ("; what it has not written is dropped" if m.stop else "; training goes on"))
        try:
            self._q.put(m, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            self._fault(where, TimeoutError("queue still full at the deadline"), then=then)
            return False
        if not m.done.wait(max(0.0, deadline - time.monotonic())):
            self._fault(where, TimeoutError("not drained by the deadline"), then=then)
            return False
        return True

    def _drop(self, n: int = 1) -> None:
        with self._lock:
            self.stats.dropped += n

    # -- writer-thread side ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if isinstance(item, _Marker):
                if self._down_until is None:  # a destination that just failed is not flushed
                    self._guard("flush", self._flush)
                if item.stop:
                    self._guard("close", self._close)
                    self._drain_dropped()
                item.done.set()
                if item.stop:
                    return
                continue
            if self._abandoned:  # close gave up on this thread: drop the rest, then release
                self._drop()
                if self._q.empty():  # the stop marker never made it into the full queue
                    self._guard("close", self._close)
                    return
                continue
            if self._down_until is not None and time.monotonic() < self._down_until:
                self._drop()  # backing off: no call into a destination known to fail
                self._down_dropped += 1
                continue
            step, scalars, hists = item
            if self._guard("write", self._write, step, scalars, hists):
                self.stats.written += 1
                if self._down_until is not None:
                    log.info("%s writes again; %d records were dropped while it failed",
                             type(self).__name__, self._down_dropped)
                    self._down_until, self._backoff, self._down_dropped = None, self._retry_initial, 0
            else:
                self._drop()
                self._down_dropped += 1
                self._down_until = time.monotonic() + self._backoff
                self._backoff = min(self._retry_max, 2 * self._backoff)

    def _drain_dropped(self) -> None:
        """Records that raced with ``close`` into the queue behind the stop marker."""
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, _Marker):
                self._drop()

    def _guard(self, where: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:
            then = (f"its records are dropped (counted in stats.dropped) and the write retried after "
                    f"{self._retry_initial:g} s, backing off to {self._retry_max:g} s") if where == "write" else ""
            self._fault(where, e, then=then)
            return False

    @abstractmethod
    def _write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        """Deliver one log step; runs on the sink's thread, may raise (counted, logged once)."""

    def warm(self) -> None:  # noqa: B027 (optional hook)
        """Import what the first write needs, on the calling thread: a probe's worker process
        does it before it says ready, so that a slow import (TensorBoard: ~2 s of CPU) is paid
        while the probe attaches, not during training steps."""

    def _flush(self) -> None:  # noqa: B027 (optional hook: most sinks have nothing to flush)
        """Push buffered writes out; runs on the sink's thread."""

    def _close(self) -> None:  # noqa: B027 (optional hook)
        """Release files or connections; runs on the sink's thread."""
