"""The detection engine: every rule's boundaries, the alert state machine, identity and persistence.

Boundary values sit a relative 1e-6 either side of each threshold of a default ``Thresholds()``,
plus the threshold itself (which belongs to the healthy side of a strict fire comparison and to
the clearing side of an inclusive clear comparison).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from server.catalogue import STAT_NAMES, key
from server.rules import (
    RULE_NAMES,
    RULES,
    AlertState,
    Detector,
    Rule,
    Severity,
    Transition,
)
from server.thresholds import Thresholds

T = Thresholds()
EPS = 1e-6
P, F, R, I = AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED, AlertState.INACTIVE


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default thresholds mean defaults: no override leaks in from the caller's shell."""
    for name in list(os.environ):
        if name.upper().startswith("DELTASCOPE_THRESHOLDS__"):
            monkeypatch.delenv(name)


@dataclass(frozen=True)
class Case:
    """One rule (or one side of it): how its stats look for a value, and values near each edge."""

    id: str
    rule: str
    stats: Callable[[float], dict[str, float]]
    fires: tuple[float, ...]  # just past the fire threshold
    calm: tuple[float, ...]  # on it, or just short of it
    clears: tuple[float, ...]  # on the clear threshold, or just past it
    holds: tuple[float, ...]  # just short of the clear threshold: the hysteresis band


def one(stat: str) -> Callable[[float], dict[str, float]]:
    return lambda v: {stat: v}


def below(rule: str, stats: Callable[[float], dict[str, float]], fire: float, clear: float) -> Case:
    e, c = fire * EPS, clear * EPS
    return Case(rule, rule, stats, (fire - e,), (fire, fire + e), (clear, clear + c), (clear - c,))


def above(rule: str, stats: Callable[[float], dict[str, float]], fire: float, clear: float) -> Case:
    e, c = fire * EPS, clear * EPS
    return Case(rule, rule, stats, (fire + e,), (fire, fire - e), (clear, clear - c), (clear + c,))


def cos_step(v: float) -> dict[str, float]:
    return {"k_cos_step": v, "k_concentration": 0.9}


def with_id(case: Case, id: str) -> Case:
    return Case(id, case.rule, case.stats, case.fires, case.calm, case.clears, case.holds)


CASES = [
    below("beta_collapse", one("beta_p90"), T.collapse_beta, T.collapse_clear_beta),
    above("beta_saturation", one("beta_p10"), 2.0 - T.saturation_margin, 2.0 - T.saturation_clear_margin),
    above("gate_logit_saturation", one("gate_logit_sat"),
          T.logit_saturated_fraction, T.logit_saturated_clear_fraction),
    below("k_norm_collapse", one("h_norm_mean"), T.k_norm_min, T.k_norm_clear),
    with_id(above("k_norm_drift", one("h_norm_drift"), T.k_norm_drift_factor, T.k_norm_drift_clear_factor),
            "k_norm_drift-up"),
    with_id(below("k_norm_drift", one("h_norm_drift"),
                  1 / T.k_norm_drift_factor, 1 / T.k_norm_drift_clear_factor), "k_norm_drift-down"),
    above("k_direction_collapse", one("k_abs_concentration"),
          T.k_direction_concentration, T.k_direction_clear_concentration),
    with_id(below("k_direction_instability", one("k_cos_probe"), T.k_instability_cos,
                  T.k_instability_clear_cos), "k_direction_instability-probe"),
    with_id(below("k_direction_instability", cos_step, T.k_instability_cos, T.k_instability_clear_cos),
            "k_direction_instability-step"),
    Case("nonfinite", "nonfinite", one("nonfinite"), (EPS, 1.0, math.inf, math.nan), (0.0,), (0.0,), (EPS,)),
]


def sc(stats: dict[str, float], site: str = "attn", layer: int = 3) -> dict[str, float]:
    return {key(stat, site, layer): v for stat, v in stats.items()}


def need(rule: str) -> int:
    return T.nonfinite_for_evals if rule == "nonfinite" else T.for_evals


