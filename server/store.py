"""Store: every read and write of the server's database, in SQLAlchemy Core.

The ingest path is one transaction per batch: batch id (idempotency), points (one executemany
upsert), histograms, the run's detector (restored, advanced, saved), alert rows, the transition
log and pending webhook deliveries; the caller answers 200 only after it commits, so an
acknowledged batch is durable and a crash mid-batch leaves no trace of it.

SQLite has one writer at a time: writes here take a process lock first, so a transaction never
starts to write on a stale read snapshot. PostgreSQL serialises ingests per run with
``SELECT ... FOR UPDATE`` on the run row instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql, sqlite

from server import tables as T
from server._alerts import select_alerts, store_transitions
from server._ingest import headline, merge_latest
from server.rules import AlertState, Detector
from server.schemas import RunCreate, StatsBatch
from server.thresholds import Thresholds

log = logging.getLogger("deltascope.store")

_PG_UPSERT_STATS = (
    "INSERT INTO stats (run_id, key_id, step, value) "
    "SELECT %(run_id)s, u.k, u.s, u.v FROM unnest(%(keys)s::int[], %(steps)s::bigint[], %(values)s::float8[]) "
    "AS u(k, s, v) ON CONFLICT (run_id, key_id, step) DO UPDATE SET value = excluded.value"
)
_SQLITE_UPSERT_STATS = (
    "INSERT INTO stats (run_id, key_id, step, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run_id, key_id, step) DO UPDATE SET value = excluded.value"
)


def utcnow() -> datetime:
    """Naive UTC, the form every DateTime column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class IngestOutcome:
    accepted: int
    points: int
    duplicate: bool
    transitions: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = "healthy"
    firing: list[dict[str, Any]] = field(default_factory=list)
    last_step: int | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    deliveries: int = 0


