"""/metrics: valid Prometheus text with run/site/layer labels, and the ingest counters."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import Run, batch


def families(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_latest_stats_are_gauges_labelled_by_run_site_layer(client, run):
    run.post(batch("b", [1, 2], beta_p90__mlp__1=0.42))
    fams = families(client)
    p90 = {(s.labels["site"], s.labels["layer"]): s for s in fams["deltascope_beta_p90"].samples}
    assert set(p90) == {("attn", "0"), ("mlp", "0"), ("attn", "1"), ("mlp", "1")}
    s = p90[("mlp", "1")]
    assert s.value == 0.42 and s.labels["run"] == str(run.id) and s.labels["run_name"] == "run"
    assert fams["deltascope_beta_p90"].type == "gauge"
    (loss,) = fams["deltascope_loss"].samples
    assert set(loss.labels) == {"run", "run_name"} and loss.value == 3.0 - 0.002
    (last,) = fams["deltascope_run_last_step"].samples
    assert last.value == 2


def test_ingest_counters_and_firing_alerts(client, run):
    run.post(batch("b", [1]))
    run.post(batch("b", [1]))
    run.post(batch("nf", [2], nonfinite__attn__1=2.0))
    fams = families(client)
    batches = {s.labels["result"]: s.value for s in fams["deltascope_ingest_batches"].samples
               if s.name.endswith("_total")}
    assert batches == {"accepted": 2.0, "duplicate": 1.0}
    points = [s for s in fams["deltascope_ingest_points"].samples if s.name.endswith("_total")]
    assert points[0].value == 2 * len(batch("b", [1])["records"][0]["scalars"])
    (firing,) = fams["deltascope_alerts_firing"].samples
    assert firing.labels["rule"] == "nonfinite" and firing.labels["severity"] == "critical"
    (verdict,) = fams["deltascope_run_verdict"].samples
    assert verdict.value == 2


def test_two_runs_share_families(client):
    a, b = Run(client, "a"), Run(client, "b")
    a.post(batch("x", [1]))
    b.post(batch("x", [1]))
    runs = {s.labels["run"] for s in families(client)["deltascope_beta_mean"].samples}
    assert runs == {str(a.id), str(b.id)}


def test_each_runs_beta_max_is_a_gauge_for_the_saturation_rule(client):
    """beta_saturation in Prometheus compares to each run's ceiling: a beta_max 1 run saturates
    near 1 (docs/EXPERIMENTS.md: every layer of such a run does)."""
    Run(client, "wide")
    Run(client, "capped", beta_max=1.0)
    fams = families(client)
    ceil = {s.labels["run_name"]: s.value for s in fams["deltascope_run_beta_max"].samples}
    assert ceil == {"wide": 2.0, "capped": 1.0}
