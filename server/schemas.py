"""The wire contract of the HTTP API: request and response bodies, and the metric-key rules.

Torch-free and FastAPI-free (pydantic only): ``probes.http_sink`` imports the key checks from here
so a job never sends a batch the server would refuse. Naming follows one ladder per resource:
``RunCreate`` -> ``RunPublic`` / ``RunsPublic``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from server.catalogue import BY_NAME, HISTOGRAMS, parse_key

MAX_STEP = 2**62
MAX_ID = 2**63 - 1
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"

_SITE_KEY = r"/(attn|mlp)/L[0-9]{2,3}"
SCALAR_KEY_PATTERN = (f"^(({'|'.join(BY_NAME)}){_SITE_KEY}|(?!({'|'.join(BY_NAME)})$)"
                      r"[A-Za-z_][A-Za-z0-9_.\-]{0,63})$")
"""Documents (in OpenAPI) what :func:`scalar_key_problem` accepts; the check itself is that function."""
HIST_KEY_PATTERN = f"^({'|'.join(HISTOGRAMS)}){_SITE_KEY}$"

FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
UtcDatetime = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=UTC))]
"""The database keeps naive UTC; the API always says so."""
Step = Annotated[int, Field(ge=0, le=MAX_STEP, strict=True)]


@lru_cache(maxsize=65536)
def scalar_key_problem(key: str) -> str | None:
    """Why ``key`` is not an acceptable scalar key, or None when it is.

    Accepted: canonical per-site keys of catalogued stats (``beta_p90/attn/L03``) and plain names
    without a slash (``loss``, ``lr``, ``val_loss``, ``tokens_per_s``).
    """
    parsed = parse_key(key)
    if parsed is not None:
        if parsed[0] not in BY_NAME:
            return f"unknown stat {parsed[0]!r} in key {key!r} (not in server.catalogue.STATS)"
        return None
    if "/" in key:
        return f"key {key!r} is not canonical: per-site keys read 'stat/site/Lnn', e.g. 'beta_p90/attn/L03'"
    if not _PLAIN_KEY.match(key):
        return f"key {key!r} is not a plain name: letters, digits, '_', '.', '-', at most 64 chars"
    if key in BY_NAME:
        return f"key {key!r} is a per-site stat: send it as '{key}/<site>/Lnn', e.g. '{key}/attn/L03'"
    return None


@lru_cache(maxsize=4096)
def hist_key_problem(key: str) -> str | None:
    """Why ``key`` is not an acceptable histogram key (``beta_hist/attn/L03``), or None."""
    parsed = parse_key(key)
    if parsed is None:
        return f"histogram key {key!r} is not canonical: 'beta_hist/attn/L03'"
    if parsed[0] not in HISTOGRAMS:
        return f"unknown histogram {parsed[0]!r} in key {key!r} (known: {', '.join(HISTOGRAMS)})"
    return None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)


class ErrorResponse(_Out):
    """Every 4xx: one message that names the field, key or header at fault."""

    detail: str


class Message(_Out):
    message: str


# -- runs -------------------------------------------------------------------------------------------


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        raise ValueError(f"{where} is nested deeper than 16 levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds a non-finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", depth + 1)


class RunCreate(_In):
    """A training run to register; its write token comes back once, in ``RunCreated``."""

    name: str = Field(min_length=1, max_length=200, pattern=_NO_CONTROL)
    """Human name; not unique (a restarted job registers a new run)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The job's configuration (JSON object, finite numbers, at most 16 levels deep)."""
    tags: dict[
        Annotated[str, Field(min_length=1, max_length=64, pattern=_NO_CONTROL)],
        Annotated[str, Field(max_length=256, pattern=_NO_CONTROL)],
    ] = Field(default_factory=dict, max_length=64)
    """Free-form labels, e.g. ``{"ablation": "beta_max=1"}``."""
    beta_max: float = Field(2.0, gt=0, le=16, allow_inf_nan=False, strict=True)
    """Upper end of beta's range for this run (2.0 as in the paper, 1.0 for the [0, 1] ablation)."""

    @field_validator("config")
    @classmethod
    def _finite_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_json(v, "config")
        return v


class RunCreated(_Out):
    id: int
    token: str
    """Bearer token for this run's writes. Shown once: the server keeps only its SHA-256."""


class RunPublic(_Out):
    id: int
    name: str
    created: UtcDatetime
    updated: UtcDatetime
    config: dict[str, Any]
    tags: dict[str, str]
    beta_max: float
    last_step: int | None
    """Highest step ingested so far (None before the first batch)."""
    verdict: Literal["healthy", "warning", "failing"]
    """"failing" if a critical alert fires, "warning" if any fires, else "healthy"."""
    firing: int
    """Number of firing alerts."""


class RunsPublic(_Out):
    data: list[RunPublic]
    count: int


# -- ingest -----------------------------------------------------------------------------------------


