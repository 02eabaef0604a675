"""create_app(settings) -> FastAPI, and serve(settings) which runs it under uvicorn.

``create_app`` migrates the database (Alembic, to head) before it returns, so an app is ready to
answer; the lifespan starts and stops the webhook worker. Every client error is a 4xx
``{"detail": "..."}`` that names what is wrong; an unexpected exception is logged and answered
500 with no internals.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from server.db import make_engine, migrate
from server.events import Broker
from server.limits import BodyLimitMiddleware
from server.metrics import ServerMetrics
from server.routes import alerts, events, ops, runs, stats, thresholds
from server.settings import Settings
from server.store import Store
from server.webhooks import WebhookWorker

log = logging.getLogger("deltascope.server")
API_PREFIX = "/api/v1"


def _where(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = str(loc[0]) if loc and loc[0] in ("query", "path", "header") else ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier():
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out or "body"


def _validation_detail(exc: RequestValidationError) -> str:
    msgs = []
    for err in exc.errors()[:5]:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            msgs.append(f"malformed JSON body at character {loc[-1] if loc else '?'}: "
                        f"{ctx.get('error', err.get('msg'))}")
            continue
        msgs.append(f"{_where(loc)}: {err.get('msg')}")
    more = len(exc.errors()) - 5
    return "; ".join(msgs) + (f"; and {more} more" if more > 0 else "")


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service, ready to serve: database migrated, routers mounted, middleware in place."""
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    migrate(engine)
    store = Store(engine, settings.thresholds, settings.webhook_urls)
    metrics = ServerMetrics(store)
    webhooks = None
    if settings.webhook_urls:
        webhooks = WebhookWorker(store, settings.webhook_timeout_s, settings.webhook_max_attempts,
                                 settings.webhook_backoff_s,
                                 on_result=lambda r: metrics.webhooks.labels(r).inc())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if webhooks is not None:
            webhooks.start()
        try:
            yield
        finally:
            if webhooks is not None:
                webhooks.stop()
            engine.dispose()

    app = FastAPI(title="deltascope", version="0.1.0", lifespan=lifespan,
                  description="Live diagnostics and alerts for Deep Delta Learning training runs.")
    app.state.settings, app.state.store, app.state.broker = settings, store, Broker(settings.sse_queue_size)
    app.state.metrics, app.state.webhooks = metrics, webhooks

    api = APIRouter(prefix=API_PREFIX)
    for module in (runs, stats, alerts, thresholds, events):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(ops.router)

    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       max_depth=settings.max_json_depth)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def serve(settings: Settings | None = None) -> None:
    """Run the server under uvicorn (one worker) until interrupted."""
    import uvicorn

    settings = settings or Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level)
