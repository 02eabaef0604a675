"""Service settings: read once from the environment (``DELTASCOPE_`` prefix, ``__`` nesting).

``create_app(settings)`` receives one instance and routes reach it through the ``SettingsDep``
dependency, never through a module-level singleton. Example environment::

    DELTASCOPE_PORT=9000
    DELTASCOPE_DB_URL=postgresql+psycopg://ds@db/deltascope
    DELTASCOPE_WEBHOOK_URLS='["https://hooks.slack.com/services/..."]'
    DELTASCOPE_THRESHOLDS__COLLAPSE_BETA=0.02
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.thresholds import Thresholds

DASHBOARD_PAGE = Path(__file__).resolve().parents[1] / "dashboards" / "live.html"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DELTASCOPE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    """Bind address. Loopback unless told otherwise: the write API trusts its run tokens only."""
    port: int = Field(8765, ge=0, le=65535)
    """TCP port."""
    db_url: str = "sqlite:///./deltascope.db"
    """SQLAlchemy URL: SQLite by default, PostgreSQL (``postgresql+psycopg://...``) for several workers."""
    admin_token: SecretStr | None = None
    """Bearer token for admin writes (``PUT /thresholds``); None leaves thresholds read-only."""
    cors_origins: list[str] = []
    """Origins allowed to call the API from a browser (exact origins, e.g. ``http://localhost:3000``)."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body accepted (bytes); larger bodies get 413 before any parsing."""
    max_json_depth: int = Field(32, ge=4, le=256)
    """Deepest JSON nesting accepted (arrays + objects); deeper bodies get 400 before parsing."""
    webhook_urls: list[str] = []
    """URLs that receive Slack-compatible ``{"text": ...}`` POSTs on alert firing/resolved."""
    webhook_timeout_s: float = Field(5.0, gt=0)
    """Timeout of one webhook POST (seconds)."""
    webhook_max_attempts: int = Field(6, ge=1)
    """Attempts per delivery before it is recorded as failed."""
    webhook_backoff_s: float = Field(0.5, gt=0)
    """First retry delay (seconds); doubles per attempt, capped at 60 s."""
    sse_queue_size: int = Field(1024, ge=1)
    """Events buffered per live-stream subscriber; the oldest are dropped when it falls behind."""
    sse_ping_s: float = Field(15.0, gt=0)
    """Keep-alive comment interval of the live stream (seconds)."""
    dashboard_path: Path = DASHBOARD_PAGE
    """HTML file served at ``/``: the live page, ``dashboards/live.html``."""
    log_level: str = "info"
    """uvicorn log level."""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    """Detection thresholds until ``PUT /thresholds`` stores others in the database."""

    @field_validator("db_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        """A URL SQLAlchemy can load a dialect and driver for, so a typo is one line at start-up."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        hint = "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"
        try:
            make_url(v).get_dialect().import_dbapi()
        except NoSuchModuleError:  # (a subclass of ArgumentError)
            raise ValueError(f"unknown database kind {v.split(':', 1)[0]!r}; {hint}") from None
        except ArgumentError:
            raise ValueError(f"not a database URL; {hint}") from None
        except ImportError as e:
            raise ValueError(f"the driver for {v.split(':', 1)[0]!r} is not installed ({e.name}); {hint}") from None
        return v
