"""Fault injection on the tiny model: each fault raises exactly its alarm in exactly its layer.

Faults are forward hooks registered before the Probe (so the probe's hooks see their output):
a beta_gate hook returning beta ~ 0 or ~ beta_max, a k_dir pre-hook scaling its input h to ~ 0,
a beta_gate hook returning NaN (on the last site, so the NaN cannot flow into other sites).
"""

from __future__ import annotations

import logging

import pytest
import torch

from probes import MemorySink, Probe
from probes.callbacks import checkpoint_on, log_alert, stop_on
from server.rules import AlertState
from server.thresholds import Thresholds
from tests.probes.conftest import batch, tiny

THR = Thresholds()


def _site(model, site: str, layer: int):
    return next(m for m in model.delta_residuals() if (m.site, m.layer) == (site, layer))


def _fill(value: float):
    return lambda mod, args, out: torch.full_like(out, value)


FAULTS = {
    "beta_collapse": lambda m: m.beta_gate.register_forward_hook(_fill(1e-3)),
    "beta_saturation": lambda m: m.beta_gate.register_forward_hook(_fill(m.beta_gate.beta_max * 0.999)),
    "k_norm_collapse": lambda m: m.k_dir.register_forward_pre_hook(lambda mod, a: (a[0] * 1e-9,)),
    "nonfinite": lambda m: m.beta_gate.register_forward_hook(_fill(float("nan"))),
}


def _run(model, steps: int, **kw) -> Probe:
    x = batch(model, 2)
    with Probe(model, every=1, **kw) as probe, torch.no_grad():
        for step in range(steps):
            model(x, x)
            probe.step(step)
    return probe


def _firing(probe: Probe) -> set[tuple[str, str, int]]:
    return {(a.rule, a.site, a.layer) for a in probe.alerts if a.state is AlertState.FIRING}


@pytest.mark.parametrize(
    ("rule", "site", "layer"),
    [("beta_collapse", "attn", 1), ("beta_saturation", "mlp", 0), ("k_norm_collapse", "attn", 0),
     ("nonfinite", "mlp", 1)],
)
def test_fault_raises_exactly_its_alarm(rule, site, layer):
    model = tiny()
    FAULTS[rule](_site(model, site, layer))
    need = THR.nonfinite_for_evals if rule == "nonfinite" else THR.for_evals
    probe = _run(model, need + 1, sinks=[MemorySink()])
    assert _firing(probe) == {(rule, site, layer)}
    assert {(t.rule, t.site, t.layer) for t in probe.transitions} == {(rule, site, layer)}


def test_healthy_run_raises_nothing():
    model = tiny()
    x = batch(model, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sink = MemorySink()
    with Probe(model, every=1, sinks=[sink]) as probe:
        for step in range(8):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
            probe.step(step)
    assert probe.transitions == [] and probe.alerts == [] and probe.verdict == "healthy"
    assert len(sink.records) == 8


def test_stop_callback_stops_at_the_next_log_boundary(caplog):
    """nonfinite fires at log step 0's evaluation; it is applied (same step on every rank) at the
    next log step, 2, where the loop stops. log_alert prints the transition."""
    model = tiny()
    FAULTS["nonfinite"](_site(model, "mlp", 1))
    x = batch(model, 2)
    ran = []
    with caplog.at_level(logging.WARNING, "deltascope.alerts"), Probe(
        model, every=2, on_alert=[log_alert, stop_on(rules=["nonfinite"]), checkpoint_on(severity="critical")]
    ) as probe, torch.no_grad():
        for step in range(10):
            model(x, x)
            ran.append(step)
            probe.step(step)
            if probe.stop_requested:
                break
    assert ran == [0, 1, 2]
    assert probe.checkpoint_requested
    probe.checkpoint_done()
    assert not probe.checkpoint_requested
    assert probe.verdict == "failing"
    assert any("nonfinite firing" in r.getMessage() and "mlp L01" in r.getMessage() for r in caplog.records)


def test_callback_matchers():
    with pytest.raises(ValueError, match="unknown rules"):
        stop_on(rules=["no_such_rule"])


def test_log_alert_prints_firing_and_resolved_only(caplog):
    from server.rules import AlertState, Severity, Transition

    def t(prev, state):
        return Transition(run="r", rule="beta_collapse", site="attn", layer=3, severity=Severity.WARNING,
                          prev=prev, state=state, step=7, value=0.01, threshold=0.05, message=f"msg {state}")

    with caplog.at_level(logging.WARNING, "deltascope.alerts"):
        for prev, state in [(AlertState.INACTIVE, AlertState.PENDING), (AlertState.PENDING, AlertState.INACTIVE),
                            (AlertState.PENDING, AlertState.FIRING), (AlertState.FIRING, AlertState.RESOLVED)]:
            log_alert(t(prev, state))
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records] == ["firing", "resolved"]
