"""deltascope server: live diagnostics, failure detection and alerts for running DDL jobs.

Never imports torch, ``ddl`` or the torch parts of ``probes``: it runs in a small container.
``create_app``, ``serve`` and ``Settings`` load on first use, so the torch-free modules the probes
import (``server.catalogue``, ``server.rules``, ``server.schemas``, ...) do not pull in FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app, serve
    from server.settings import Settings

__all__ = ["Settings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from server import app

        return getattr(app, name)
    if name == "Settings":
        from server.settings import Settings

        return Settings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
