"""The generated Grafana and Prometheus files: committed = freshly generated, and each alert rule says
what the shared detector does (same stat, same fire and clear thresholds, same timing)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import httpx
import pytest
import yaml

from dashboards import generate, grafana
from dashboards.prometheus import alert_rules, metric, num
from server.catalogue import BY_NAME, SITES, key
from server.metrics import PREFIX
from server.rules import RULES, AlertState, Detector
from server.thresholds import Thresholds

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(autouse=True)
def _default_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed files use the default thresholds: no override leaks in from the shell."""
    for name in list(os.environ):
        if name.upper().startswith("DELTASCOPE_THRESHOLDS__"):
            monkeypatch.delenv(name)


def test_committed_files_equal_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate.render_all()
    stale = generate.stale(DEPLOY, fresh)
    assert not stale, f"regenerate with: python -m dashboards.generate deploy/  (stale: {stale})"
    assert generate.main([str(DEPLOY), "--check"]) == 0
    assert generate.main([str(tmp_path), "--check"]) == 1
    assert generate.main([str(tmp_path)]) == 0
    assert generate.stale(tmp_path, fresh) == []


def _rules(th: Thresholds | None = None, interval: int = 15) -> dict[str, dict]:
    doc = yaml.safe_load(generate.prometheus.dump(alert_rules(th, interval)))
    (group,) = doc["groups"]
    assert group["interval"] == f"{interval}s"
    return {r["alert"]: r for r in group["rules"]}


def test_alert_rules_parse_and_mirror_every_detector_rule() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = [r["alert"] for r in doc["groups"][0]["rules"]]
    assert names == [r.name for r in RULES]
    th = Thresholds()
    for rule, r in zip(RULES, doc["groups"][0]["rules"], strict=True):
        assert metric(rule.stat) in r["expr"], rule.name
        assert r["labels"] == {"severity": str(rule.severity), "rule": rule.name}
        evals = th.nonfinite_for_evals if rule.name == "nonfinite" else th.for_evals
        assert r["for"] == f"{(evals - 1) * 15}s"
        for name in re.findall(r"deltascope_\w+", r["expr"]):  # catalogue stats, or the run's own gauges
            assert name.removeprefix(PREFIX) in BY_NAME or name == PREFIX + "run_beta_max", name
        assert r["expr"].count("(") == r["expr"].count(")")


def _firing_input(rule: str, fire: bool) -> dict[str, float]:
    """Stats that put one rule far on its firing (or far on its clearing) side."""
    v = {
        "beta_collapse": ("beta_p90", 0.0, 1.0), "beta_saturation": ("beta_p10", 2.0, 1.0),
        "gate_logit_saturation": ("gate_logit_sat", 1.0, 0.0), "k_norm_collapse": ("h_norm_mean", 0.0, 1.0),
        "k_norm_drift": ("h_norm_drift", 1e9, 1.0), "k_direction_collapse": ("k_abs_concentration", 1.0, 0.0),
        "k_direction_instability": ("k_cos_probe", 0.0, 1.0), "nonfinite": ("nonfinite", 3.0, 0.0),
    }[rule]
    return {key(v[0], SITES[0], 0): v[1] if fire else v[2]}


@pytest.mark.parametrize("interval", [15, 60])
@pytest.mark.parametrize("th", [Thresholds(), Thresholds(collapse_beta=0.02, collapse_clear_beta=0.07,
                                                         k_norm_drift_factor=50, k_instability_cos=0.25,
                                                         for_evals=5, clear_evals=3)],
                         ids=["defaults", "overridden"])
def test_each_expression_carries_the_detectors_thresholds(th: Thresholds, interval: int) -> None:
    """Ask the detector itself which fire and clear threshold each rule uses; both must be in the PromQL."""
    rules = _rules(th, interval)
    fast = th.model_copy(update={"for_evals": 1, "clear_evals": 1, "nonfinite_for_evals": 1})
    for rule in RULES:
        det = Detector(fast, beta_max=2.0)
        (fired,) = det.evaluate(0, _firing_input(rule.name, True))
        (cleared,) = det.evaluate(1, _firing_input(rule.name, False))
        assert fired.state is AlertState.FIRING and cleared.state is AlertState.RESOLVED
        r = rules[rule.name]
        stat = fired.message.split(": ")[1].split("=")[0]
        assert metric(stat) in r["expr"], (rule.name, stat)
        if rule.name == "nonfinite":
            assert r["expr"] == f"({metric(stat)} != 0)" and "keep_firing_for" not in r
            continue
        if rule.name == "beta_saturation":  # against each run's beta_max: the margins, not 2 - margin
            for t in (th.saturation_margin, th.saturation_clear_margin):
                assert f"group_left() (deltascope_run_beta_max - {num(t)})" in r["expr"], r["expr"]
            assert num(fired.threshold) == num(2.0 - th.saturation_margin)
            continue
        assert f" {num(fired.threshold)}" in r["expr"], (rule.name, fired.threshold, r["expr"])
        assert f" {num(cleared.threshold)}" in r["expr"], (rule.name, cleared.threshold, r["expr"])
        if rule.name == "k_norm_drift":  # two-sided: the low side too
            assert num(1 / th.k_norm_drift_factor) in r["expr"]
            assert num(1 / th.k_norm_drift_clear_factor) in r["expr"]
        assert f'ALERTS{{alertname="{rule.name}", alertstate="firing"}}' in r["expr"]  # hysteresis
        assert r["for"] == f"{(th.for_evals - 1) * interval}s"
        assert r["keep_firing_for"] == f"{(th.clear_evals - 1) * interval}s"


