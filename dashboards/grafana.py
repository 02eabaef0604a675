"""The Grafana dashboard and its provisioning, generated from the stat catalogue and the thresholds.

Panels read the deltascope server's gauges through Prometheus (``deltascope_<stat>`` with labels
run, run_name, site, layer); titles, descriptions and units come from the catalogue, threshold lines
from ``Thresholds``. Template variables: the Prometheus datasource (by uid), run (shown by name),
site and layer.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from dashboards.prometheus import HEADER, metric
from server.catalogue import BY_NAME
from server.metrics import PREFIX
from server.rules import RULES
from server.thresholds import Thresholds

UID = "deltascope"
DATASOURCE_UID = "deltascope-prometheus"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'run=~"$run", site=~"$site", layer=~"$layer"'
LEGEND = "{{site}} L{{layer}}"
DASHBOARD_DIR = "/etc/grafana/dashboards"
"""Where the compose file mounts deploy/grafana/deltascope.json in the Grafana container."""
UNITS = {"1": "none", "fraction": "percentunit", "ratio": "none", "L2 norm": "none", "count": "short",
         "cosine": "none"}
"""Catalogue unit -> Grafana unit id."""
WARN, CRIT = "orange", "red"


class _Grid:
    """Places panels left to right on Grafana's 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0


def _target(expr: str, legend: str = LEGEND, ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, **extra}


def _lines(*steps: tuple[float, str]) -> dict[str, Any]:
    """Threshold steps drawn as dashed lines (the first, base step is not drawn)."""
    return {"mode": "absolute", "steps": [{"color": "transparent", "value": None},
                                          *({"color": c, "value": v} for v, c in steps)]}


def _timeseries(title: str, stat: str | None, targets: list[dict[str, Any]], *, thresholds: dict | None = None,
                log: bool = False, lo: float | None = None, hi: float | None = None,
                description: str | None = None) -> dict[str, Any]:
    """A time series panel; ``stat`` (a catalogue name) gives the description and unit."""
    unit = UNITS[BY_NAME[stat].unit] if stat else "none"
    if description is None and stat:
        description = f"{BY_NAME[stat].doc} [{BY_NAME[stat].unit}]"
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 0, "showPoints": "never", "spanNulls": True}
    if thresholds:
        custom["thresholdsStyle"] = {"mode": "dashed"}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if thresholds:
        defaults["thresholds"] = thresholds
    if lo is not None:
        defaults["min"] = lo
    if hi is not None:
        defaults["max"] = hi
    return {"type": "timeseries", "title": title, "description": description or "", "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def _variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, q: str, **extra: Any) -> dict[str, Any]:
        return {"type": "query", "name": name, "label": label, "datasource": DS, "query": q, "definition": q,
                "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "current": {}, **extra}

    p50 = metric("beta_p50")
    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
         "current": {}, "refresh": 1, "hide": 0},
        # one option per run, shown by name, valued by id (names repeat when a job restarts)
        query("run", "run", f"query_result({PREFIX}run_last_step)", multi=False, includeAll=False,
              regex='/run="(?<value>[^"]+)",run_name="(?<text>[^"]*)"/'),
        query("site", "site", f'label_values({p50}{{run=~"$run"}}, site)'),
        query("layer", "layer", f'label_values({p50}{{run=~"$run", site=~"$site"}}, layer)', sort=3),
    ]


