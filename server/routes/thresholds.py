"""Thresholds: the detection thresholds in force (read by anyone, replaced by the admin)."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import AdminDep, StoreDep
from server.routes import BODY, errors
from server.thresholds import Thresholds

router = APIRouter(prefix="/thresholds", tags=["thresholds"])


@router.get("")
def read_thresholds(store: StoreDep) -> Thresholds:
    """The thresholds every run's detector uses now."""
    return store.thresholds()


@router.put("", dependencies=[AdminDep], responses=errors(401, 403, *BODY))
def update_thresholds(body: Thresholds, store: StoreDep) -> Thresholds:
    """Replace the thresholds (omitted fields take their documented defaults); admin token.
    Stored in the database, so they outlive restarts; later batches are judged with them."""
    store.set_thresholds(body)
    return body
