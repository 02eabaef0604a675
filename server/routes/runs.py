"""Runs: register a training run (its write token is returned once), list, read, compare."""

from __future__ import annotations

import math
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, status

from server.deps import RunDep, StoreDep
from server.routes import BODY, errors
from server.schemas import MAX_ID, ComparePublic, RunCreate, RunCreated, RunPublic, RunsPublic, StatDelta
from server.store import Store

router = APIRouter(prefix="/runs", tags=["runs"])


def run_public(run: sa.Row[Any], firing: int) -> RunPublic:
    return RunPublic(id=run.id, name=run.name, created=run.created, updated=run.updated,
                     config=run.config, tags=run.tags, beta_max=run.beta_max,
                     last_step=run.last_step, verdict=run.verdict, firing=firing)


def one_public(store: Store, run: sa.Row[Any]) -> RunPublic:
    return run_public(run, store.firing_counts([run.id]).get(run.id, 0))


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(*BODY))
def create_run(body: RunCreate, store: StoreDep) -> RunCreated:
    """Register a run; the returned token authorises its writes and is never shown again."""
    run_id, token = store.create_run(body)
    return RunCreated(id=run_id, token=token)


@router.get("", responses=errors(422))
def read_runs(store: StoreDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> RunsPublic:
    """List runs, newest first."""
    rows, count = store.list_runs(limit, offset)
    firing = store.firing_counts([r.id for r in rows])
    return RunsPublic(data=[run_public(r, firing.get(r.id, 0)) for r in rows], count=count)


@router.get("/compare", responses=errors(404, 422))
def compare_runs(store: StoreDep, a: Annotated[int, Query(ge=1, le=MAX_ID)],
                 b: Annotated[int, Query(ge=1, le=MAX_ID)]) -> ComparePublic:
    """Latest stats of two runs side by side, with b - a per stat."""
    ra, rb = store.get_run(a), store.get_run(b)
    for rid, row in ((a, ra), (b, rb)):
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown run {rid}")
    la, lb = ra.latest or {}, rb.latest or {}
    stats = []
    for key in sorted(la.keys() | lb.keys()):
        va = la[key][1] if key in la else None
        vb = lb[key][1] if key in lb else None
        delta = vb - va if va is not None and vb is not None else None
        if delta is not None and not math.isfinite(delta):
            delta = None  # two huge values of opposite sign
        stats.append(StatDelta(key=key, a=va, b=vb, delta=delta))
    return ComparePublic(a=one_public(store, ra), b=one_public(store, rb), stats=stats)


@router.get("/{run_id}", responses=errors(404, 422))
def read_run(run: RunDep, store: StoreDep) -> RunPublic:
    """One run."""
    return one_public(store, run)
