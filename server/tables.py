"""The database schema as SQLAlchemy Core tables (the Alembic migrations create exactly these).

Stats are one row per point, keyed (run_id, key_id, step): a stat's history is one index range,
and on SQLite the table is WITHOUT ROWID so that key is the table's own order. Metric keys are
interned in ``stat_keys`` so a row carries two small integers, not a 20-byte string. Times are
naive UTC.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.Column("updated", sa.DateTime, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("beta_max", sa.Float, nullable=False),
    sa.Column("last_step", sa.BigInteger, nullable=True),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("latest", sa.JSON, nullable=False),
    sa.Column("detector_state", sa.JSON, nullable=True),
)

stat_keys = sa.Table(
    "stat_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
)

stats = sa.Table(
    "stats", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key_id", sa.Integer, primary_key=True),
    sa.Column("step", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sqlite_with_rowid=False,
)

histograms = sa.Table(
    "histograms", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key_id", sa.Integer, primary_key=True),
    sa.Column("step", sa.BigInteger, primary_key=True),
    sa.Column("lo", sa.Float, nullable=False),
    sa.Column("hi", sa.Float, nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sqlite_with_rowid=False,
)

ingest_batches = sa.Table(
    "ingest_batches", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("batch_id", sa.String(128), primary_key=True),
    sa.Column("received", sa.DateTime, nullable=False),
    sa.Column("records", sa.Integer, nullable=False),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("first_step", sa.BigInteger, nullable=False),
    sa.Column("last_step", sa.BigInteger, nullable=False),
)

alerts = sa.Table(
    "alerts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("site", sa.String(16), nullable=False),
    sa.Column("layer", sa.Integer, nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("since_step", sa.BigInteger, nullable=False),
    sa.Column("last_step", sa.BigInteger, nullable=False),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("acknowledged", sa.Boolean, nullable=False),
    sa.Column("silenced_until", sa.DateTime, nullable=True),
    sa.Column("updated", sa.DateTime, nullable=False),
    sa.UniqueConstraint("run_id", "rule", "site", "layer", name="uq_alert_identity"),
)

alert_events = sa.Table(
    "alert_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.Integer, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.Column("transition", sa.JSON, nullable=False),
    sa.Index("ix_alert_events_run", "run_id", "id"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Integer, sa.ForeignKey("alert_events.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt", sa.DateTime, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("updated", sa.DateTime, nullable=False),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt"),
)

server_state = sa.Table(
    "server_state", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("updated", sa.DateTime, nullable=False),
)
