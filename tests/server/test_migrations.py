"""The schema comes from the packaged Alembic migrations, on SQLite and on PostgreSQL, and
re-running them is a no-op."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from server import tables
from server.db import MIGRATIONS, make_engine, migrate


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_migrate_creates_every_table_and_is_idempotent(db, request, tmp_path):
    url = request.getfixturevalue("pg_url") if db == "postgresql" else f"sqlite:///{tmp_path}/m.db"
    engine = make_engine(url)
    migrate(engine)
    migrate(engine)
    insp = sa.inspect(engine)
    assert set(insp.get_table_names()) == set(tables.metadata.tables) | {"alembic_version"}
    for name, table in tables.metadata.tables.items():
        assert {c["name"] for c in insp.get_columns(name)} == set(table.columns.keys()), name
        assert set(insp.get_pk_constraint(name)["constrained_columns"]) == {
            c.name for c in table.primary_key.columns}, name
    head = ScriptDirectory.from_config(_cfg()).get_current_head()
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head
        if db == "sqlite":
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: commit == on disk
    engine.dispose()


def test_migrations_ship_inside_the_package():
    assert (MIGRATIONS / "alembic.ini").is_file() and (MIGRATIONS / "env.py").is_file()
    assert list((MIGRATIONS / "versions").glob("0001_*.py"))


def _cfg() -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg
