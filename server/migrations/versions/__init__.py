"""Revision files; alembic skips this ``__init__``."""