def dashboard(th: Thresholds | None = None, beta_max: float = 2.0) -> dict[str, Any]:
    """The dashboard JSON (as a dict)."""
    th = th or Thresholds()
    g = _Grid()
    warn_collapse = _lines((th.collapse_beta, WARN), (beta_max - th.saturation_margin, WARN))

    g.row("Run")
    verdict = {"type": "stat", "title": "Verdict", "datasource": DS,
               "description": "The server's verdict: failing if a critical alert fires, warning if any fires",
               "targets": [_target(f'{PREFIX}run_verdict{{run=~"$run"}}', "{{run_name}}")],
               "fieldConfig": {"defaults": {"mappings": [{"type": "value", "options": {
                   "0": {"text": "healthy", "color": "green"}, "1": {"text": "warning", "color": WARN},
                   "2": {"text": "failing", "color": CRIT}}}], "color": {"mode": "fixed"}}, "overrides": []},
               "options": {"colorMode": "background", "graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}}
    g.add(verdict, 4, 5)
    g.add({"type": "stat", "title": "Last step", "datasource": DS, "description": "Highest step ingested",
           "targets": [_target(f'{PREFIX}run_last_step{{run=~"$run"}}', "{{run_name}}")],
           "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
           "options": {"graphMode": "area", "reduceOptions": {"calcs": ["lastNotNull"]}}}, 4, 5)
    firing = {"type": "table", "title": "Firing alerts", "datasource": DS,
              "description": "Alerts the server's detector holds firing, by rule and severity "
                             f"(rules: {', '.join(r.name for r in RULES)})",
              "targets": [_target(f'{PREFIX}alerts_firing{{run=~"$run"}} > 0', "", format="table", instant=True)],
              "transformations": [{"id": "organize", "options": {
                  "excludeByName": {"Time": True, "__name__": True, "instance": True, "job": True},
                  "renameByName": {"Value": "firing"}}}],
              "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True}}
    g.add(firing, 8, 5)
    g.add({"type": "table", "title": "Prometheus alerts (deploy/prometheus/alerts.yml)", "datasource": DS,
           "description": "The same rules evaluated by Prometheus on the scraped gauges",
           "targets": [_target('ALERTS{run=~"$run"}', "", format="table", instant=True)],
           "transformations": [{"id": "organize", "options": {
               "excludeByName": {"Time": True, "__name__": True, "Value": True, "instance": True, "job": True}}}],
           "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True}}, 8, 5)
    losses = [_target(f'{PREFIX}loss{{run=~"$run"}}', "loss {{run_name}}"),
              _target(f'{PREFIX}val_loss{{run=~"$run"}}', "val_loss {{run_name}}", "B")]
    g.add(_timeseries("Loss", None, losses, description="Training and validation cross-entropy [nats/token]"), 24, 7)

    g.row("Gate β")
    heat = {"type": "status-history", "title": "β median per layer", "datasource": DS,
            "description": f"{BY_NAME['beta_p50'].doc}; blue: identity side, red: reflection side",
            "targets": [_target(f"{metric('beta_p50')}{{{SEL}}}")],
            "fieldConfig": {"defaults": {"min": 0, "max": beta_max, "unit": "none",
                                         "color": {"mode": "continuous-BlYlRd"}}, "overrides": []},
            "options": {"showValue": "never", "rowHeight": 0.9, "colWidth": 1,
                        "legend": {"showLegend": False}, "tooltip": {"mode": "single"}}}
    g.add(heat, 24, 9)
    bands = [_target(f"{metric(s)}{{{SEL}}}", f"{LEGEND} {s.removeprefix('beta_')}", ref)
             for s, ref in (("beta_p10", "A"), ("beta_p50", "B"), ("beta_p90", "C"))]
    g.add(_timeseries("β p10 / p50 / p90", "beta_p50", bands, thresholds=warn_collapse, lo=0, hi=beta_max), 12, 8)
    g.add(_timeseries("Gate logit saturation", "gate_logit_sat",
                      [_target(f"{metric('gate_logit_sat')}{{{SEL}}}")],
                      thresholds=_lines((th.logit_saturated_fraction, WARN)), lo=0, hi=1), 12, 8)

    g.row("Regime occupancy")
    for regime in ("identity", "projection", "reflection", "negative"):
        stat = f"occ_{regime}"
        g.add(_timeseries(f"{regime}", stat, [_target(f"{metric(stat)}{{{SEL}}}")], lo=0, hi=1), 6, 8)

    g.row("Direction k")
    f = th.k_norm_drift_factor
    g.add(_timeseries("||h|| drift", "h_norm_drift", [_target(f"{metric('h_norm_drift')}{{{SEL}}}")],
                      thresholds=_lines((1 / f, WARN), (f, WARN)), log=True), 12, 8)
    g.add(_timeseries("||h|| mean", "h_norm_mean", [_target(f"{metric('h_norm_mean')}{{{SEL}}}")],
                      thresholds=_lines((th.k_norm_min, CRIT)), log=True), 12, 8)
    cos = _lines((th.k_instability_cos, WARN))
    for stat in ("k_cos_step", "k_cos_token", "k_cos_probe"):
        g.add(_timeseries(stat, stat, [_target(f"{metric(stat)}{{{SEL}}}")],
                          thresholds=cos if stat != "k_cos_token" else None, lo=0, hi=1), 8, 8)
    g.add(_timeseries("k concentration (sign-free)", "k_abs_concentration",
                      [_target(f"{metric('k_abs_concentration')}{{{SEL}}}")],
                      thresholds=_lines((th.k_direction_concentration, WARN)), lo=0, hi=1), 12, 8)

    g.row("Health")
    g.add(_timeseries("Non-finite values", "nonfinite", [_target(f"{metric('nonfinite')}{{{SEL}}}")],
                      thresholds=_lines((1, CRIT)), lo=0), 12, 7)
    g.add(_timeseries("Update size", "update_ratio", [_target(f"{metric('update_ratio')}{{{SEL}}}")]), 12, 7)

    return {
        "uid": UID, "title": "deltascope: DDL gates", "tags": ["deltascope", "ddl"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "templating": {"list": _variables()},
        "annotations": {"list": []}, "links": [], "panels": g.panels,
    }


def dashboard_json(th: Thresholds | None = None, beta_max: float = 2.0) -> str:
    return json.dumps(dashboard(th, beta_max), indent=2, ensure_ascii=False) + "\n"


def datasource_provisioning(prometheus_url: str = "http://prometheus:9090", interval_s: int = 15) -> str:
    doc = {"apiVersion": 1, "datasources": [{
        "name": "Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
        "url": prometheus_url, "isDefault": True, "editable": False,
        "jsonData": {"timeInterval": f"{interval_s}s"}}]}
    return HEADER + yaml.safe_dump(doc, sort_keys=False)


def dashboard_provisioning(path: str = DASHBOARD_DIR) -> str:
    doc = {"apiVersion": 1, "providers": [{
        "name": "deltascope", "folder": "deltascope", "type": "file", "disableDeletion": False,
        "allowUiUpdates": False, "updateIntervalSeconds": 30, "options": {"path": path}}]}
    return HEADER + yaml.safe_dump(doc, sort_keys=False)
