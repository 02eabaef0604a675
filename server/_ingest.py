"""Pure helpers of the ingest path: flattening records into rows, merging the latest values, the
headline numbers of a ``stats`` event and the Slack text of a webhook. No database, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from server.catalogue import parse_key
from server.schemas import StatsRecord

HEADLINE_SCALARS = ("loss", "val_loss", "lr", "tokens_per_s")


def merge_latest(latest: dict[str, list[float]], records: Iterable[StatsRecord]) -> dict[str, list[float]]:
    """``latest`` maps key -> [step, value]; a record replaces a key unless a later step holds it."""
    out = dict(latest)
    for rec in records:
        step = rec.step
        for k, v in rec.scalars.items():
            cur = out.get(k)
            if cur is None or cur[0] <= step:
                out[k] = [step, v]
    return out


def headline(rec: StatsRecord) -> dict[str, Any]:
    """A few numbers for the live ``stats`` event: run scalars plus gate extremes over sites."""
    out: dict[str, Any] = {k: rec.scalars[k] for k in HEADLINE_SCALARS if k in rec.scalars}
    beta_mean: list[float] = []
    beta_p90: list[float] = []
    nonfinite = 0.0
    for k, v in rec.scalars.items():
        parsed = parse_key(k)
        if parsed is None:
            continue
        stat = parsed[0]
        if stat == "beta_mean":
            beta_mean.append(v)
        elif stat == "beta_p90":
            beta_p90.append(v)
        elif stat == "nonfinite":
            nonfinite += v
    if beta_mean:
        out["beta_mean"] = math.fsum(beta_mean) / len(beta_mean)
    if beta_p90:
        out["beta_p90_min"] = min(beta_p90)
    out["nonfinite"] = nonfinite
    return out


def slack_text(run_name: str, run_id: int, t: Mapping[str, Any]) -> str:
    """One line for a chat channel; ``t`` is a transition dict."""
    icon = ":white_check_mark:" if t["state"] == "resolved" else (
        ":rotating_light:" if t["severity"] == "critical" else ":warning:")
    return (f"{icon} deltascope [{t['severity']}] run {run_name!r} (#{run_id}) step {t['step']}: "
            f"{t['message']}")
