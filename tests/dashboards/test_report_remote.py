"""Reports from the other sinks: an MLflow run (a real sqlite tracking store) and the deltascope
server's JSON API (a real uvicorn server). Each must tell the same story as the run directory."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dashboards.report import (
    ReportError,
    build_report,
    log_report_to_mlflow,
    main,
    report_from_mlflow,
    report_from_server,
)
from tests.dashboards.conftest import ingest_run


@pytest.fixture(autouse=True)
def _default_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DELTASCOPE_THRESHOLDS__"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def small_run(make_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 300 steps, with the collapse of mlp L01 from step 180."""
    return make_run(tmp_path_factory.mktemp("runs") / "small", n_layer=2, steps=300, collapse=("mlp", 1))


@pytest.fixture(scope="module")
def reference(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    page = build_report(small_run, tmp_path_factory.mktemp("ref"))
    return json.loads((page.parent / "report.json").read_text())


def _same_story(got: dict, ref: dict) -> None:
    assert got["alerts"] == ref["alerts"]
    assert [(t["rule"], t["site"], t["layer"], t["state"], t["step"]) for t in got["transitions"]] == \
           [(t["rule"], t["site"], t["layer"], t["state"], t["step"]) for t in ref["transitions"]]
    assert got["log_steps"] == ref["log_steps"] and got["beta_max"] == ref["beta_max"]
    assert got["final_val_loss"] == pytest.approx(ref["final_val_loss"])
    for a, b in zip(got["layers"], ref["layers"], strict=True):
        assert a.pop("firing") == b["firing"]
        assert a == pytest.approx({k: v for k, v in b.items() if k != "firing"})


def _one_line(e: pytest.ExceptionInfo[ReportError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- MLflow -------------------------------------------------------------------------------------------------


def _log_to_mlflow(uri: str, run_dir: Path, artifacts: Path) -> str:
    """What MLflowSink sends: params as str(v), canonical keys unchanged, no histograms."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("deltascope", artifact_location=artifacts.as_uri())  # not ./mlruns
    run = c.create_run(exp, run_name=run_dir.name)
    rid = run.info.run_id
    config = json.loads((run_dir / "config.json").read_text())
    c.log_batch(rid, params=[Param(k, str(v)) for k, v in config.items()])
    for line in (run_dir / "stats.jsonl").read_text().splitlines():
        obj = json.loads(line)
        step = obj.pop("step")
        ms = [Metric(k, float(v), 0, step) for k, v in obj.items() if not isinstance(v, list)]
        for i in range(0, len(ms), 1000):
            c.log_batch(rid, metrics=ms[i : i + 1000])
    c.set_terminated(rid)
    return rid


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")  # inside MLflow's sqlite store
def test_mlflow_round_trip(small_run: Path, reference: dict, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rid = _log_to_mlflow(uri, small_run, tmp_path / "artifacts")

    page = report_from_mlflow(uri, rid, tmp_path / "by_id")
    got = json.loads((page.parent / "report.json").read_text())
    _same_story(got, reference)
    assert got["run"] == "small" and any("no histograms" in n for n in got["notes"])
    assert "MLflow keeps no histograms" in page.read_text()

    # by run name, through the command line, attaching the report to the run
    out = tmp_path / "by_name"
    assert main(["--mlflow-uri", uri, "--run-id", "small", "--out", str(out), "--attach"]) == 0
    from mlflow.tracking import MlflowClient

    names = {Path(f.path).name for f in MlflowClient(tracking_uri=uri).list_artifacts(rid, "report")}
    assert {"report.html", "report.json", "alerts.png", "beta_distribution.png", "loss.png"} <= names
    assert (tmp_path / "artifacts" / rid / "artifacts" / "report" / "report.html").is_file()

    assert log_report_to_mlflow(uri, rid, out) == rid
    with pytest.raises(ReportError) as e:
        report_from_mlflow(uri, "no-such-run", tmp_path / "x")
    assert "no MLflow run with id or name 'no-such-run'" in _one_line(e)
    with pytest.raises(ReportError) as e:
        log_report_to_mlflow(uri, rid, tmp_path / "empty")
    assert "holds no report.html" in _one_line(e)


# -- the deltascope server ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_round_trip(live_server: str, small_run: Path, reference: dict, tmp_path: Path) -> None:
    rid = ingest_run(live_server, small_run, name="small")
    page = report_from_server(live_server, rid, tmp_path / "by_id")
    got = json.loads((page.parent / "report.json").read_text())
    _same_story(got, reference)
    assert got["run"] == "small" and got["notes"] == []
    # by name, through the command line; the histograms came through (heatmap, not quantile bars)
    out = tmp_path / "by_name"
    assert main(["small", "--server", live_server, "--out", str(out)]) == 0
    assert (out / "beta_distribution.png").stat().st_size > 20_000


def test_server_errors_are_one_line(live_server: str, tmp_path: Path) -> None:
    with pytest.raises(ReportError) as e:
        report_from_server(live_server, 987654, tmp_path)
    assert "unknown run 987654" in _one_line(e) and "/api/v1/runs" in str(e.value)
    with pytest.raises(ReportError) as e:
        report_from_server(live_server, "no-such-name", tmp_path)
    assert "no run named 'no-such-name'" in _one_line(e)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ReportError) as e:
        report_from_server(dead, 1, tmp_path)
    assert "cannot reach the deltascope server" in _one_line(e)


class _NotDeltascope(BaseHTTPRequestHandler):
    """Some other web service: every path is a 404 with a JSON body, like a framework's default."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"detail": "Not Found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_server_without_the_api_is_named(tmp_path: Path) -> None:
    httpd = HTTPServer(("127.0.0.1", 0), _NotDeltascope)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(ReportError) as e:
            report_from_server(f"http://127.0.0.1:{httpd.server_port}", 1, tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
    msg = _one_line(e)
    assert "has no GET /api/v1/runs/1 route (HTTP 404)" in msg and "not a deltascope server" in msg
