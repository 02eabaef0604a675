"""The detection engine: eight rules over per-site stats, one state machine per alert.

Shared by the training job (probes call :meth:`Detector.evaluate` at each log step and act on the
transitions) and the server (which evaluates the same stream and persists each run's detector
through :meth:`Detector.state_dict`). Semantics follow Prometheus rules with Alertmanager-style
identity: an alert is (run, rule, site, layer) and moves inactive -> pending -> firing -> resolved,
with ``for_evals`` consecutive evaluations to fire and ``clear_evals`` past a separate clear
threshold (hysteresis) to resolve. Every threshold comes from :class:`server.thresholds.Thresholds`.

Torch-free and numpy-free on purpose: stdlib + pydantic only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from server.catalogue import SITES, parse_key
from server.thresholds import Thresholds

_STATE_VERSION = 1


class Severity(StrEnum):
    """How bad a firing alert is; any CRITICAL firing makes the run's verdict "failing"."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(StrEnum):
    """Where an alert identity stands; INACTIVE identities are not kept."""

    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Rule:
    """One detection rule: the stat it reads and, in ``doc``, its condition in threshold names."""

    name: str
    severity: Severity
    stat: str
    doc: str


RULES: tuple[Rule, ...] = (
    Rule("beta_collapse", Severity.WARNING, "beta_p90",
         "beta_p90 < collapse_beta (the layer skips for 90% of tokens); "
         "clears at beta_p90 >= collapse_clear_beta"),
    Rule("beta_saturation", Severity.WARNING, "beta_p10",
         "beta_p10 > beta_max - saturation_margin (90% of tokens reflect at full strength); "
         "clears at beta_p10 <= beta_max - saturation_clear_margin"),
    Rule("gate_logit_saturation", Severity.WARNING, "gate_logit_sat",
         "gate_logit_sat > logit_saturated_fraction (the gate gets no gradient); "
         "clears at gate_logit_sat <= logit_saturated_clear_fraction"),
    Rule("k_norm_collapse", Severity.CRITICAL, "h_norm_mean",
         "h_norm_mean < k_norm_min (eps shrinks k, the update degenerates); "
         "clears at h_norm_mean >= k_norm_clear"),
    Rule("k_norm_drift", Severity.WARNING, "h_norm_drift",
         "h_norm_drift > k_norm_drift_factor or < 1/k_norm_drift_factor; "
         "clears within [1/k_norm_drift_clear_factor, k_norm_drift_clear_factor]"),
    Rule("k_direction_collapse", Severity.WARNING, "k_abs_concentration",
         "k_abs_concentration > k_direction_concentration (every token writes along one line); "
         "clears at k_abs_concentration <= k_direction_clear_concentration"),
    Rule("k_direction_instability", Severity.WARNING, "k_cos_probe",
         "k_cos_probe (else k_cos_step, judged only where k_concentration >= "
         "k_instability_min_concentration) < k_instability_cos; clears at >= k_instability_clear_cos"),
    Rule("nonfinite", Severity.CRITICAL, "nonfinite",
         "nonfinite > 0 (or itself non-finite) for nonfinite_for_evals log steps; clears at nonfinite == 0"),
)
RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
_RULE_BY_NAME: dict[str, Rule] = {r.name: r for r in RULES}