class Store:
    def __init__(self, engine: sa.Engine, default_thresholds: Thresholds,
                 webhook_urls: Sequence[str] = ()) -> None:
        self.engine = engine
        self.default_thresholds = default_thresholds
        self.webhook_urls = list(webhook_urls)
        self.dialect = engine.dialect.name
        self._sqlite = self.dialect == "sqlite"
        self._write_lock = threading.Lock()
        self._run_locks: dict[int, threading.Lock] = {}
        self._key_ids: dict[str, int] = {}
        self._thresholds: tuple[Any, Thresholds] | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        if self._sqlite:
            return sqlite.insert(table)
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sa.insert(table)

    def _upsert(self, table: sa.Table, index: list[str], update: list[str]) -> Any:
        stmt = self._insert(table)
        if self._sqlite or self.dialect == "postgresql":
            return stmt.on_conflict_do_update(index_elements=index,
                                              set_={c: stmt.excluded[c] for c in update})
        return stmt  # other dialects: plain insert (a replayed step under a new batch id fails)

    @contextlib.contextmanager
    def _write(self, run_id: int | None = None) -> Iterator[sa.Connection]:
        """A write transaction: SQLite takes the process-wide writer lock, others a per-run lock."""
        if self._sqlite:
            lock = self._write_lock
        elif run_id is not None:
            with self._write_lock:
                lock = self._run_locks.setdefault(run_id, threading.Lock())
        else:
            lock = None
        with lock or contextlib.nullcontext(), self.engine.begin() as conn:
            yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- thresholds -----------------------------------------------------------------------------
    def thresholds(self, conn: sa.Connection | None = None) -> Thresholds:
        """The thresholds stored by ``PUT /thresholds``, else the settings' defaults."""
        with contextlib.ExitStack() as stack:
            c = conn or stack.enter_context(self.engine.connect())
            value = c.execute(sa.select(T.server_state.c.value)
                              .where(T.server_state.c.name == "thresholds")).scalar()
        if value is None:
            return self.default_thresholds
        cached = self._thresholds
        if cached is not None and cached[0] == value:
            return cached[1]
        try:
            t = Thresholds.model_validate(value)
        except ValidationError:  # stored by an older Thresholds model: keep what still fits
            known = {k: v for k, v in value.items() if k in Thresholds.model_fields}
            try:
                t = Thresholds.model_validate({**self.default_thresholds.model_dump(), **known})
            except ValidationError as e:
                log.warning("stored thresholds no longer validate (%s); using the defaults", e)
                t = self.default_thresholds
        self._thresholds = (value, t)
        return t

    def set_thresholds(self, t: Thresholds) -> None:
        value = t.model_dump(mode="json")
        with self._write() as conn:
            conn.execute(self._upsert(T.server_state, ["name"], ["value", "updated"]),
                         {"name": "thresholds", "value": value, "updated": utcnow()})

    # -- runs -----------------------------------------------------------------------------------
    def create_run(self, body: RunCreate) -> tuple[int, str]:
        token = "dsr_" + secrets.token_urlsafe(32)
        now = utcnow()
        with self._write() as conn:
            run_id = conn.execute(sa.insert(T.runs).values(
                name=body.name, created=now, updated=now, config=body.config, tags=body.tags,
                token_hash=hash_token(token), beta_max=body.beta_max, last_step=None,
                verdict="healthy", latest={}, detector_state=None,
            )).inserted_primary_key[0]
        return int(run_id), token

    def get_run(self, run_id: int) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(T.runs).where(T.runs.c.id == run_id)).first()

    @staticmethod
    def token_ok(run: sa.Row[Any], token: str) -> bool:
        return hmac.compare_digest(run.token_hash, hash_token(token))

    def list_runs(self, limit: int, offset: int) -> tuple[list[sa.Row[Any]], int]:
        cols = [c for c in T.runs.c if c.name not in ("latest", "detector_state", "token_hash")]
        with self.engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(T.runs)).scalar_one()
            rows = conn.execute(sa.select(*cols).order_by(T.runs.c.id.desc())
                                .limit(limit).offset(offset)).all()
        return list(rows), int(count)

    def firing_counts(self, run_ids: Sequence[int]) -> dict[int, int]:
        if not run_ids:
            return {}
        a = T.alerts.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(a.run_id, sa.func.count()).where(
                a.run_id.in_(run_ids), a.state == AlertState.FIRING.value).group_by(a.run_id)).all()
        return {int(r[0]): int(r[1]) for r in rows}

    # -- ingest ---------------------------------------------------------------------------------
    def _intern(self, keys: set[str]) -> dict[str, int]:
        """Ids of metric keys, inserting the new ones in their own short transaction (key ids are
        global and immutable, so the cache never goes stale and a failed ingest leaks nothing).

        Sorted: on PostgreSQL concurrent interns take no process lock, and two inserts that meet
        the same new keys in different orders wait on each other's unique-index entries, a
        deadlock; in one global order the later one just waits for the earlier's commit."""
        missing = sorted(k for k in keys if k not in self._key_ids)
        if missing:
            ins = self._insert(T.stat_keys)
            if self._sqlite or self.dialect == "postgresql":
                ins = ins.on_conflict_do_nothing(index_elements=["key"])
            with self._write() as conn:
                conn.execute(ins, [{"key": k} for k in missing])
                for chunk in range(0, len(missing), 500):
                    part = missing[chunk:chunk + 500]
                    for k, i in conn.execute(sa.select(T.stat_keys.c.key, T.stat_keys.c.id)
                                             .where(T.stat_keys.c.key.in_(part))):
                        self._key_ids[k] = int(i)
        return self._key_ids

    def ingest(self, run_id: int, batch: StatsBatch) -> IngestOutcome:
        records = sorted(batch.records, key=lambda r: r.step)
        keys = {k for r in records for k in r.scalars} | {k for r in records for k in r.hists}
        ids = self._intern(keys)
        n_points = sum(len(r.scalars) for r in records)
        hists = {(ids[k], r.step): h for r in records for k, h in r.hists.items()}
        with self._write(run_id) as conn:
            run = conn.execute(sa.select(T.runs).where(T.runs.c.id == run_id).with_for_update()).one()
            b = T.ingest_batches.c
            seen = conn.execute(sa.select(b.records).where(
                b.run_id == run_id, b.batch_id == batch.batch_id)).first()
            if seen is not None:
                return IngestOutcome(0, 0, True, verdict=run.verdict, last_step=run.last_step,
                                     firing=select_alerts(conn, run_id, ["firing"]))
            conn.execute(sa.insert(T.ingest_batches).values(
                run_id=run_id, batch_id=batch.batch_id, received=utcnow(), records=len(records),
                points=n_points, first_step=records[0].step, last_step=records[-1].step))
            if n_points:
                self._insert_points(conn, run_id, records, ids)
            if hists:
                conn.execute(self._upsert(T.histograms, ["run_id", "key_id", "step"],
                                          ["lo", "hi", "counts"]),
                             [{"run_id": run_id, "key_id": kid, "step": step, "lo": h.lo, "hi": h.hi,
                               "counts": h.counts} for (kid, step), h in hists.items()])
            out = self._detect(conn, run, records)
            out.accepted, out.points = len(records), n_points
            out.headline = headline(records[-1])
        return out

    def _insert_points(self, conn: sa.Connection, run_id: int, records: list[Any],
                       ids: dict[str, int]) -> None:
        if self._sqlite:
            # the hot loop: straight to sqlite3's executemany with tuples, skipping SQLAlchemy's
            # per-row parameter processing (a third of the ingest time otherwise); a step repeated
            # in the batch resolves in order through the upsert
            conn.exec_driver_sql(_SQLITE_UPSERT_STATS, [
                (run_id, ids[k], r.step, v) for r in records for k, v in r.scalars.items()])
            return
        points: dict[tuple[int, int], float] = {}
        for r in records:  # PostgreSQL refuses to upsert one row twice in a statement
            for k, v in r.scalars.items():
                points[(ids[k], r.step)] = v
        if self.dialect == "postgresql":
            # one statement over three arrays instead of one upsert per point: a batch's hundreds
            # of points cost one round trip (2.7x the SQLite time per batch otherwise)
            conn.exec_driver_sql(_PG_UPSERT_STATS, {
                "run_id": run_id, "keys": [k for k, _ in points], "steps": [s for _, s in points],
                "values": list(points.values())})
            return
        conn.execute(self._upsert(T.stats, ["run_id", "key_id", "step"], ["value"]),
                     [{"run_id": run_id, "key_id": kid, "step": step, "value": v}
                      for (kid, step), v in points.items()])

    def _detect(self, conn: sa.Connection, run: sa.Row[Any], records: list[Any]) -> IngestOutcome:
        """Advance the run's detector over the steps it has not judged yet; store what changed.
        A step at or below the run's last step (a resumed job re-logging) is stored, not judged."""
        det = Detector(self.thresholds(conn), beta_max=run.beta_max, run=str(run.id))
        if run.detector_state:
            try:
                det.load_state_dict(run.detector_state)
            except (ValueError, KeyError, TypeError) as e:  # a snapshot from another rules version
                log.warning("run %s: detector state not restorable (%r); starting afresh", run.id, e)
                det = Detector(det.thresholds, beta_max=run.beta_max, run=str(run.id))
        last = run.last_step
        transitions = []
        for r in records:
            if last is None or r.step > last:
                transitions.extend(det.evaluate(r.step, r.scalars))
                last = r.step
        now = utcnow()
        stored, deliveries = store_transitions(conn, run, transitions, now, self.webhook_urls)
        verdict = det.verdict()
        conn.execute(sa.update(T.runs).where(T.runs.c.id == run.id).values(
            last_step=last, updated=now, verdict=verdict, detector_state=det.state_dict(),
            latest=merge_latest(run.latest or {}, records)))
        return IngestOutcome(0, 0, False, transitions=stored, verdict=verdict, last_step=last,
                             firing=select_alerts(conn, run.id, ["firing"]), deliveries=deliveries)

    # -- reads ----------------------------------------------------------------------------------
    def key_id(self, key: str) -> int | None:
        if key in self._key_ids:
            return self._key_ids[key]
        with self.engine.connect() as conn:
            kid = conn.execute(sa.select(T.stat_keys.c.id).where(T.stat_keys.c.key == key)).scalar()
        if kid is not None:
            self._key_ids[key] = int(kid)
        return kid

    def history(self, run_id: int, key: str, lo: int, hi: int, max_points: int
                ) -> tuple[int, bool, list[tuple[int, float, float, float, int]]]:
        """(total, downsampled, [(step, mean, min, max, n)]) of one stat over [lo, hi]; more than
        ``max_points`` points are averaged in equal step buckets (min and max kept)."""
        kid = self.key_id(key)
        if kid is None:
            return 0, False, []
        s = T.stats.c
        where = (s.run_id == run_id, s.key_id == kid, s.step >= lo, s.step <= hi)
        with self.engine.connect() as conn:
            n, first, last = conn.execute(
                sa.select(sa.func.count(), sa.func.min(s.step), sa.func.max(s.step)).where(*where)).one()
            if not n:
                return 0, False, []
            if n <= max_points:
                rows = conn.execute(sa.select(s.step, s.value).where(*where).order_by(s.step)).all()
                return n, False, [(st, v, v, v, 1) for st, v in rows]
            width = -(-(last - first + 1) // max_points)
            bucket = (s.step - first) // width
            rows = conn.execute(
                sa.select(sa.func.max(s.step), sa.func.avg(s.value), sa.func.min(s.value),
                          sa.func.max(s.value), sa.func.count())
                .where(*where).group_by(bucket).order_by(sa.func.max(s.step))).all()
        return n, True, [(int(st), float(m), float(mn), float(mx), int(c)) for st, m, mn, mx, c in rows]

    def histograms(self, run_id: int, key: str, lo: int, hi: int, max_points: int
                   ) -> tuple[int, list[sa.Row[Any]]]:
        """(total, rows) of one histogram key over [lo, hi], thinned by stride to ``max_points``."""
        kid = self.key_id(key)
        if kid is None:
            return 0, []
        h = T.histograms.c
        where = (h.run_id == run_id, h.key_id == kid, h.step >= lo, h.step <= hi)
        with self.engine.connect() as conn:
            steps = conn.execute(sa.select(h.step).where(*where).order_by(h.step)).scalars().all()
            if not steps:
                return 0, []
            stride = -(-len(steps) // max_points)
            keep = steps[::stride]
            if keep[-1] != steps[-1]:  # always end on the newest
                keep = keep[:max_points - 1] + [steps[-1]]
            rows = []
            for i in range(0, len(keep), 500):
                rows += conn.execute(sa.select(h.step, h.lo, h.hi, h.counts).where(
                    h.run_id == run_id, h.key_id == kid, h.step.in_(keep[i:i + 500]))
                    .order_by(h.step)).all()
        return len(steps), rows

    # -- alerts ---------------------------------------------------------------------------------
    def alerts(self, run_id: int, states: Sequence[str] | None) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return select_alerts(conn, run_id, states)

    def update_alert(self, run_id: int, alert_id: int, **values: Any) -> dict[str, Any] | None:
        a = T.alerts.c
        with self._write(run_id) as conn:
            n = conn.execute(sa.update(T.alerts).where(a.run_id == run_id, a.id == alert_id)
                             .values(updated=utcnow(), **values)).rowcount
            return select_alerts(conn, run_id, None, alert_id)[0] if n else None

    def ack_alert(self, run_id: int, alert_id: int) -> dict[str, Any] | None:
        return self.update_alert(run_id, alert_id, acknowledged=True)

    def silence_alert(self, run_id: int, alert_id: int, minutes: float) -> dict[str, Any] | None:
        return self.update_alert(run_id, alert_id,
                                 silenced_until=utcnow() + timedelta(minutes=minutes))

    # -- metrics --------------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[sa.Row[Any]], list[sa.Row[Any]]]:
        """Every run's latest values, and firing alert counts by (run, rule, severity)."""
        r, a = T.runs.c, T.alerts.c
        with self.engine.connect() as conn:
            runs = conn.execute(sa.select(r.id, r.name, r.last_step, r.verdict, r.beta_max, r.latest)).all()
            firing = conn.execute(sa.select(a.run_id, a.rule, a.severity, sa.func.count())
                                  .where(a.state == "firing")
                                  .group_by(a.run_id, a.rule, a.severity)).all()
        return list(runs), list(firing)

    # -- webhook deliveries ---------------------------------------------------------------------
    def pending_heads(self, limit: int = 500) -> list[sa.Row[Any]]:
        """The oldest pending delivery of each URL, due or not. Only a head is ever sent, so an
        endpoint gets its notifications in order (a retried "firing" is never overtaken by its
        "resolved")."""
        d = T.webhook_deliveries.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(d.id, d.url, d.payload, d.attempts, d.next_attempt)
                                .where(d.status == "pending").order_by(d.id).limit(limit)).all()
        heads: dict[str, sa.Row[Any]] = {}
        for r in rows:
            heads.setdefault(r.url, r)
        return list(heads.values())

    def record_delivery(self, delivery_id: int, status: str, attempts: int, next_attempt: datetime,
                        error: str | None) -> None:
        d = T.webhook_deliveries.c
        with self._write() as conn:
            conn.execute(sa.update(T.webhook_deliveries).where(d.id == delivery_id).values(
                status=status, attempts=attempts, next_attempt=next_attempt, last_error=error,
                updated=utcnow()))

    def deliveries(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(T.webhook_deliveries).order_by(T.webhook_deliveries.c.id))]

