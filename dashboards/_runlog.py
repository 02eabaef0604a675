"""A run's logged statistics in one in-memory form, whichever sink they come from.

``RunLog`` holds what a report needs: the model config, the per-step scalars under their canonical
keys (``beta_p50/attn/L03``, ``loss``, ``val_loss``), and the per-step beta histograms. Readers for
the run directory live here (``stats.jsonl``, TensorBoard event files); the MLflow and server readers
are in ``dashboards._remote``. Lines of one step merge: a stats line and a ``val_loss`` line that
share a step become one record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.catalogue import SITES, key, parse_key

BETA_MAX_DEFAULT = 2.0
"""Assumed when a source carries no model config (the paper's range, DDLConfig's default)."""


class ReportError(Exception):
    """A user mistake (missing run, empty or malformed log): ``str(e)`` is one line saying what to do."""


@dataclass
class RunLog:
    name: str
    source: str
    """Where the data came from, in words (a path or a URI), for the report's header."""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)
    """step -> key -> value; non-finite values are kept as NaN."""
    hists: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    """step -> ``beta_hist/<site>/Lnn`` -> counts over equal bins on [0, beta_max]."""
    notes: list[str] = field(default_factory=list)
    """Caveats to show in the report (e.g. a default assumed)."""

    def add(self, step: int, name: str, value: Any) -> None:
        """Record one logged value; histograms (lists) and scalars both go through here."""
        parsed = parse_key(name)
        if parsed is not None and parsed[0] == "beta_hist":
            counts = value.get("counts") if isinstance(value, Mapping) else value
            if isinstance(counts, list) and counts:
                arr = np.array([math.nan if c is None else c for c in counts], dtype=np.float64)
                self.hists.setdefault(step, {})[name] = np.nan_to_num(arr, nan=0.0)
            return
        if value is None:
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            return  # strings, nested objects, other histograms: not plotted
        self.scalars.setdefault(step, {})[name] = float(value)

    @property
    def beta_max(self) -> float:
        return float(self.config.get("beta_max", BETA_MAX_DEFAULT))

    @property
    def steps(self) -> list[int]:
        return sorted(self.scalars)

    def sites(self) -> list[tuple[str, int]]:
        """Every (site, layer) with a per-site scalar or histogram, in forward order."""
        found: set[tuple[str, int]] = set()
        for rows in (self.scalars, self.hists):
            for rec in rows.values():
                for k in rec:
                    if (p := parse_key(k)) is not None:
                        found.add((p[1], p[2]))
        return sorted(found, key=lambda sl: (sl[1], SITES.index(sl[0])))

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.sites()})

    def stats(self) -> set[str]:
        """Names of the per-site stats logged at least once."""
        return {p[0] for rec in self.scalars.values() for k in rec if (p := parse_key(k)) is not None}

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one key, in step order, where it was logged."""
        pts = [(s, rec[name]) for s, rec in sorted(self.scalars.items()) if name in rec]
        if not pts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        s, v = zip(*pts, strict=True)
        return np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)

    def last(self, name: str) -> float | None:
        """The last logged value of ``name``, or None."""
        _, v = self.series(name)
        return float(v[-1]) if v.size else None

    def grid(self, stat: str, site: str, layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values[layer, step]) of one stat at one site; NaN where not logged."""
        steps = [s for s, rec in sorted(self.scalars.items())
                 if any(key(stat, site, layer) in rec for layer in layers)]
        out = np.full((len(layers), len(steps)), np.nan)
        for j, s in enumerate(steps):
            rec = self.scalars[s]
            for i, layer in enumerate(layers):
                out[i, j] = rec.get(key(stat, site, layer), np.nan)
        return np.asarray(steps, dtype=np.int64), out

    def ordered_records(self) -> Iterable[tuple[int, dict[str, float]]]:
        return sorted(self.scalars.items())


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); "
                          f"restore it from the run or delete it to report without the {what}") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path} holds a JSON {type(obj).__name__}, not an object; "
                          f"delete it to report without the {what}")
    return obj


def _check_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"no such run directory: {run_dir}; pass the --out DIR of a deltascope train run")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run directory; pass the --out DIR of a deltascope train run")


def _read_meta(log: RunLog, run_dir: Path) -> None:
    cfg, summ = run_dir / "config.json", run_dir / "summary.json"
    if cfg.is_file():
        log.config = _read_json(cfg, "model config")
    else:
        log.notes.append(f"config.json missing: beta_max assumed {BETA_MAX_DEFAULT}")
    if summ.is_file():
        log.summary = _read_json(summ, "run summary")


def load_jsonl(run_dir: Path) -> RunLog:
    """Read ``stats.jsonl`` (plus ``config.json`` and ``summary.json`` when present)."""
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no stats.jsonl; train with probes on "
                          f"(deltascope train --out {run_dir}) or pick the run's --out directory")
    log = RunLog(name=run_dir.name, source=str(path))
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{lineno}: malformed line ({e.msg} at column {e.colno}); "
                                  f"delete or fix that line and run the report again") from None
            step = obj.get("step") if isinstance(obj, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise ReportError(f"{path}:{lineno}: malformed line (a JSON object with an integer "
                                  f"\"step\" expected); delete or fix that line and run the report again")
            for k, v in obj.items():
                if k != "step":
                    log.add(step, k, v)
    if not log.scalars and not log.hists:
        raise ReportError(f"{path} is empty: the run has not logged a step yet; "
                          f"report again after its first log step")
    _read_meta(log, run_dir)
    return log


def load_tensorboard(run_dir: Path) -> RunLog:
    """Read the TensorBoard event files under ``run_dir/tb`` (or ``run_dir`` itself)."""
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    logdir = run_dir / "tb" if (run_dir / "tb").is_dir() else run_dir
    if not any(logdir.glob("events.out.tfevents.*")):
        raise ReportError(f"{logdir} has no TensorBoard event files; "
                          f"use --source jsonl or pick the run's --out directory")
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    log = RunLog(name=run_dir.name, source=str(logdir))
    for tag in tags.get("scalars", []):
        for ev in acc.Scalars(tag):
            log.add(int(ev.step), tag, float(ev.value))
    if not log.scalars:
        raise ReportError(f"{logdir} holds no scalars yet; report again after the run's first log step")
    _read_meta(log, run_dir)  # beta_max first: the bins are rebuilt on [0, beta_max]
    for tag in tags.get("histograms", []):
        if (p := parse_key(tag)) is None or p[0] != "beta_hist":
            continue
        for ev in acc.Histograms(tag):
            hv = ev.histogram_value
            log.hists.setdefault(int(ev.step), {})[tag] = _to_bins(hv.bucket_limit, hv.bucket, log.beta_max)
    return log


def _to_bins(limits: Iterable[float], counts: Iterable[float], beta_max: float) -> np.ndarray:
    """TensorBoard buckets (right edges; the first bucket holds what lies below ``limits[0]``) back
    onto BETA_BINS equal bins on [0, beta_max], each bucket's count placed at its centre."""
    from server.catalogue import BETA_BINS

    lim = np.asarray(list(limits), dtype=np.float64)
    cnt = np.asarray(list(counts), dtype=np.float64)
    centres = np.concatenate([lim[:1], (lim[:-1] + lim[1:]) / 2])[: cnt.size]
    edges = np.linspace(0.0, beta_max, BETA_BINS + 1)
    idx = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, BETA_BINS - 1)
    out = np.zeros(BETA_BINS)
    np.add.at(out, idx, cnt)
    return out
