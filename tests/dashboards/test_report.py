"""deltascope report from a run directory: every figure drawn and not blank, the HTML page, the alert
timeline replayed through the shared detector, the TensorBoard source, and one-line user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dashboards._alerts import replay
from dashboards._runlog import load_jsonl
from dashboards.report import FIGURES, ReportError, build_report, main, render
from server.catalogue import key
from server.rules import AlertState
from server.thresholds import Thresholds


@pytest.fixture(autouse=True)
def _default_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DELTASCOPE_THRESHOLDS__"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def report(fake_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report directory, built once through the command-line entry point."""
    out = tmp_path_factory.mktemp("report")
    assert main([str(fake_run), "--out", str(out)]) == 0
    return out


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_is_drawn_and_not_blank(report: Path, name: str) -> None:
    path = report / f"{name}.png"
    with Image.open(path) as im:
        w, h = im.size
        dpi = im.info.get("dpi", (0, 0))[0]
    assert w >= 900 and h >= 150, (w, h)
    assert round(dpi) == 150
    px = _pixels(path)
    ink = (px < 235).any(axis=2).mean()  # share of pixels that are not (near) white
    assert ink > 0.02, f"{name}.png is nearly blank ({ink:.3%} ink)"
    colours = np.unique(px.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 30, f"{name}.png has only {len(colours)} colours"


def test_html_references_every_figure_and_summarises_the_run(report: Path, fake_run: Path) -> None:
    page = (report / "report.html").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f'<img src="{name}.png"' in page  # relative: the directory moves as a whole
    assert page.count("<img ") == len(FIGURES) and "<script" not in page and "<link" not in page
    for text in ("final loss", "final val_loss", "beta_max", "preset", "tiny", "β p50", "identity (β &lt; 0.1)",
                 "beta_collapse", "gate_logit_saturation", "firing at end"):
        assert text in page, text
    facts = json.loads((report / "report.json").read_text())
    assert facts["log_steps"] == 61 and facts["first_step"] == 0 and facts["last_step"] == 599
    assert facts["final_val_loss"] is not None and facts["final_loss"] is not None
    assert [(r["site"], r["layer"]) for r in facts["layers"]][:3] == [("attn", 0), ("mlp", 0), ("attn", 1)]
    collapsed = next(r for r in facts["layers"] if (r["site"], r["layer"]) == ("mlp", 2))
    assert collapsed["beta_p90"] < Thresholds().collapse_beta
    assert collapsed["occ_identity"] > 0.9
    assert set(collapsed["firing"]) == {"beta_collapse", "gate_logit_saturation"}


def test_alert_timeline_shows_the_injected_collapse(report: Path, fake_run: Path) -> None:
    facts = json.loads((report / "report.json").read_text())
    fired = [t for t in facts["transitions"] if t["state"] == "firing"]
    assert {(t["rule"], t["site"], t["layer"]) for t in fired} == {
        ("beta_collapse", "mlp", 2), ("gate_logit_saturation", "mlp", 2)}
    collapse = next(t for t in fired if t["rule"] == "beta_collapse")
    assert 360 < collapse["step"] < 480  # the slide starts at 60% of 600 steps
    counts = {a["rule"]: a for a in facts["alerts"]}
    assert counts["beta_collapse"]["fired"] == 1 and counts["beta_collapse"]["firing_at_end"] == 1
    # the two-step wobble of attn L00 goes pending and back, never firing (for_evals = 3)
    assert counts["k_direction_instability"] == {
        "rule": "k_direction_instability", "severity": "warning", "pending": 1, "fired": 0, "resolved": 0,
        "firing_at_end": 0}

    from dashboards._figures import fig_alerts

    rep = replay(load_jsonl(fake_run))
    labels = [t.get_text() for t in fig_alerts(rep, Thresholds()).axes[0].get_yticklabels()]
    assert "beta_collapse  L2 mlp" in labels and "k_direction_instability  L0 attn" in labels
    pending = [s for s in rep.spans if s.rule == "k_direction_instability"]
    assert [(s.state, s.start, s.end, s.open) for s in pending] == [(AlertState.PENDING, 150, 170, False)]


def test_alert_timeline_says_when_there_are_none(make_run, tmp_path: Path) -> None:
    from dashboards._figures import fig_alerts

    log = load_jsonl(make_run(tmp_path / "calm", n_layer=2, steps=200, collapse=None, wobble=False))
    rep = replay(log)
    assert rep.transitions == [] and rep.spans == []
    texts = [t.get_text() for t in fig_alerts(rep, Thresholds()).axes[0].texts]
    assert any(t.startswith("no alerts") for t in texts), texts


def test_lines_of_one_step_merge(make_run, tmp_path: Path) -> None:
    log = load_jsonl(make_run(tmp_path / "r", n_layer=2, steps=200))
    assert log.scalars[0]["loss"] > 0 and log.last("val_loss") is not None
    assert "val_loss" not in log.scalars[100] and "val_loss" in log.scalars[199]
    steps, vals = log.grid("beta_p50", "attn", [0, 1])
    assert vals.shape == (2, len(steps)) and not np.isnan(vals).any()
    assert key("beta_hist", "mlp", 1) in log.hists[0] and log.hists[0][key("beta_hist", "mlp", 1)].sum() > 0


def test_report_without_histograms_draws_the_quantiles(make_run, tmp_path: Path) -> None:
    log = load_jsonl(make_run(tmp_path / "r", n_layer=2, steps=100, collapse=None))
    log.hists.clear()  # as MLflow gives it
    page = render(log, tmp_path / "out")
    assert (page.parent / "beta_distribution.png").stat().st_size > 10_000
    assert _pixels(page.parent / "beta_distribution.png").std() > 10


# -- user errors: one line that says what to do -------------------------------------------------------------


def _write(d: Path, text: str | None) -> Path:
    d.mkdir()
    if text is not None:
        (d / "stats.jsonl").write_text(text)
    return d


ERRORS = {
    "no_dir": (lambda p: p / "nope", "no such run directory"),
    "a_file": (lambda p: (p / "f").write_text("x") and p / "f", "is a file"),
    "no_stats": (lambda p: _write(p / "r", None), "has no stats.jsonl"),
    "empty": (lambda p: _write(p / "r", ""), "is empty"),
    "blank_lines": (lambda p: _write(p / "r", "\n\n"), "is empty"),
    "malformed": (lambda p: _write(p / "r", '{"step": 0, "loss": 1}\n{"step": 1, "loss": 1}\n{"step": 2, "lo'),
                  "stats.jsonl:3: malformed line"),
    "no_step": (lambda p: _write(p / "r", '{"step": 0}\n{"loss": 2.0}\n'), "stats.jsonl:2: malformed line"),
    "not_object": (lambda p: _write(p / "r", "[1, 2]\n"), "stats.jsonl:1: malformed line"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_mistakes_raise_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, expect = ERRORS[case]
    run = make(tmp_path)
    with pytest.raises(ReportError) as e:
        build_report(run, tmp_path / "out")
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and ";" in msg, msg  # what is wrong; what to do
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltascope: error: ") and expect in err


def test_bad_config_json_and_unknown_source(fake_run: Path, tmp_path: Path) -> None:
    run = _write(tmp_path / "r", (fake_run / "stats.jsonl").read_text().splitlines()[0] + "\n")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"config.json is not valid JSON \(line 1"):
        build_report(run)
    with pytest.raises(ReportError, match="unknown source 'csv'; use one of: jsonl, tensorboard"):
        build_report(run, source="csv")
    with pytest.raises(ReportError, match="has no TensorBoard event files"):
        build_report(run, source="tensorboard")


def test_command_line_needs_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "name a run" in capsys.readouterr().err
    assert main(["--mlflow-uri", "sqlite:///x.db"]) == 2
    assert "--mlflow-uri needs a run" in capsys.readouterr().err


# -- the TensorBoard sink's event files as the source -------------------------------------------------------


@pytest.mark.slow
def test_report_from_tensorboard_events_matches_jsonl(fake_run: Path, report: Path, tmp_path: Path) -> None:
    from probes.sink import Histogram
    from probes.sinks.tensorboard import TensorBoardSink

    run = tmp_path / "tiny"
    run.mkdir()
    (run / "config.json").write_text((fake_run / "config.json").read_text())
    sink = TensorBoardSink(run / "tb")
    beta_max = json.loads((fake_run / "config.json").read_text())["beta_max"]
    for line in (fake_run / "stats.jsonl").read_text().splitlines():
        obj = json.loads(line)
        step = obj.pop("step")
        hists = {k: Histogram(0.0, beta_max, tuple(v)) for k, v in obj.items() if isinstance(v, list)}
        sink.write(step, {k: v for k, v in obj.items() if not isinstance(v, list)}, hists)
    sink.close()
    assert sink.stats.errors == 0 and sink.stats.dropped == 0

    page = build_report(run, source="tensorboard")
    assert page == run / "report" / "report.html"
    tb = load_jsonl(fake_run)
    from dashboards._runlog import load_tensorboard

    got = load_tensorboard(run)
    assert got.steps == tb.steps
    for step in (0, 300, 590):  # histograms survive TensorBoard's bucket format exactly
        for k, counts in tb.hists[step].items():
            np.testing.assert_allclose(got.hists[step][k], counts)
    facts_tb = json.loads((run / "report" / "report.json").read_text())
    facts = json.loads((report / "report.json").read_text())
    assert facts_tb["alerts"] == facts["alerts"]
    for a, b in zip(facts_tb["layers"], facts["layers"], strict=True):
        for stat, v in b.items():
            if isinstance(v, float):
                assert a[stat] == pytest.approx(v, rel=1e-6), stat  # float32 in the event files
