"""Stats: batched ingest (token-guarded, idempotent, durable before the 200) and the per-layer
reads built on it: latest values, a stat's history, a histogram's history."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status

from server.catalogue import HISTOGRAMS, parse_key
from server.catalogue import key as metric_key
from server.deps import BrokerDep, MetricsDep, RunDep, RunWriterDep, StoreDep, WebhooksDep
from server.routes import BODY, errors
from server.schemas import (
    MAX_STEP,
    AlertPublic,
    HistogramPoint,
    HistogramsPublic,
    HistoryPoint,
    HistoryPublic,
    IngestResult,
    LayersPublic,
    LayerStats,
    StatsBatch,
    TransitionPublic,
    hist_key_problem,
    scalar_key_problem,
)

router = APIRouter(prefix="/runs/{run_id}", tags=["stats"])

StepQ = Annotated[int, Query(ge=0, le=MAX_STEP)]
Site = Literal["attn", "mlp"]
HistName = Literal[tuple(HISTOGRAMS)]  # type: ignore[valid-type]


@router.post("/stats", responses=errors(401, 403, 404, *BODY))
def ingest_stats(batch: StatsBatch, run: RunWriterDep, store: StoreDep, broker: BrokerDep,
                 metrics: MetricsDep, webhooks: WebhooksDep) -> IngestResult:
    """Store a batch of log steps, then judge it with the run's detector.

    Idempotent on ``batch_id``: a replay answers ``duplicate: true`` and stores nothing. The 200
    comes after the commit, so an acknowledged batch survives a crash.
    """
    t0 = time.perf_counter()
    out = store.ingest(run.id, batch)
    metrics.seconds.observe(time.perf_counter() - t0)
    if out.duplicate:
        metrics.batches.labels("duplicate").inc()
    else:
        metrics.batches.labels("accepted").inc()
        metrics.records.inc(out.accepted)
        metrics.points.inc(out.points)
        broker.publish("stats", {"run_id": run.id, "step": out.last_step, "records": out.accepted,
                                 "points": out.points, **out.headline}, run.id)
        for t in out.transitions:
            metrics.transitions.labels(t["rule"], t["state"]).inc()
            broker.publish("alert", {"run_id": run.id, "run_name": run.name, **t}, run.id)
        if out.deliveries and webhooks is not None:
            webhooks.wake()
    return IngestResult(accepted=out.accepted, points=out.points, duplicate=out.duplicate,
                        alerts=[TransitionPublic(**t) for t in out.transitions], verdict=out.verdict,
                        firing=[AlertPublic(**a) for a in out.firing])


@router.get("/layers", responses=errors(404, 422))
def read_layers(run: RunDep) -> LayersPublic:
    """Latest value of every stat, per (site, layer), plus the run-wide scalars."""
    per: dict[tuple[str, int], dict[str, float]] = {}
    scalars: dict[str, float] = {}
    for k, (_step, v) in (run.latest or {}).items():
        parsed = parse_key(k)
        if parsed is None:
            scalars[k] = v
        else:
            stat, site, layer = parsed
            per.setdefault((site, layer), {})[stat] = v
    layers = [LayerStats(site=s, layer=layer, stats=per[(s, layer)])
              for s, layer in sorted(per, key=lambda sl: (sl[1], sl[0]))]
    return LayersPublic(run_id=run.id, last_step=run.last_step, layers=layers, scalars=scalars)


def _key(stat: str, site: str | None, layer: int | None, check: Callable[[str], str | None]) -> str:
    if (site is None) != (layer is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "give both 'site' and 'layer' for a per-site stat, or neither for a "
                            "run-wide one")
    k = stat if site is None or layer is None else metric_key(stat, site, layer)
    problem = check(k)
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"stat: {problem}")
    return k


@router.get("/history", responses=errors(404, 422))
def read_history(
    run: RunDep, store: StoreDep,
    stat: Annotated[str, Query(min_length=1, max_length=64, description="e.g. beta_p50 or loss")],
    site: Site | None = None,
    layer: Annotated[int | None, Query(ge=0, le=999)] = None,
    since_step: StepQ = 0,
    until_step: StepQ = MAX_STEP,
    max_points: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> HistoryPublic:
    """One stat over steps; past ``max_points`` it is averaged in equal step buckets."""
    k = _key(stat, site, layer, scalar_key_problem)
    total, down, pts = store.history(run.id, k, since_step, until_step, max_points)
    return HistoryPublic(run_id=run.id, key=k, total=total, downsampled=down, points=[
        HistoryPoint(step=s, value=v, min=lo, max=hi, n=n) for s, v, lo, hi, n in pts])


@router.get("/histograms", responses=errors(404, 422))
def read_histograms(
    run: RunDep, store: StoreDep,
    site: Site, layer: Annotated[int, Query(ge=0, le=999)],
    stat: HistName = "beta_hist",
    since_step: StepQ = 0,
    until_step: StepQ = MAX_STEP,
    max_points: Annotated[int, Query(ge=1, le=2_000)] = 200,
) -> HistogramsPublic:
    """One histogram (``beta_hist`` or ``h_norm_hist``) over steps, thinned by stride."""
    k = _key(stat, site, layer, hist_key_problem)
    total, rows = store.histograms(run.id, k, since_step, until_step, max_points)
    return HistogramsPublic(run_id=run.id, key=k, total=total, points=[
        HistogramPoint(step=r.step, lo=r.lo, hi=r.hi, counts=r.counts) for r in rows])
