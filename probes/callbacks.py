"""Ready-made ``on_alert`` callbacks. A callback receives each :class:`server.rules.Transition`
when the probe applies it (at a log step, the same one on every rank) and returns "log",
"checkpoint", "stop" or None; the probe turns the last two into ``checkpoint_requested`` and
``stop_requested``, which the training loop reads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from server.rules import RULE_NAMES, AlertState, Severity, Transition

log = logging.getLogger("deltascope.alerts")


def log_alert(t: Transition) -> str:
    """One line per alert that fires or resolves on the ``deltascope.alerts`` logger (stderr
    without configuration). Pending and dropped-pending transitions go to DEBUG: they are the
    detector's bookkeeping, and a console full of them hides the alerts that matter."""
    run = f"[{t.run}] " if t.run else ""
    level = logging.WARNING if t.state in (AlertState.FIRING, AlertState.RESOLVED) else logging.DEBUG
    log.log(level, "%sstep %d %s %s: %s", run, t.step, t.severity, t.state, t.message)
    return "log"


def _matcher(rules: str | Iterable[str] | None, severity: str | Severity | None,
             states: Iterable[AlertState]) -> Callable[[Transition], bool]:
    wanted = None if rules is None else {rules} if isinstance(rules, str) else set(rules)  # one rule by name
    if wanted is not None and not wanted <= set(RULE_NAMES):
        raise ValueError(f"unknown rules {sorted(wanted - set(RULE_NAMES))}; known: {RULE_NAMES}")
    order = list(Severity)
    floor = None if severity is None else order.index(Severity(severity))
    states = set(states)

    def match(t: Transition) -> bool:
        return (
            t.state in states
            and (wanted is None or t.rule in wanted)
            and (floor is None or order.index(Severity(t.severity)) >= floor)
        )

    return match


def stop_on(rules: str | Iterable[str] | None = None, severity: str | Severity | None = None
            ) -> Callable[[Transition], str | None]:
    """A callback returning "stop" when an alert starts firing whose rule is in ``rules`` (all if
    None) and whose severity is at least ``severity`` (any if None)."""
    match = _matcher(rules, severity, (AlertState.FIRING,))
    return lambda t: "stop" if match(t) else None


def checkpoint_on(rules: str | Iterable[str] | None = None, severity: str | Severity | None = None
                  ) -> Callable[[Transition], str | None]:
    """A callback returning "checkpoint" when a matching alert starts firing (see :func:`stop_on`)."""
    match = _matcher(rules, severity, (AlertState.FIRING,))
    return lambda t: "checkpoint" if match(t) else None