def ours(trs: list[Transition], rule: str) -> list[Transition]:
    return [t for t in trs if t.rule == rule]


def drive_to_firing(d: Detector, case: Case, step: int = 0) -> int:
    for _ in range(need(case.rule)):
        step += 1
        d.evaluate(step, sc(case.stats(case.fires[0])))
    assert [a.state for a in d.alerts() if a.rule == case.rule] == [F]
    return step


# -- boundaries: each rule, each side of the fire and of the clear threshold ----------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fire_boundary(case: Case) -> None:
    for v in case.fires:
        d = Detector(Thresholds())
        trs = ours(d.evaluate(1, sc(case.stats(v))), case.rule)
        assert [(t.prev, t.state) for t in trs] == [(I, P if need(case.rule) > 1 else F)], v
    for v in case.calm:
        d = Detector(Thresholds())
        assert ours(d.evaluate(1, sc(case.stats(v))), case.rule) == [], v
        assert d.alerts() == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_clear_boundary(case: Case) -> None:
    for v in case.clears:
        d = Detector(Thresholds())
        step = drive_to_firing(d, case)
        trs = [t for s in range(T.clear_evals) for t in ours(d.evaluate(step + 1 + s, sc(case.stats(v))), case.rule)]
        assert [(t.prev, t.state) for t in trs] == [(F, R)], v
    for v in case.holds:
        d = Detector(Thresholds())
        step = drive_to_firing(d, case)
        for s in range(3 * T.clear_evals):
            assert ours(d.evaluate(step + 1 + s, sc(case.stats(v))), case.rule) == [], v
        assert [a.state for a in d.alerts()] == [F]


# -- the state machine -----------------------------------------------------------------------------


@pytest.mark.parametrize("for_evals", [1, 2, 3, 5])
def test_pending_fires_after_exactly_for_evals(for_evals: int) -> None:
    d = Detector(Thresholds(for_evals=for_evals))
    got = [d.evaluate(s, sc({"beta_p90": 0.01})) for s in range(1, for_evals + 2)]
    if for_evals == 1:
        assert [(t.prev, t.state, t.step) for t in got[0]] == [(I, F, 1)]
    else:
        assert [(t.prev, t.state, t.step) for t in got[0]] == [(I, P, 1)]
        assert all(g == [] for g in got[1:for_evals - 1])
        assert [(t.prev, t.state, t.step) for t in got[for_evals - 1]] == [(P, F, for_evals)]
    assert got[for_evals] == []
    assert d.firing()[0].since_step == for_evals


def test_pending_breaks_to_inactive() -> None:
    d = Detector(Thresholds())
    d.evaluate(1, sc({"beta_p90": 0.01}))
    d.evaluate(2, sc({"beta_p90": 0.01}))
    # the band (between fire and clear) is not the condition: pending drops to inactive
    trs = d.evaluate(3, sc({"beta_p90": 0.07}))
    assert [(t.prev, t.state) for t in trs] == [(P, I)]
    assert "no longer < 0.05" in trs[0].message
    assert d.alerts(include_resolved=True) == []
    # the count starts over
    assert [t.state for t in d.evaluate(4, sc({"beta_p90": 0.01}))] == [P]
    assert d.evaluate(5, sc({"beta_p90": 0.01})) == []
    assert [t.state for t in d.evaluate(6, sc({"beta_p90": 0.01}))] == [F]


def test_hysteresis_band_resets_clear_count() -> None:
    d = Detector(Thresholds())
    step = drive_to_firing(d, CASES[0])
    for v in (0.2, 0.07, 0.2, 0.01, 0.2):  # clear, band, clear, relapse, clear: never two in a row
        step += 1
        assert d.evaluate(step, sc({"beta_p90": v})) == []
    assert [a.state for a in d.alerts()] == [F]
    trs = d.evaluate(step + 1, sc({"beta_p90": 0.2}))
    assert [(t.prev, t.state, t.threshold) for t in trs] == [(F, R, T.collapse_clear_beta)]


