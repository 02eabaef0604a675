"""The API on a real SQLite file: runs, ingest, idempotency, detection, reads, alerts, thresholds."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from tests.server.conftest import ADMIN, Run, batch, scalars


def test_create_run_returns_a_token_once_and_stores_only_its_hash(client, settings, run):
    r = client.get(f"/api/v1/runs/{run.id}")
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "run" and body["config"] == {"preset": "tiny", "lr": 3e-4}
    assert body["tags"] == {"ablation": "none"} and body["beta_max"] == 2.0
    assert body["last_step"] is None and body["verdict"] == "healthy" and "token" not in body
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    (stored,) = db.execute("SELECT token_hash FROM runs WHERE id = ?", (run.id,)).fetchone()
    dump = "\n".join(db.iterdump())
    db.close()
    assert stored == hashlib.sha256(run.token.encode()).hexdigest()
    assert run.token not in dump


def test_list_runs_newest_first(client):
    ids = [Run(client, f"r{i}").id for i in range(3)]
    body = client.get("/api/v1/runs", params={"limit": 2}).json()
    assert body["count"] == 3 and [r["id"] for r in body["data"]] == ids[::-1][:2]


def test_ingest_stores_and_reads_back(run):
    r = run.post(batch("b1", [10, 20, 30]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"accepted": 3, "points": len(scalars(0)) * 3, "duplicate": False, "alerts": [],
                    "verdict": "healthy", "firing": []}
    assert run.get("")["last_step"] == 30
    layers = run.get("/layers")
    assert layers["last_step"] == 30 and layers["scalars"]["loss"] == pytest.approx(3.0 - 0.03)
    assert [(x["site"], x["layer"]) for x in layers["layers"]] == [
        ("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    assert layers["layers"][0]["stats"]["beta_p90"] == 0.9
    h = run.get("/history", stat="loss")
    assert [p["step"] for p in h["points"]] == [10, 20, 30] and h["downsampled"] is False
    assert h["points"][0]["value"] == pytest.approx(2.99)


def test_replayed_batch_is_acknowledged_and_stored_once(run, settings):
    first = run.post(batch("same-id", [1, 2]))
    again = run.post(batch("same-id", [1, 2]))
    assert first.status_code == again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["accepted"] == 0
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    n = db.execute("SELECT count(*) FROM stats WHERE run_id = ?", (run.id,)).fetchone()[0]
    nb = db.execute("SELECT count(*) FROM ingest_batches").fetchone()[0]
    db.close()
    assert n == 2 * len(scalars(0)) and nb == 1


def test_detector_fires_after_for_evals_and_resolves_with_hysteresis(run):
    # thresholds default: collapse_beta 0.05, for_evals 3, clear at 0.1 for clear_evals 2
    got = []
    for step in range(1, 4):
        got += run.post(batch(f"c{step}", [step], beta_p90__attn__1=0.01)).json()["alerts"]
    assert [(t["prev"], t["state"]) for t in got] == [("inactive", "pending"), ("pending", "firing")]
    fired = got[-1]
    assert (fired["rule"], fired["site"], fired["layer"], fired["step"]) == ("beta_collapse", "attn", 1, 3)
    assert fired["severity"] == "warning" and fired["run"] == str(run.id)
    health = run.get("/health")
    assert health["verdict"] == "warning" and [a["rule"] for a in health["firing"]] == ["beta_collapse"]
    # inside the hysteresis band (0.05 <= p90 < 0.1): stays firing
    assert run.post(batch("c4", [4], beta_p90__attn__1=0.07)).json()["alerts"] == []
    r1 = run.post(batch("c5", [5])).json()
    r2 = run.post(batch("c6", [6])).json()
    assert r1["alerts"] == [] and [t["state"] for t in r2["alerts"]] == ["resolved"]
    assert r2["verdict"] == "healthy" and r2["firing"] == []
    alerts = run.get("/alerts", state="resolved")["data"]
    assert len(alerts) == 1 and alerts[0]["since_step"] == 6 and alerts[0]["id"] == fired["alert_id"]
    assert run.get("/alerts", state="firing")["count"] == 0


def test_critical_alert_makes_the_run_failing(run):
    body = run.post(batch("nf", [1], nonfinite__mlp__0=3.0)).json()
    assert [(t["rule"], t["state"]) for t in body["alerts"]] == [("nonfinite", "firing")]
    assert body["verdict"] == "failing"
    assert run.get("")["verdict"] == "failing" and run.get("")["firing"] == 1


def test_detector_state_survives_a_new_app_on_the_same_database(settings, run):
    from fastapi.testclient import TestClient

    from server import create_app

    for step in (1, 2):
        run.post(batch(f"p{step}", [step], beta_p90__mlp__0=0.01))
    with TestClient(create_app(settings)) as c2:  # a restarted server: detector from the DB
        r = c2.post(f"/api/v1/runs/{run.id}/stats", json=batch("p3", [3], beta_p90__mlp__0=0.01),
                    headers=run.headers)
    assert [t["state"] for t in r.json()["alerts"]] == ["firing"]


def test_steps_at_or_below_the_last_are_stored_but_not_judged(run):
    run.post(batch("a", [10]))
    body = run.post(batch("b", [5, 6, 7], nonfinite=1.0)).json()
    assert body["accepted"] == 3 and body["alerts"] == []
    assert run.get("/history", stat="nonfinite", site="attn", layer=0)["total"] == 4


def test_history_downsamples_into_buckets(run):
    recs = [{"step": s, "scalars": {"loss": float(s)}} for s in range(1000)]
    assert run.post({"batch_id": "many", "records": recs}).status_code == 200
    h = run.get("/history", stat="loss", max_points=100)
    assert h["total"] == 1000 and h["downsampled"] is True and len(h["points"]) == 100
    p = h["points"][0]
    assert (p["step"], p["n"], p["min"], p["max"], p["value"]) == (9, 10, 0.0, 9.0, 4.5)
    assert h["points"][-1]["step"] == 999
    part = run.get("/history", stat="loss", since_step=100, until_step=109)
    assert [x["step"] for x in part["points"]] == list(range(100, 110))


def test_histograms_round_trip_and_thin_by_stride(run):
    recs = [{"step": s, "scalars": {}, "hists": {"beta_hist/attn/L00": {
        "lo": 0.0, "hi": 2.0, "counts": [float(s), 1.0, 0.0]}}} for s in range(10)]
    assert run.post({"batch_id": "h", "records": recs}).status_code == 200
    h = run.get("/histograms", site="attn", layer=0, max_points=4)
    assert h["total"] == 10 and h["key"] == "beta_hist/attn/L00"
    steps = [p["step"] for p in h["points"]]
    assert len(steps) <= 4 and steps[0] == 0 and steps[-1] == 9
    assert h["points"][-1]["counts"] == [9.0, 1.0, 0.0]


def test_compare_runs_side_by_side(client):
    a, b = Run(client, "a"), Run(client, "b")
    a.post({"batch_id": "x", "records": [{"step": 1, "scalars": {"loss": 3.0, "lr": 1.0}}]})
    b.post({"batch_id": "x", "records": [{"step": 1, "scalars": {"loss": 2.5, "val_loss": 2.0}}]})
    body = client.get("/api/v1/runs/compare", params={"a": a.id, "b": b.id}).json()
    by = {s["key"]: s for s in body["stats"]}
    assert by["loss"] == {"key": "loss", "a": 3.0, "b": 2.5, "delta": -0.5}
    assert by["lr"]["b"] is None and by["lr"]["delta"] is None and by["val_loss"]["a"] is None
    assert (body["a"]["name"], body["b"]["name"]) == ("a", "b")


def test_ack_and_silence_an_alert(run, client):
    t = run.post(batch("nf", [1], nonfinite__attn__0=1.0)).json()["alerts"][0]
    base = f"{run.base}/alerts/{t['alert_id']}"
    r = client.post(f"{base}/ack", headers=run.headers)
    assert r.status_code == 200 and r.json()["acknowledged"] is True
    r = client.post(f"{base}/silence", json={"minutes": 30}, headers=run.headers)
    assert r.status_code == 200 and r.json()["silenced_until"] is not None
    assert client.post(f"{base}/ack").status_code == 401
    assert client.post(f"{run.base}/alerts/999/ack", headers=run.headers).status_code == 404
    # a new episode needs a new ack
    run.post(batch("ok1", [2]))
    run.post(batch("ok2", [3]))
    run.post(batch("nf2", [4], nonfinite__attn__0=1.0))
    (alert,) = run.get("/alerts", state="firing")["data"]
    assert alert["acknowledged"] is False and alert["since_step"] == 4


def test_thresholds_read_update_and_apply(client, run):
    t = client.get("/api/v1/thresholds").json()
    assert t["collapse_beta"] == 0.05 and t["for_evals"] == 3
    new = {**t, "for_evals": 1}
    assert client.put("/api/v1/thresholds", json=new).status_code == 401
    bad = client.put("/api/v1/thresholds", json=new, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 403 and "admin" in bad.json()["detail"]
    r = client.put("/api/v1/thresholds", json=new, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["for_evals"] == 1
    assert client.get("/api/v1/thresholds").json()["for_evals"] == 1
    body = run.post(batch("c", [1], beta_p90__attn__0=0.01)).json()
    assert [t["state"] for t in body["alerts"]] == ["firing"]  # for_evals=1: fires at once


def test_thresholds_update_is_validated(client):
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = client.put("/api/v1/thresholds", json={"collapse_beta": 0.5, "collapse_clear_beta": 0.1},
                   headers=h)
    assert r.status_code == 422 and "collapse_clear_beta" in r.json()["detail"]
    r = client.put("/api/v1/thresholds", json={"no_such": 1}, headers=h)
    assert r.status_code == 422 and "no_such" in r.json()["detail"]


def test_thresholds_read_only_without_admin_token(tmp_path):
    from fastapi.testclient import TestClient

    from server import Settings, create_app

    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path}/x.db"))) as c:
        r = c.put("/api/v1/thresholds", json={}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "DELTASCOPE_ADMIN_TOKEN" in r.json()["detail"]


def test_healthz_and_dashboard_page(client, run):
    assert client.get("/healthz").json() == {"status": "ok", "db": "ok"}
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/api/v1/runs" in r.text


def test_dashboard_path_is_a_setting(tmp_path):
    from fastapi.testclient import TestClient

    from server import Settings, create_app

    page = tmp_path / "live.html"
    page.write_text("<html>live page</html>")
    s = Settings(db_url=f"sqlite:///{tmp_path}/x.db", dashboard_path=page)
    with TestClient(create_app(s)) as c:
        assert c.get("/").text == "<html>live page</html>"
    s = Settings(db_url=f"sqlite:///{tmp_path}/x.db", dashboard_path=tmp_path / "missing.html")
    with TestClient(create_app(s)) as c:
        r = c.get("/")
    assert r.status_code == 404 and "dashboard_path" in r.json()["detail"]



def test_stale_stored_state_never_breaks_ingest(client, run, settings, caplog):
    import json as _json

    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    with db:
        db.execute("UPDATE runs SET detector_state = ? WHERE id = ?",
                   (_json.dumps({"version": 999, "alerts": []}), run.id))
        db.execute("INSERT INTO server_state (name, value, updated) VALUES ('thresholds', ?, "
                   "'2026-01-01 00:00:00')", (_json.dumps({"for_evals": 1, "retired_field": 3}),))
    db.close()
    body = run.post(batch("x", [1], beta_p90__attn__0=0.01)).json()
    assert [t["state"] for t in body["alerts"]] == ["firing"]  # for_evals=1 kept, rest default
    assert "not restorable" in caplog.text
