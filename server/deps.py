"""Route dependencies as ``Annotated`` aliases: the settings, the store, the live-event broker,
the metrics, and the run and admin checks that guard writes.

Everything hangs off ``request.app.state`` (set by ``create_app``): no module-level singletons.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Path, Request, status

from server.events import Broker
from server.metrics import ServerMetrics
from server.schemas import MAX_ID
from server.settings import Settings
from server.store import Store
from server.webhooks import WebhookWorker


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_broker(request: Request) -> Broker:
    return request.app.state.broker


def get_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def get_webhooks(request: Request) -> WebhookWorker | None:
    return request.app.state.webhooks


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
WebhooksDep = Annotated[WebhookWorker | None, Depends(get_webhooks)]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id, as returned by POST /runs")]


def bearer_token(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 naming what is missing or malformed."""
    header = request.headers.get("authorization")
    if header is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing Authorization header: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "malformed Authorization header: expected 'Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return token


def get_run(run_id: RunId, store: StoreDep) -> sa.Row[Any]:
    run = store.get_run(run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown run {run_id}")
    return run


RunDep = Annotated[sa.Row[Any], Depends(get_run)]


def _is_admin(settings: Settings, token: str) -> bool:
    admin = settings.admin_token
    return admin is not None and hmac.compare_digest(admin.get_secret_value(), token)


def get_run_writer(run: RunDep, request: Request, store: StoreDep, settings: SettingsDep) -> sa.Row[Any]:
    """The run, if the bearer token is its own write token (or the admin token)."""
    token = bearer_token(request)
    if not (store.token_ok(run, token) or _is_admin(settings, token)):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"bearer token does not grant writes to run {run.id} "
                            "(each run has its own token, returned once by POST /runs)")
    return run


RunWriterDep = Annotated[sa.Row[Any], Depends(get_run_writer)]


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.admin_token is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "admin writes are disabled: the server has no admin token "
                            "(set DELTASCOPE_ADMIN_TOKEN)")
    if not _is_admin(settings, bearer_token(request)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "bearer token is not the admin token")


AdminDep = Depends(require_admin)