@pytest.mark.parametrize("clear_evals", [1, 2, 4])
def test_resolved_after_exactly_clear_evals(clear_evals: int) -> None:
    d = Detector(Thresholds(clear_evals=clear_evals))
    step = drive_to_firing(d, CASES[0])
    got = [d.evaluate(step + s, sc({"beta_p90": 0.5})) for s in range(1, clear_evals + 2)]
    assert all(g == [] for g in got[:clear_evals - 1])
    assert [(t.prev, t.state) for t in got[clear_evals - 1]] == [(F, R)]
    assert got[clear_evals] == []
    assert d.alerts() == []
    (a,) = d.alerts(include_resolved=True)
    assert (a.state, a.since_step) == (R, step + clear_evals)


def test_recurrence_after_resolved() -> None:
    d = Detector(Thresholds(), run="r1")
    step = drive_to_firing(d, CASES[0])
    for _ in range(T.clear_evals):
        step += 1
        d.evaluate(step, sc({"beta_p90": 0.5}))
    trs = d.evaluate(step + 1, sc({"beta_p90": 0.01}))
    assert [(t.run, t.prev, t.state) for t in trs] == [("r1", R, P)]
    d.evaluate(step + 2, sc({"beta_p90": 0.01}))
    assert [(t.prev, t.state) for t in d.evaluate(step + 3, sc({"beta_p90": 0.01}))] == [(P, F)]


def test_nonfinite_fires_at_once_and_is_critical() -> None:
    d = Detector(Thresholds())
    (t,) = d.evaluate(7, sc({"nonfinite": 3.0}))
    assert (t.rule, t.prev, t.state, t.severity, t.step) == ("nonfinite", I, F, Severity.CRITICAL, 7)
    assert d.verdict() == "failing"
    # nonfinite_for_evals, not for_evals, governs it
    d = Detector(Thresholds(nonfinite_for_evals=2, for_evals=5))
    assert [t.state for t in d.evaluate(1, sc({"nonfinite": 1.0}))] == [P]
    assert [t.state for t in d.evaluate(2, sc({"nonfinite": 1.0}))] == [F]


def test_nan_is_no_data_for_other_rules() -> None:
    d = Detector(Thresholds())
    assert d.evaluate(1, sc({"beta_p90": math.nan, "h_norm_mean": math.inf, "k_cos_probe": -math.inf})) == []
    assert d.alerts() == []
    d.evaluate(2, sc({"beta_p90": 0.01}))
    d.evaluate(3, sc({"beta_p90": 0.01}))
    assert d.evaluate(4, sc({"beta_p90": math.nan})) == []  # does not break the pending run ...
    (a,) = d.alerts()
    assert (a.state, a.since_step) == (P, 2)
    assert [t.state for t in d.evaluate(5, sc({"beta_p90": 0.01}))] == [F]  # ... nor count toward it


def test_absent_stats_change_nothing() -> None:
    d = Detector(Thresholds())
    step = drive_to_firing(d, CASES[0])
    assert d.evaluate(step + 1, sc({"beta_p90": 0.5})) == []
    assert d.evaluate(step + 2, {"loss": 3.0, **sc({"beta_mean": 0.3})}) == []
    assert d.evaluate(step + 3, {}) == []
    # the clear run spans the steps without beta_p90
    assert [t.state for t in d.evaluate(step + 4, sc({"beta_p90": 0.5}))] == [R]


def test_non_site_keys_are_ignored() -> None:
    d = Detector(Thresholds())
    assert d.evaluate(1, {"loss": math.nan, "lr": 0.0, "nonfinite": 5.0, "beta_p90/attn": 0.0}) == []


