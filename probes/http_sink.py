"""HttpSink: streams probe statistics to the deltascope server, and its alerts back to the job.

The training thread only copies the dicts and enqueues (``put_nowait``; a full queue drops and
counts). A daemon thread batches records, registers the run on first contact (retrying while the
server is down), and POSTs each batch with a fixed ``batch_id``. While the server is unreachable
batches go to an append-only spool file (fsync per batch) and are replayed in order, with their
original ids, once it answers again: the server's idempotency makes that exactly-once, gap-free
delivery. One warning per outage, never one per step.

The spool describes itself (server, run body, run id and token once registered) and is locked for
the sink's lifetime, so a spool left by a killed job is an orphan that the next ``HttpSink`` on the
same ``spool_dir`` sends on a thread of its own when it starts (``replay_orphans``), or
``deltascope flush-spool`` does (``probes.spool_replay``). ``RunClient`` is the HTTP part both use.

Each answer carries the run's verdict and firing alerts (``sink.health``) and the alert
transitions the server's detector produced; ``on_alert(transition_dict)`` is called for each, on
the sink's thread. Torch-free: imports ``server.schemas`` (pydantic only) for the key rules.

    sink = HttpSink("http://127.0.0.1:8765", "ddl-small", config=cfg, on_alert=print)
    sink.write(step, scalars, hists)   # never blocks, never raises
    sink.close()                       # flushes; whatever is undelivered stays in the spool
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from probes._spool import Spool
from probes.sink import Histogram, SinkStats
from server.schemas import hist_key_problem, scalar_key_problem

log = logging.getLogger("deltascope.sinks.http")

DEFAULT_SPOOL_DIR = Path(tempfile.gettempdir()) / "deltascope-spool"
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class HttpSinkStats(SinkStats):
    """``written``: records the server acknowledged. The rest say where the others went."""

    batches: int = 0
    """Batches acknowledged (duplicates included)."""
    duplicates: int = 0
    """Batches the server already had (a replay after a lost answer)."""
    spooled: int = 0
    """Batches written to the spool during outages."""
    pending: int = 0
    """Batches in the spool now, waiting for the server."""
    rejected: int = 0
    """Records in batches the server refused (4xx): dropped, logged once per reason."""
    outages: int = 0
    nonfinite: int = 0
    """Non-finite scalar values left out (the server takes finite numbers only; the probes report
    non-finite activity through the ``nonfinite`` count stat)."""
    bad_keys: int = 0
    """Scalar or histogram keys left out because the server would refuse them."""


class _Flush:
    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.done = threading.Event()


class _Transient(Exception):
    """The server is unreachable or overloaded: spool and retry later."""


class _RunLost(_Transient):
    """The server does not know the run (a new database): the next send registers it again."""


class RunClient:
    """One run on one deltascope server, as a writer sees it: registers the run on first use (and
    again after the server lost it), POSTs batches with their ids, splits one over the body limit.

    Transport failures and overload raise ``_Transient`` (``_RunLost`` after a 404, or after a 401/403
    for a token the server honoured before or that was recorded on disk: a new database reusing run
    ids); every acknowledged or refused (sub)batch goes to ``_answered``. Subclasses: ``HttpSink``
    and ``probes.spool_replay``'s replayer."""

    def __init__(self, url: str, run_body: dict[str, Any], timeout: float, run_id: int | None = None,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.run_body = run_body
        self.run_id = run_id
        self._token = token
        self._token_trusted = token is not None
        """The token was acknowledged before (or recorded with the spool): a refusal of it means the
        run was lost, not that the token is wrong. A fresh token refused from its first use is a real
        refusal, so there is no registration loop."""
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)))

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if self._token is not None:
            headers["authorization"] = f"Bearer {self._token}"
        try:
            r = self._client.post(path, content=json.dumps(body, allow_nan=False), headers=headers)
        except httpx.HTTPError as e:
            raise _Transient(f"{type(e).__name__}: {e}") from e
        if r.status_code in _TRANSIENT:
            raise _Transient(f"HTTP {r.status_code}")
        return r

    def _register(self) -> None:
        r = self._post("/api/v1/runs", self.run_body)
        if r.status_code != 201:
            raise _Transient(f"run registration answered {r.status_code}: {r.text[:200]}")
        body = r.json()
        self.run_id, self._token = int(body["id"]), body["token"]
        self._token_trusted = False
        log.info("deltascope run %r registered as #%d at %s", self.run_body["name"], self.run_id, self.url)
        self._registered()

    def _registered(self) -> None:
        """Hook: ``run_id`` and ``_token`` are new."""

    def _send(self, batch: dict[str, Any]) -> None:
        """POST one batch; raises _Transient to spool, returns when acknowledged or rejected."""
        if self.run_id is None:
            self._register()
        r = self._post(f"/api/v1/runs/{self.run_id}/stats", batch)
        if r.status_code == 404 or (r.status_code in (401, 403) and self._token_trusted):
            # the server lost the run (a new database, perhaps reusing its id): register again
            self.run_id = self._token = None
            self._token_trusted = False
            raise _RunLost(f"HTTP {r.status_code}: run unknown to the server or its token no longer "
                           "honoured; registering again")
        if r.status_code == 200:
            self._token_trusted = True
        if r.status_code == 413 and len(batch["records"]) > 1:
            half = len(batch["records"]) // 2
            for suffix, part in (("a", batch["records"][:half]), ("b", batch["records"][half:])):
                self._send({"batch_id": f"{batch['batch_id']}.{suffix}", "records": part})
            return
        self._answered(batch, r)

    def _answered(self, batch: dict[str, Any], r: httpx.Response) -> None:
        """Hook: the server answered ``batch`` for good (200, or a refusal to drop)."""