class HistogramIn(_In):
    lo: FiniteFloat
    hi: FiniteFloat
    counts: list[Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]] = Field(
        min_length=1, max_length=4096
    )

    @model_validator(mode="after")
    def _range(self) -> HistogramIn:
        if not self.lo < self.hi:
            raise ValueError(f"histogram range must have lo < hi, got lo={self.lo}, hi={self.hi}")
        return self


class StatsRecord(_In):
    """One log step: canonical scalar keys (finite floats) and fixed-bin histograms."""

    step: Step
    scalars: dict[str, FiniteFloat] = Field(
        default_factory=dict, max_length=100_000,
        json_schema_extra={"propertyNames": {"pattern": SCALAR_KEY_PATTERN}})
    """Canonical per-site keys (``beta_p90/attn/L03``) or plain run-wide names (``loss``)."""
    hists: dict[str, HistogramIn] = Field(
        default_factory=dict, max_length=10_000,
        json_schema_extra={"propertyNames": {"pattern": HIST_KEY_PATTERN}})
    """Canonical histogram keys (``beta_hist/attn/L03``)."""

    @field_validator("scalars")
    @classmethod
    def _scalar_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if (problem := scalar_key_problem(k)) is not None:
                raise ValueError(problem)
        return v

    @field_validator("hists")
    @classmethod
    def _hist_keys(cls, v: dict[str, HistogramIn]) -> dict[str, HistogramIn]:
        for k in v:
            if (problem := hist_key_problem(k)) is not None:
                raise ValueError(problem)
        return v


class StatsBatch(_In):
    """A batch of log steps; ``batch_id`` makes the POST idempotent (a replay stores nothing)."""

    batch_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    records: list[StatsRecord] = Field(min_length=1, max_length=10_000)


class TransitionPublic(_Out):
    """One alert state change (``server.rules.Transition.to_dict()`` plus the stored alert's id)."""

    alert_id: int
    run: str
    rule: str
    site: str
    layer: int
    severity: Literal["info", "warning", "critical"]
    prev: Literal["inactive", "pending", "firing", "resolved"]
    state: Literal["inactive", "pending", "firing", "resolved"]
    step: int
    value: float | None
    threshold: float | None
    message: str


class AlertPublic(_Out):
    id: int
    run_id: int
    rule: str
    site: str
    layer: int
    severity: Literal["info", "warning", "critical"]
    state: Literal["inactive", "pending", "firing", "resolved"]
    since_step: int
    """Step of the transition into ``state``."""
    last_step: int
    value: float | None
    threshold: float | None
    message: str
    acknowledged: bool
    silenced_until: UtcDatetime | None
    """While in the future, the alert's transitions are not sent to webhooks."""
    updated: UtcDatetime


class AlertsPublic(_Out):
    data: list[AlertPublic]
    count: int


class IngestResult(_Out):
    accepted: int
    """Records stored by this request (0 for a duplicate)."""
    points: int
    """Scalars stored by this request."""
    duplicate: bool
    """True when ``batch_id`` was already stored: the replay changed nothing."""
    alerts: list[TransitionPublic]
    """Transitions the server's detector produced on this batch, in step order."""
    verdict: Literal["healthy", "warning", "failing"]
    firing: list[AlertPublic]


# -- diagnostics ------------------------------------------------------------------------------------


class LayerStats(_Out):
    site: str
    layer: int
    stats: dict[str, float]
    """Latest value of every stat of this (site, layer)."""


class LayersPublic(_Out):
    run_id: int
    last_step: int | None
    layers: list[LayerStats]
    scalars: dict[str, float]
    """Latest run-wide scalars (loss, lr, ...)."""


class HistoryPoint(_Out):
    step: int
    """Last step of the bucket (the step itself when not downsampled)."""
    value: float
    """Mean over the bucket."""
    min: float
    max: float
    n: int
    """Points in the bucket."""


class HistoryPublic(_Out):
    run_id: int
    key: str
    total: int
    """Points stored in the requested step range."""
    downsampled: bool
    points: list[HistoryPoint]


class HistogramPoint(_Out):
    step: int
    lo: float
    hi: float
    counts: list[float]


class HistogramsPublic(_Out):
    run_id: int
    key: str
    total: int
    points: list[HistogramPoint]


class StatDelta(_Out):
    key: str
    a: float | None
    b: float | None
    delta: float | None
    """b - a where both runs have the stat."""


class ComparePublic(_Out):
    a: RunPublic
    b: RunPublic
    stats: list[StatDelta]


class HealthPublic(_Out):
    run_id: int
    verdict: Literal["healthy", "warning", "failing"]
    firing: list[AlertPublic]


class SilenceRequest(_In):
    minutes: float = Field(gt=0, le=60 * 24 * 365, allow_inf_nan=False, strict=True)
    """How long webhooks stay quiet for this alert."""


class Healthz(_Out):
    status: Literal["ok"]
    db: Literal["ok"]