def test_identities_are_independent() -> None:
    d = Detector(Thresholds(for_evals=2), run="r")
    bad, ok = {"beta_p90": 0.01}, {"beta_p90": 0.5}
    d.evaluate(1, {**sc(bad, "attn", 1), **sc(ok, "attn", 2), **sc(bad, "mlp", 1)})
    trs = d.evaluate(2, {**sc(bad, "attn", 1), **sc(bad, "attn", 2), **sc(ok, "mlp", 1)})
    assert [(t.site, t.layer, t.prev, t.state) for t in trs] == [
        ("attn", 1, P, F), ("attn", 2, I, P), ("mlp", 1, P, I),
    ]
    assert [(a.run, a.site, a.layer, a.state) for a in d.alerts()] == [("r", "attn", 1, F), ("r", "attn", 2, P)]
    # two rules on one (site, layer) are two identities too
    trs = d.evaluate(3, sc({"beta_p90": 0.01, "h_norm_mean": 1e-6}, "attn", 1))
    assert [(t.rule, t.state) for t in trs] == [("k_norm_collapse", P)]


def test_beta_max_one_moves_saturation() -> None:
    v = 1.0 - T.saturation_margin + EPS  # saturated under beta_max=1, mid-range under beta_max=2
    assert Detector(Thresholds()).evaluate(1, sc({"beta_p10": v})) == []
    d = Detector(Thresholds(), beta_max=1.0)
    (t,) = d.evaluate(1, sc({"beta_p10": v}))
    assert (t.rule, t.state, t.threshold) == ("beta_saturation", P, pytest.approx(0.95))
    with pytest.raises(ValueError, match="beta_max"):
        Detector(Thresholds(), beta_max=0.0)


def test_verdict() -> None:
    d = Detector(Thresholds())
    assert d.verdict() == "healthy"
    d.evaluate(1, sc({"beta_p90": 0.01}))
    assert d.verdict() == "healthy"  # pending does not count
    drive_to_firing(d, CASES[0], step=1)
    assert d.verdict() == "warning"
    d.evaluate(10, sc({"nonfinite": 1.0}, "mlp", 0))
    assert d.verdict() == "failing"
    assert [a.rule for a in d.firing()] == ["beta_collapse", "nonfinite"]


# -- k_direction_instability: which cosine, and when ------------------------------------------------


def test_instability_prefers_probe_cosine() -> None:
    d = Detector(Thresholds(for_evals=1))
    # a healthy probe cosine wins over a bad step cosine
    assert d.evaluate(1, sc({"k_cos_probe": 0.9, "k_cos_step": 0.0, "k_concentration": 1.0})) == []
    (t,) = d.evaluate(2, sc({"k_cos_probe": 0.1, "k_cos_step": 0.9, "k_concentration": 1.0}))
    assert (t.state, t.message) == (F, "k_direction_instability firing on attn L03: k_cos_probe=0.1 < 0.3 "
                                       "for 1 log step")
    # a NaN probe cosine is no data: no fallback to k_cos_step
    assert d.evaluate(3, sc({"k_cos_probe": math.nan, "k_cos_step": 0.9, "k_concentration": 1.0})) == []
    assert d.evaluate(4, sc({"k_cos_probe": math.nan, "k_cos_step": 0.9, "k_concentration": 1.0})) == []
    assert [a.state for a in d.alerts()] == [F]


def test_instability_step_cosine_needs_concentration() -> None:
    m = T.k_instability_min_concentration
    for conc in (m - m * EPS, 0.0, math.nan, None):
        d = Detector(Thresholds(for_evals=1))
        stats = {"k_cos_step": 0.0} if conc is None else {"k_cos_step": 0.0, "k_concentration": conc}
        assert d.evaluate(1, sc(stats)) == [], conc
    for conc in (m, m + m * EPS):
        d = Detector(Thresholds(for_evals=1))
        (t,) = d.evaluate(1, sc({"k_cos_step": 0.0, "k_concentration": conc}))
        assert t.message.startswith("k_direction_instability firing on attn L03: k_cos_step=0 < 0.3")
    # below the gate a pending alert is not evaluated, so it neither breaks nor advances
    d = Detector(Thresholds())
    d.evaluate(1, sc({"k_cos_step": 0.0, "k_concentration": 0.9}))
    assert d.evaluate(2, sc({"k_cos_step": 0.9, "k_concentration": 0.01})) == []
    assert [a.state for a in d.alerts()] == [P]