class HttpSink(RunClient):
    def __init__(
        self,
        url: str,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        beta_max: float = 2.0,
        spool_dir: str | Path | None = None,
        batch_size: int = 16,
        queue_size: int = 4096,
        flush_interval: float = 1.0,
        timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        replay_orphans: bool = True,
    ) -> None:
        """``replay_orphans``: send the spools of dead jobs found in ``spool_dir`` to their runs, on
        a thread of its own (one log line per spool; summaries in ``recovered``)."""
        super().__init__(url, {"name": run_name, "config": dict(config or {}), "tags": dict(tags or {}),
                               "beta_max": beta_max}, timeout)
        self.run_name = run_name
        self.batch_size, self.flush_interval, self.timeout = batch_size, flush_interval, timeout
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.on_alert = on_alert
        self.stats = HttpSinkStats()
        self.health: dict[str, Any] = {"verdict": None, "firing": [], "step": None}
        """The server's verdict on the run and its firing alerts, as of the last answer."""
        self.recovered: list[Any] = []
        """``probes.spool_replay.Replayed`` of each orphan spool this sink sent (or tried) at start."""
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)[:64]
        self._id = uuid.uuid4().hex[:12]
        self.spool = Spool(Path(spool_dir or DEFAULT_SPOOL_DIR) / f"{slug}-{self._id}.jsonl")
        self.spool.set_meta(self._meta())
        try:  # before anything is spooled, so that no replayer ever takes this spool for an orphan
            self.spool.lock()
        except OSError as e:  # e.g. a file system without flock: spooling still works
            log.warning("HttpSink cannot lock its spool %s (%s): another process could replay it while "
                        "this job runs", self.spool.path, e)
        self._seq = 0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._full_warned = False
        self._warned: set[str] = set()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = retry_initial
        self._thread = threading.Thread(target=self._run, name="deltascope-HttpSink", daemon=True)
        self._thread.start()
        self._stop_replay = threading.Event()
        self._replayer: threading.Thread | None = None
        if replay_orphans:
            self._replayer = threading.Thread(target=self._replay_orphans, name="deltascope-HttpSink-replay",
                                              daemon=True)
            self._replayer.start()

    # -- training-thread side -------------------------------------------------------------------
    def write(self, step: int, scalars: Mapping[str, float],
              hists: Mapping[str, Histogram] | None = None) -> None:
        if self._closed:
            self.stats.dropped += 1
            return
        try:
            self._q.put_nowait((step, dict(scalars), dict(hists or {})))
        except queue.Full:  # warned once per sink: a stalled server fills it on every retry
            self.stats.dropped += 1
            if not self._full_warned:
                self._full_warned = True
                log.warning("HttpSink queue full (%d records): dropping records while it is full "
                            "(counted in stats.dropped; warned once)", self._q.maxsize)

    def flush(self, timeout: float | None = None) -> None:
        """Hand everything written so far to the server, or to the spool if it is down; waits up to
        ``timeout`` s (default: the HTTP timeout x 3) and never raises."""
        if not self._closed:
            self._marker(_Flush(stop=False), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, try the spool once more, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        wait = timeout if timeout is not None else self.timeout * 3
        deadline = time.monotonic() + wait
        self._stop_replay.set()  # the replayer stops between two batches; what is left stays for later
        self._marker(_Flush(stop=True), wait)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._replayer is not None:
            self._replayer.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():  # else it is mid-request: closing its client under it would
            self._client.close()          # only turn a timeout into a confusing RuntimeError

    def __enter__(self) -> HttpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _marker(self, m: _Flush, timeout: float | None) -> None:
        wait = timeout if timeout is not None else self.timeout * 3
        try:
            self._q.put(m, timeout=wait)
        except queue.Full:
            return
        m.done.wait(wait)

    # -- sink-thread side -----------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        first = 0.0
        while True:
            wait = self.flush_interval if not pending else max(0.0, first + self.flush_interval -
                                                               time.monotonic())
            try:
                item = self._q.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, _Flush):
                self._guard(self._dispatch, pending)
                pending = []
                if self.spool.pending:
                    self._guard(self._drain, True)
                if item.stop:
                    self._finish()
                    item.done.set()
                    return
                item.done.set()
                continue
            if item is not None:
                rec = self._guard(self._record, *item)
                if rec is not None:
                    if not pending:
                        first = time.monotonic()
                    pending.append(rec)
            if pending and (len(pending) >= self.batch_size or
                            time.monotonic() - first >= self.flush_interval):
                self._guard(self._dispatch, pending)
                pending = []
            elif self.spool.pending and time.monotonic() >= self._retry_at:
                self._guard(self._drain, False)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # nothing escapes the thread; counted, logged once per kind
            self.stats.errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            self._warn_once(f"{fn.__name__}:{type(e).__name__}",
                            f"HttpSink {fn.__name__} failed: {e!r} (further ones counted)")
            return None

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(msg)

    def _record(self, step: int, scalars: dict[str, Any], hists: dict[str, Any]) -> dict[str, Any]:
        sc: dict[str, float] = {}
        for k, v in scalars.items():
            x = float(v)
            if not math.isfinite(x):
                self.stats.nonfinite += 1
                self._warn_once("nonfinite", f"HttpSink: non-finite {k}={x} at step {step} left out "
                                "(the server takes finite numbers; see the 'nonfinite' stat)")
            elif (problem := scalar_key_problem(k)) is not None:
                self.stats.bad_keys += 1
                self._warn_once(f"key:{k}", f"HttpSink: {problem}; left out")
            else:
                sc[k] = x
        rec: dict[str, Any] = {"step": int(step), "scalars": sc}
        hs: dict[str, Any] = {}
        for k, h in hists.items():
            counts = [float(c) for c in h.counts]
            if (problem := hist_key_problem(k)) is not None:
                self.stats.bad_keys += 1
                self._warn_once(f"key:{k}", f"HttpSink: {problem}; left out")
            elif all(math.isfinite(c) for c in counts) and math.isfinite(h.lo) and math.isfinite(h.hi):
                hs[k] = {"lo": float(h.lo), "hi": float(h.hi), "counts": counts}
            else:
                self.stats.nonfinite += 1
        if hs:
            rec["hists"] = hs
        return rec

    def _dispatch(self, records: list[dict[str, Any]]) -> None:
        """Send a new batch, or spool it behind older ones (order is kept across outages)."""
        if not records:
            return
        self._seq += 1
        batch = {"batch_id": f"{self._id}-{self._seq:08d}", "records": records}
        if not self.spool.pending and time.monotonic() >= self._retry_at:
            try:
                self._send(batch)
                return
            except _Transient as e:
                self._outage(e)
        try:
            self.spool.append(batch)
        except OSError as e:  # disk full, unwritable: the batch is lost; say so once and count it
            self.stats.dropped += len(records)
            self.stats.errors += 1
            self.stats.last_error = f"spool: {e!r}"
            self._warn_once("spool", f"HttpSink cannot spool to {self.spool.path} ({e!r}): dropping batches "
                            "until the server answers again (counted in stats.dropped)")
            return
        self.stats.spooled += 1
        self.stats.pending = self.spool.pending

    def _drain(self, force: bool) -> None:
        """Replay spooled batches oldest first until one fails (then back off)."""
        if not force and time.monotonic() < self._retry_at:
            return
        while (batch := self.spool.peek()) is not None:
            try:
                self._send(batch)
            except _Transient as e:
                self._outage(e)
                return
            self.spool.ack()
            self.stats.pending = self.spool.pending

    def _outage(self, e: _Transient) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.stats.outages += 1
            self._backoff = self.retry_initial
            log.warning("deltascope server %s unreachable (%s): spooling to %s, replaying when it "
                        "answers", self.url, e, self.spool.path)
        else:
            self._backoff = min(self.retry_max, self._backoff * 2)
        self._retry_at = now + self._backoff

    def _back_up(self) -> None:
        if self._down_since is not None:
            log.warning("deltascope server %s answers again after %.1f s; replaying the spool",
                        self.url, time.monotonic() - self._down_since)
            self._down_since = None
        self._retry_at = 0.0

    def _meta(self) -> dict[str, Any]:
        """The spool's description: all a replayer needs to finish this job's delivery."""
        return {"version": 1, "url": self.url, "run": self.run_body, "batch_prefix": self._id,
                "pid": os.getpid(), "run_id": self.run_id, "token": self._token}

    def _registered(self) -> None:
        try:
            self.spool.set_meta(self._meta())
        except OSError as e:  # the batch in hand is still sent or spooled; a replay would register anew
            self._warn_once("meta", f"HttpSink cannot update {self.spool.meta_path}: {e!r}")

    def _answered(self, batch: dict[str, Any], r: httpx.Response) -> None:
        self._back_up()
        if r.status_code != 200:
            self.stats.rejected += len(batch["records"])
            self.stats.errors += 1
            detail = r.text[:300]
            self.stats.last_error = f"HTTP {r.status_code}: {detail}"
            self._warn_once(f"rejected:{r.status_code}",
                            f"deltascope server refused a batch ({r.status_code}): {detail}; "
                            "dropped (further refusals counted)")
            return
        body = r.json()
        self.stats.batches += 1
        if body.get("duplicate"):
            self.stats.duplicates += 1
        self.stats.written += len(batch["records"])
        self.health = {"verdict": body.get("verdict"), "firing": body.get("firing", []),
                       "step": batch["records"][-1]["step"]}
        if self.on_alert is not None:
            for t in body.get("alerts", []):
                try:
                    self.on_alert(t)
                except Exception as e:
                    self._warn_once(f"on_alert:{type(e).__name__}", f"HttpSink on_alert raised {e!r}")

    def _finish(self) -> None:
        if self.spool.pending:
            log.warning("HttpSink closing with %d batches undelivered in %s: the next HttpSink on that "
                        "spool directory sends them, or `deltascope flush-spool --dir %s`",
                        self.spool.pending, self.spool.path, self.spool.path.parent)
            self.spool.close()
        else:
            self.spool.remove()

    def _replay_orphans(self) -> None:
        # lazily: probes.spool_replay builds on RunClient (and stays out of a bare import of this module)
        from probes.spool_replay import replay_orphans

        def each(r: Any) -> None:
            if not r.in_use:
                self.recovered.append(r)
                log.warning("HttpSink %s an orphan spool: %s", "recovered" if r.delivered else "could not finish",
                            r.line())

        try:
            replay_orphans(self.spool.path.parent, timeout=self.timeout, stop=self._stop_replay.is_set,
                           each=each)
        except Exception as e:  # nothing escapes the thread
            log.warning("HttpSink could not replay orphan spools in %s: %r", self.spool.path.parent, e)
