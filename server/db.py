"""Engine construction and schema migration.

SQLite is tuned for acknowledged-is-durable ingest: WAL journal with ``synchronous=FULL`` (a
commit has reached the disk before the 200 goes out), a large auto-checkpoint window (a batch
rewrites the same few hundred leaf pages; checkpointing rarely writes each page once instead of
once per commit: about 2x the ingest rate), and a busy timeout instead of immediate lock errors.
PostgreSQL needs nothing special beyond pre-ping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON",
                   "wal_autocheckpoint=20000", "cache_size=-32768"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite files get the pragmas above, ``sqlite://`` one shared
    in-memory connection."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        kw: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if u.database in (None, "", ":memory:"):
            kw["poolclass"] = StaticPool
        else:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(u, **kw)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(u, pool_pre_ping=True)


def migrate(engine: sa.Engine) -> None:
    """Upgrade the database to the newest schema (a no-op when it is already there)."""
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