# -- thresholds from the environment ----------------------------------------------------------------


def test_thresholds_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    v = {"beta_p90": 0.03}
    assert [t.state for t in Detector(Thresholds()).evaluate(1, sc(v))] == [P]
    monkeypatch.setenv("DELTASCOPE_THRESHOLDS__COLLAPSE_BETA", "0.02")
    t = Thresholds()
    assert t.collapse_beta == 0.02
    assert Detector(t).evaluate(1, sc(v)) == []
    assert [t.state for t in Detector(t).evaluate(1, sc({"beta_p90": 0.019}))] == [P]


def test_invalid_override_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASCOPE_THRESHOLDS__COLLAPSE_BETA", "0.2")  # above its clear value 0.1
    with pytest.raises(ValidationError, match="collapse_clear_beta"):
        Thresholds()


# -- public surface ---------------------------------------------------------------------------------


def test_rules_table() -> None:
    assert RULE_NAMES == (
        "beta_collapse", "beta_saturation", "gate_logit_saturation", "k_norm_collapse", "k_norm_drift",
        "k_direction_collapse", "k_direction_instability", "nonfinite",
    )
    fields = set(Thresholds.model_fields)
    for r in RULES:
        assert isinstance(r, Rule) and r.stat in STAT_NAMES
        assert any(f in r.doc for f in fields), r.name
    crit = {r.name for r in RULES if r.severity is Severity.CRITICAL}
    assert crit == {"k_norm_collapse", "nonfinite"}


def test_transition_message_and_json() -> None:
    d = Detector(Thresholds(), run="run-7")
    trs = [t for s in (1, 2, 3) for t in d.evaluate(s, sc({"beta_p90": 0.012}))]
    assert trs[-1].message == "beta_collapse firing on attn L03: beta_p90=0.012 < 0.05 for 3 log steps"
    assert trs[0].message == "beta_collapse pending on attn L03: beta_p90=0.012 < 0.05 (1 of 3 log steps)"
    blob = json.loads(json.dumps(trs[-1].to_dict(), allow_nan=False))
    assert blob == {
        "run": "run-7", "rule": "beta_collapse", "site": "attn", "layer": 3, "severity": "warning",
        "prev": "pending", "state": "firing", "step": 3, "value": 0.012, "threshold": 0.05,
        "message": trs[-1].message,
    }
    (t,) = d.evaluate(4, sc({"nonfinite": math.nan}))
    assert t.to_dict()["value"] is None
    json.dumps([a.to_dict() for a in d.alerts()], allow_nan=False)


# -- persistence ------------------------------------------------------------------------------------


def test_state_dict_round_trip_mid_pending() -> None:
    d = Detector(Thresholds(), beta_max=1.0, run="r9")
    d.evaluate(1, sc({"beta_p90": 0.01, "nonfinite": math.nan}))
    d.evaluate(2, sc({"beta_p90": 0.01}))
    blob = json.dumps(d.state_dict(), allow_nan=False)

    e = Detector(Thresholds())
    e.load_state_dict(json.loads(blob))
    assert (e.run, e.beta_max) == ("r9", 1.0)
    assert [(a.rule, a.state, a.since_step) for a in e.alerts()] == [("beta_collapse", P, 1), ("nonfinite", F, 1)]
    assert math.isnan(e.alerts()[1].value)
    # the restored pending run continues: the third evaluation fires, as it would have
    (t,) = e.evaluate(3, sc({"beta_p90": 0.01}))
    assert (t.run, t.prev, t.state) == ("r9", P, F)
    assert e.state_dict() != d.state_dict()

    with pytest.raises(ValueError, match="version"):
        e.load_state_dict({"version": 99, "run": "", "beta_max": 2.0, "alerts": []})


def test_module_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, server.rules; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