def _json_float(x: float) -> float | None:
    """Strict JSON has no NaN/Inf: those travel as null."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Transition:
    """One change of an alert's state at one log step, as emitted by :meth:`Detector.evaluate`.

    ``threshold`` is the fire threshold, except on a move to RESOLVED, where it is the clear one.
    """

    run: str
    rule: str
    site: str
    layer: int
    severity: Severity
    prev: AlertState
    state: AlertState
    step: int
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(severity=str(self.severity), prev=str(self.prev), state=str(self.state),
                 value=_json_float(self.value), threshold=_json_float(self.threshold))
        return d


@dataclass
class Alert:
    """A pending, firing or resolved alert; value, threshold and message are those of the
    transition that put it in ``state`` at ``since_step``."""

    run: str
    rule: str
    site: str
    layer: int
    severity: Severity
    state: AlertState
    since_step: int
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(severity=str(self.severity), state=str(self.state),
                 value=_json_float(self.value), threshold=_json_float(self.threshold))
        return d


class _Check(NamedTuple):
    """One rule judged on one identity's stats; ``fires`` and ``clears`` are never both true.
    A NamedTuple: ~200 are built per log step, and a frozen dataclass costs 3x as much."""

    stat: str
    value: float
    fires: bool
    clears: bool
    fire_op: str
    fire_at: float
    clear_op: str
    clear_at: float


def _below(stat: str, v: float, fire_at: float, clear_at: float) -> _Check:
    return _Check(stat, v, v < fire_at, v >= clear_at, "<", fire_at, ">=", clear_at)


def _above(stat: str, v: float, fire_at: float, clear_at: float) -> _Check:
    return _Check(stat, v, v > fire_at, v <= clear_at, ">", fire_at, "<=", clear_at)


def _judge(rule: Rule, stats: Mapping[str, float], t: Thresholds, beta_max: float) -> _Check | None:
    """The rule's verdict on one (site, layer), or None when it is not evaluated this step."""
    if rule.name == "k_direction_instability":
        stat = "k_cos_probe" if "k_cos_probe" in stats else "k_cos_step"
        if stat == "k_cos_step":
            # the mean direction of scattered k is noise: judge its step-to-step cosine only
            # where the tokens agree on a direction (a missing or NaN concentration fails this)
            conc = stats.get("k_concentration", math.nan)
            if not conc >= t.k_instability_min_concentration:
                return None
    else:
        stat = rule.stat
    v = stats.get(stat)
    if v is None:
        return None
    if rule.name == "nonfinite":
        bad = not math.isfinite(v) or v > 0  # a non-finite count is itself a non-finite value
        return _Check(stat, v, bad, not bad, ">", 0.0, "==", 0.0)
    if not math.isfinite(v):
        return None  # no data: the identity keeps its state and counters
    match rule.name:
        case "beta_collapse":
            return _below(stat, v, t.collapse_beta, t.collapse_clear_beta)
        case "beta_saturation":
            return _above(stat, v, beta_max - t.saturation_margin, beta_max - t.saturation_clear_margin)
        case "gate_logit_saturation":
            return _above(stat, v, t.logit_saturated_fraction, t.logit_saturated_clear_fraction)
        case "k_norm_collapse":
            return _below(stat, v, t.k_norm_min, t.k_norm_clear)
        case "k_norm_drift":
            # two-sided: judge against the side of 1 the ratio is on
            if v >= 1:
                return _above(stat, v, t.k_norm_drift_factor, t.k_norm_drift_clear_factor)
            return _below(stat, v, 1 / t.k_norm_drift_factor, 1 / t.k_norm_drift_clear_factor)
        case "k_direction_collapse":
            return _above(stat, v, t.k_direction_concentration, t.k_direction_clear_concentration)
        case "k_direction_instability":
            return _below(stat, v, t.k_instability_cos, t.k_instability_clear_cos)
    raise AssertionError(f"rule {rule.name} has no condition")


@dataclass
class _Track:
    """Internal state of one identity. ``count`` is the run of consecutive evaluations toward the
    next state: firing ones while PENDING, clearing ones while FIRING, unused otherwise."""

    state: AlertState
    since_step: int
    count: int
    value: float
    threshold: float
    message: str


def _where(site: str, layer: int) -> str:
    return f"{site} L{layer:02d}"


def _steps(n: int) -> str:
    return f"{n} log step" if n == 1 else f"{n} log steps"


