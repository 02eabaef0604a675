"""Settings: DELTASCOPE_ environment with __ nesting, reached through a dependency."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server import Settings, create_app
from server.deps import get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in os.environ:
        if name.startswith("DELTASCOPE_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings()
    assert (s.host, s.port, s.db_url) == ("127.0.0.1", 8765, "sqlite:///./deltascope.db")
    assert s.admin_token is None and s.cors_origins == [] and s.webhook_urls == []
    assert s.max_body_bytes == 4 * 1024 * 1024 and s.thresholds.collapse_beta == 0.05


def test_environment_with_nesting(monkeypatch):
    monkeypatch.setenv("DELTASCOPE_PORT", "9001")
    monkeypatch.setenv("DELTASCOPE_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("DELTASCOPE_WEBHOOK_URLS", '["http://127.0.0.1:1/hook"]')
    monkeypatch.setenv("DELTASCOPE_THRESHOLDS__COLLAPSE_BETA", "0.02")
    s = Settings()
    assert s.port == 9001 and s.admin_token.get_secret_value() == "s3cret"
    assert s.webhook_urls == ["http://127.0.0.1:1/hook"] and s.thresholds.collapse_beta == 0.02
    assert "s3cret" not in repr(s)


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("DELTASCOPE_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()
    with pytest.raises(ValidationError, match="nope"):
        Settings(nope=1)


def test_each_app_carries_its_own_settings(tmp_path):
    from fastapi.testclient import TestClient

    a = create_app(Settings(db_url=f"sqlite:///{tmp_path}/a.db", max_body_bytes=2048))
    b = create_app(Settings(db_url=f"sqlite:///{tmp_path}/b.db"))
    assert a.state.settings.max_body_bytes == 2048 and b.state.settings.max_body_bytes != 2048
    with TestClient(a) as ca, TestClient(b) as cb:
        ca.post("/api/v1/runs", json={"name": "only-in-a"})
        assert cb.get("/api/v1/runs").json()["count"] == 0
        assert ca.get("/api/v1/runs").json()["count"] == 1


def test_settings_dependency_can_be_overridden(tmp_path):
    from fastapi.testclient import TestClient

    page = tmp_path / "p.html"
    page.write_text("override")
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/a.db"))
    app.dependency_overrides[get_settings] = lambda: Settings(dashboard_path=page)
    with TestClient(app) as c:
        assert c.get("/").text == "override"
