"""Alembic environment: migrates the connection ``server.db.migrate`` hands over in
``config.attributes["connection"]``, or an engine built from ``-x url=...`` / ``sqlalchemy.url``.

Leaves logging alone (no ``fileConfig``): the server's and the tests' handlers stay as they are.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from server.tables import metadata

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    engine = sa.create_engine(_url())
    with engine.begin() as c:
        _run(c)
    engine.dispose()