def test_scrape_config_points_at_the_servers_metrics() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"] and (DEPLOY / "prometheus" / "alerts.yml").is_file()
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "deltascope")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["deltascope:8765"]
    assert doc["global"]["scrape_interval"] == doc["global"]["evaluation_interval"] == "15s"


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_uses_the_datasource_variable_and_catalogue_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "deltascope.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "run", "site", "layer"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    server_own = {"run_last_step", "run_verdict", "alerts_firing", "loss", "val_loss"}
    used = {m.removeprefix(PREFIX) for e in _exprs(dash) for m in re.findall(r"deltascope_\w+", e)}
    assert used - set(BY_NAME) <= server_own
    for stat in ("beta_p50", "occ_identity", "occ_projection", "occ_reflection", "occ_negative",
                 "h_norm_drift", "k_cos_step", "k_cos_token", "nonfinite"):
        assert stat in used, stat
    per_site = [e for e in _exprs(dash) if any(f"{PREFIX}{s}{{" in e for s in BY_NAME)]
    assert all('site=~"$site"' in e and 'layer=~"$layer"' in e for e in per_site)
    titles = {p["title"] for p in dash["panels"]}
    assert {"β median per layer", "Firing alerts", "||h|| drift"} <= titles


def test_dashboard_layout_and_threshold_lines() -> None:
    dash = grafana.dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']} overlaps another"
        cells |= mine
    th = Thresholds()
    drift = next(p for p in dash["panels"] if p["title"] == "||h|| drift")
    steps = [s["value"] for s in drift["fieldConfig"]["defaults"]["thresholds"]["steps"]][1:]
    assert steps == [1 / th.k_norm_drift_factor, th.k_norm_drift_factor]
    assert drift["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]["type"] == "log"
    bands = next(p for p in dash["panels"] if p["title"].startswith("β p10"))
    steps = [s["value"] for s in bands["fieldConfig"]["defaults"]["thresholds"]["steps"]][1:]
    assert steps == [th.collapse_beta, 2.0 - th.saturation_margin]


def test_provisioning_matches_the_dashboard() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "deltascope.yml").read_text())
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["uid"] == grafana.DATASOURCE_UID and src["url"].endswith(":9090")
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "deltascope.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == grafana.DASHBOARD_DIR


def test_every_metric_the_files_query_is_served(live_server: str, fake_run: Path) -> None:
    """A run ingested into the real server exposes every gauge the alerts and the dashboard read."""
    from tests.dashboards.conftest import ingest_run

    ingest_run(live_server, fake_run, name="metrics")
    text = httpx.get(live_server + "/metrics", timeout=10).text
    served = set(re.findall(r"^(deltascope_\w+)\{", text, flags=re.M))
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    wanted = {m for r in alerts["groups"][0]["rules"] for m in re.findall(r"deltascope_\w+", r["expr"])}
    wanted |= {m for e in _exprs(json.loads((DEPLOY / "grafana" / "deltascope.json").read_text()))
               for m in re.findall(r"deltascope_\w+", e)}
    optional = {metric("k_cos_probe"), PREFIX + "alerts_firing"}  # no probe batch in the fixture; alerts: below
    assert wanted - optional <= served, sorted(wanted - optional - served)
    sample = re.search(r'^deltascope_beta_p90\{(.*)\} (\S+)$', text, flags=re.M)
    assert sample is not None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', sample.group(1)))
    assert {"run", "run_name", "site", "layer"} <= set(labels) and math.isfinite(float(sample.group(2)))
    assert re.search(r'^deltascope_alerts_firing\{.*rule="beta_collapse".*\} 1', text, flags=re.M)
