"""Alembic migrations of the server's schema, run by ``server.db.migrate`` at start-up.

Shipped inside the package (ini, env and versions) so an installed server migrates its own
database; by hand: ``alembic -c server/migrations/alembic.ini -x url=sqlite:///x.db upgrade head``.
"""
