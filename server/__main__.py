"""``python -m server``: serve with settings from the environment (``DELTASCOPE_*``)."""

from server.app import serve

serve()
