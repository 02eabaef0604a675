"""Replays a logged run through the shared detector: transitions, spans and counts for the report.

The rules are not restated here: ``server.rules.Detector`` judges every record in step order, as
the job's probes and the server do live, so the report shows exactly what would have fired.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dashboards._runlog import RunLog
from server.catalogue import SITES
from server.rules import RULE_NAMES, RULES, AlertState, Detector, Severity, Transition
from server.thresholds import Thresholds


@dataclass(frozen=True)
class Span:
    """One stretch of an alert identity in one state, from ``start`` to ``end`` (steps)."""

    rule: str
    site: str
    layer: int
    severity: Severity
    state: AlertState  # PENDING or FIRING
    start: int
    end: int
    open: bool
    """Still in this state at the last logged step."""

    @property
    def identity(self) -> tuple[str, str, int]:
        return self.rule, self.site, self.layer


@dataclass
class AlertReplay:
    transitions: list[Transition]
    spans: list[Span]
    first_step: int
    last_step: int

    def identities(self) -> list[tuple[str, str, int]]:
        """Identities with at least one span, in rule order, then forward order of sites."""
        order = {name: i for i, name in enumerate(RULE_NAMES)}
        ids = {s.identity for s in self.spans}
        return sorted(ids, key=lambda i: (order[i[0]], i[2], SITES.index(i[1])))

    def counts(self) -> list[dict[str, object]]:
        """Per rule: identities that went pending, that fired, and that still fire at the end."""
        pending = Counter(t.rule for t in self.transitions if t.state is AlertState.PENDING)
        fired = Counter(t.rule for t in self.transitions if t.state is AlertState.FIRING)
        resolved = Counter(t.rule for t in self.transitions if t.state is AlertState.RESOLVED)
        firing_now = Counter(s.rule for s in self.spans if s.open and s.state is AlertState.FIRING)
        return [
            {"rule": r.name, "severity": str(r.severity), "pending": pending[r.name], "fired": fired[r.name],
             "resolved": resolved[r.name], "firing_at_end": firing_now[r.name]}
            for r in RULES
        ]


def replay(log: RunLog, thresholds: Thresholds | None = None) -> AlertReplay:
    """Evaluate every record of ``log`` in step order with a fresh detector."""
    det = Detector(thresholds or Thresholds(), beta_max=log.beta_max, run=log.name)
    transitions: list[Transition] = []
    steps = log.steps
    for step, scalars in log.ordered_records():
        transitions.extend(det.evaluate(step, scalars))
    first, last = (steps[0], steps[-1]) if steps else (0, 0)
    return AlertReplay(transitions, _spans(transitions, last), first, last)


def _spans(transitions: list[Transition], last_step: int) -> list[Span]:
    spans: list[Span] = []
    open_: dict[tuple[str, str, int], Transition] = {}
    for tr in transitions:  # already in step order
        ident = (tr.rule, tr.site, tr.layer)
        if (start := open_.pop(ident, None)) is not None:
            spans.append(Span(tr.rule, tr.site, tr.layer, tr.severity, start.state, start.step, tr.step, False))
        if tr.state in (AlertState.PENDING, AlertState.FIRING):
            open_[ident] = tr
    for (rule, site, layer), start in open_.items():
        spans.append(Span(rule, site, layer, start.severity, start.state, start.step, last_step, True))
    return spans