class Detector:
    """Evaluates every rule on every (site, layer) of a run at each log step.

    Not thread-safe; one per run. ``beta_max`` (2.0 or 1.0) sets where beta saturates.
    ``state_dict``/``load_state_dict`` carry the run, ``beta_max`` and every non-inactive identity
    with its counters; thresholds are not persisted (they come from the environment).
    """

    def __init__(self, thresholds: Thresholds, beta_max: float = 2.0, run: str = "") -> None:
        if not beta_max > 0:
            raise ValueError(f"beta_max must be positive, got {beta_max}")
        self.thresholds = thresholds
        self.beta_max = beta_max
        self.run = run
        self._tracks: dict[tuple[str, str, int], _Track] = {}

    def evaluate(self, step: int, scalars: Mapping[str, float]) -> list[Transition]:
        """Judge one log step's scalars; returns the transitions, by site, layer, then rule order."""
        per_site: dict[tuple[str, int], dict[str, float]] = {}
        for k, v in scalars.items():
            parsed = parse_key(k)
            if parsed is not None:
                stat, site, layer = parsed
                per_site.setdefault((site, layer), {})[stat] = float(v)
        return self.evaluate_sites(step, per_site)

    def evaluate_sites(self, step: int, per_site: Mapping[tuple[str, int], Mapping[str, float]]
                       ) -> list[Transition]:
        """:meth:`evaluate` on stats already grouped by (site, layer) (the probe has them so)."""
        out: list[Transition] = []
        for site, layer in sorted(per_site, key=lambda sl: (SITES.index(sl[0]), sl[1])):
            stats = per_site[(site, layer)]
            for rule in RULES:
                check = _judge(rule, stats, self.thresholds, self.beta_max)
                if check is not None:
                    tr = self._advance(rule, site, layer, step, check)
                    if tr is not None:
                        out.append(tr)
        return out

    def _advance(self, rule: Rule, site: str, layer: int, step: int, c: _Check) -> Transition | None:
        t = self.thresholds
        need = t.nonfinite_for_evals if rule.name == "nonfinite" else t.for_evals
        ident = (rule.name, site, layer)
        track = self._tracks.get(ident)
        prev = track.state if track is not None else AlertState.INACTIVE
        if not c.fires and prev in (AlertState.INACTIVE, AlertState.RESOLVED):
            return None  # the common case, every site at every log step: no string formatting
        seen = f"on {_where(site, layer)}: {c.stat}={c.value:.4g}"

        if prev in (AlertState.INACTIVE, AlertState.RESOLVED):
            state = AlertState.FIRING if need == 1 else AlertState.PENDING
            tail = f"for {_steps(1)}" if need == 1 else f"(1 of {_steps(need)})"
            msg = f"{rule.name} {state} {seen} {c.fire_op} {c.fire_at:.4g} {tail}"
            new = _Track(state, step, 0 if need == 1 else 1, c.value, c.fire_at, msg)
        elif prev is AlertState.PENDING:
            assert track is not None
            if c.fires:
                track.count += 1
                if track.count < need:
                    return None
                state = AlertState.FIRING
                msg = f"{rule.name} {state} {seen} {c.fire_op} {c.fire_at:.4g} for {_steps(track.count)}"
                new = _Track(state, step, 0, c.value, c.fire_at, msg)
            else:
                state = AlertState.INACTIVE
                msg = f"{rule.name} {state} {seen}, no longer {c.fire_op} {c.fire_at:.4g}"
                new = None
        else:  # FIRING: only consecutive clearing evaluations count; the band or a relapse resets
            assert track is not None
            track.count = track.count + 1 if c.clears else 0
            if track.count < t.clear_evals:
                return None
            state = AlertState.RESOLVED
            msg = f"{rule.name} {state} {seen} {c.clear_op} {c.clear_at:.4g} for {_steps(track.count)}"
            new = _Track(state, step, 0, c.value, c.clear_at, msg)

        if new is None:
            del self._tracks[ident]
        else:
            self._tracks[ident] = new
        return Transition(self.run, rule.name, site, layer, rule.severity, prev, state, step,
                          c.value, new.threshold if new else c.fire_at, msg)

    def alerts(self, include_resolved: bool = False) -> list[Alert]:
        """Pending and firing alerts (and resolved ones if asked), in rule order, site, layer."""
        keep = {AlertState.PENDING, AlertState.FIRING}
        if include_resolved:
            keep.add(AlertState.RESOLVED)
        order = {name: i for i, name in enumerate(RULE_NAMES)}
        idents = sorted(self._tracks, key=lambda i: (order[i[0]], SITES.index(i[1]), i[2]))
        return [
            Alert(self.run, rule, site, layer, _RULE_BY_NAME[rule].severity, tr.state,
                  tr.since_step, tr.value, tr.threshold, tr.message)
            for rule, site, layer in idents
            if (tr := self._tracks[(rule, site, layer)]).state in keep
        ]

    def firing(self) -> list[Alert]:
        """Only the firing alerts."""
        return [a for a in self.alerts() if a.state is AlertState.FIRING]

    def verdict(self) -> str:
        """"failing" if any critical alert fires, "warning" if any alert fires, else "healthy"."""
        firing = self.firing()
        if any(a.severity is Severity.CRITICAL for a in firing):
            return "failing"
        return "warning" if firing else "healthy"

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe snapshot (non-finite values become null) for persisting across restarts."""
        return {
            "version": _STATE_VERSION,
            "run": self.run,
            "beta_max": self.beta_max,
            "alerts": [
                {"rule": rule, "site": site, "layer": layer, "state": str(tr.state),
                 "since_step": tr.since_step, "count": tr.count, "value": _json_float(tr.value),
                 "threshold": _json_float(tr.threshold), "message": tr.message}
                for (rule, site, layer), tr in self._tracks.items()
            ],
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Replace this detector's run, beta_max and alerts with a :meth:`state_dict` snapshot."""
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported detector state version {d.get('version')!r}")
        tracks: dict[tuple[str, str, int], _Track] = {}
        for a in d["alerts"]:
            if a["rule"] not in _RULE_BY_NAME:
                continue  # a rule retired since the snapshot: its alerts go with it
            state = AlertState(a["state"])
            if state is AlertState.INACTIVE:
                continue
            nan = math.nan
            tracks[(a["rule"], a["site"], int(a["layer"]))] = _Track(
                state, int(a["since_step"]), int(a["count"]),
                nan if a["value"] is None else float(a["value"]),
                nan if a["threshold"] is None else float(a["threshold"]), str(a["message"]),
            )
        beta_max = float(d["beta_max"])
        if not beta_max > 0:
            raise ValueError(f"beta_max must be positive, got {beta_max}")
        self.run, self.beta_max, self._tracks = str(d["run"]), beta_max, tracks
