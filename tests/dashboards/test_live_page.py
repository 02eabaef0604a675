"""The live page (dashboards/live.html) against the real server.

Fast: ``/`` serves the page; every API call in its script names a path, method and query parameter
the server's OpenAPI document publishes; every stat and threshold it reads is catalogued.

Slow: a real uvicorn server on 127.0.0.1 and the page in real headless Chromium. The page opens on
an empty server, then a real tiny training run streams into it; the charts must fill without a
reload. An alert is ingested for that run while the page is open, acknowledged with the admin
token, and a second training run with beta forced to ~0 in attn L00 must take over the page
(follow-newest) with its beta_collapse row, again without a reload.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import dashboards
from server import Settings, create_app
from server.catalogue import STAT_NAMES, key
from server.thresholds import Thresholds

PAGE = Path(dashboards.__file__).parent / "live.html"
CHROMIUM = os.environ.get("DELTASCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = "live-page-admin"


def script() -> str:
    html = PAGE.read_text(encoding="utf-8")
    return html[html.index("<script>"):html.rindex("</script>")]


# -- fast ----------------------------------------------------------------------------------------


def test_root_serves_the_live_page(tmp_path):
    from fastapi.testclient import TestClient

    assert Settings().dashboard_path.resolve() == PAGE.resolve()
    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ds.db'}"))) as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == PAGE.read_text(encoding="utf-8")


def _norm(path: str) -> str:
    return re.sub(r"\$\{[^}]*\}|\{[^}]*\}", "{}", path)


def test_page_calls_only_published_api_paths(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ds.db'}"))) as c:
        spec = c.get("/openapi.json").json()
    ops = {(m.upper(), _norm(p)): op for p, item in spec["paths"].items() for m, op in item.items()}
    js = script()
    calls = [(m, p) for m, _q, p in re.findall(r'api\("(GET|POST|PUT)",\s*([`"])(.*?)\2', js)]
    calls += [("GET", p) for p in re.findall(r'new EventSource\("([^"]+)"\)', js)]
    # every string literal that starts with an API path is one of the calls parsed above
    assert len(re.findall(r'[`"]/api/v1', js)) == len(calls) >= 10
    for method, url in calls:
        path, _, query = url.partition("?")
        op = ops.get((method, _norm(path)))
        assert op is not None, f"{method} {path}: not in the server's OpenAPI document"
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        for name in re.findall(r"(?:^|&)([a-z_]+)=", query):
            assert name in declared, f"{method} {path}: query parameter {name!r} not among {sorted(declared)}"
    used = {(m, _norm(u.partition("?")[0])) for m, u in calls}
    for need in [("GET", "/api/v1/runs"), ("GET", "/api/v1/runs/compare"), ("GET", "/api/v1/thresholds"),
                 ("GET", "/api/v1/runs/{}/history"), ("GET", "/api/v1/events"),
                 ("POST", "/api/v1/runs/{}/alerts/{}/ack"), ("POST", "/api/v1/runs/{}/alerts/{}/silence")]:
        assert need in used, need


def test_page_reads_only_catalogued_stats_and_known_thresholds():
    js = script()
    stats = set(re.findall(r'\bstat: "([a-z0-9_]+)"', js)) | set(re.findall(r'MEDIAN = "([a-z0-9_]+)"', js))
    stats |= set(re.findall(r"\bst\.([a-z0-9_]+)", js))  # per-layer stats read off GET .../layers
    assert {"beta_p50", "occ_identity", "occ_negative", "h_norm_drift", "k_cos_layer"} <= stats
    assert stats <= set(STAT_NAMES), stats - set(STAT_NAMES)
    # thresholds are read as ``t.<field>`` off GET /thresholds; all fields are snake_case
    fields = set(re.findall(r"\bt\.([a-z]+_[a-z_]+)", js))
    assert {"identity_below", "projection_band", "reflection_above", "k_norm_drift_factor"} <= fields
    assert fields <= set(Thresholds.model_fields), fields - set(Thresholds.model_fields)


# -- slow: real server, real training, real Chromium ----------------------------------------------


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTASCOPE_CACHE", str(d))
        yield d


def _train(url: str, out: Path, steps: int) -> dict:
    from ddl.train import train
    from ddl.train_config import TrainConfig

    return train(TrainConfig(preset="tiny", max_steps=steps, every=2, server=url, overrides={"n_layer": 2},
                             batch_size=8, seq_len=64, vocab_size=1024, out=out, eval_every=1000,
                             eval_batches=2, log_every=1000, mlflow_uri=f"sqlite:///{out.parent / 'mlflow.db'}"))


@contextmanager
def chromium(profile: Path, width: int = 1400, height: int = 900):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set DELTASCOPE_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_ARGS, viewport={"width": width, "height": height})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def _canvas_colours(page, selector: str) -> int:
    """Distinct opaque colours drawn on a canvas (a blank one has none)."""
    return page.evaluate("""sel => {
        const c = document.querySelector(sel);
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 16) {
            if (d[i + 3] === 255) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        }
        return seen.size;
    }""", selector)


def _heat_pixel(page, row: int) -> list[int]:
    """RGB of the heatmap's last column in ``row`` (rows are drawn in forward order)."""
    return page.evaluate("""row => {
        const c = document.querySelector("#heatmap");
        const dpr = c.width / c.clientWidth, rows = Number(c.dataset.rows);
        const rowH = (c.clientHeight - 46) / rows;
        const x = (c.clientWidth - 20) * dpr, y = (6 + rowH * (row + 0.5)) * dpr;
        return Array.from(c.getContext("2d").getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3));
    }""", row)


def _collapse_records(url: str, run_id: int, steps: list[int]) -> list[dict]:
    """The run's latest stats with mlp L01's gate pushed to ~0 (beta_p90 under collapse_beta)."""
    layers = httpx.get(f"{url}/api/v1/runs/{run_id}/layers", timeout=10).json()
    base = {key(stat, lay["site"], lay["layer"]): v for lay in layers["layers"] for stat, v in lay["stats"].items()}
    forced = {"beta_mean": 0.004, "beta_p01": 0.0, "beta_p10": 0.001, "beta_p50": 0.003, "beta_p90": 0.01,
              "beta_p99": 0.02, "occ_identity": 1.0, "occ_projection": 0.0, "occ_reflection": 0.0, "occ_negative": 0.0}
    base.update({key(stat, "mlp", 1): v for stat, v in forced.items()})
    return [{"step": s, "scalars": {**base, "loss": layers["scalars"].get("loss", 5.0)}} for s in steps]


def _save(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays on top in a full-page shot
    page.mouse.move(0, 0)
    page.screenshot(path=str(out), full_page=True)
    if art := os.environ.get("DELTASCOPE_ARTIFACTS"):
        Path(art).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(art) / name)
    return out


@pytest.mark.slow
def test_live_page_follows_real_training_in_chromium(corpus_cache, tmp_path, monkeypatch):
    import torch

    import ddl.train
    from tests.server.live import LiveServer

    server = LiveServer(tmp_path, admin_token=ADMIN, sse_ping_s="1").start()
    console: list[tuple[str, str]] = []
    try:
        with chromium(tmp_path / "profile") as page:
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))

            # 1. an empty server says how to start a run
            page.goto(server.url + "/")
            page.wait_for_selector("#empty:not([hidden])")
            empty = page.inner_text("#empty")
            assert "deltascope demo" in empty and "deltascope train" in empty and "--server" in empty
            page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page

            # 2. a real training run streams in while the page is open
            _train(server.url, tmp_path / "run-a", steps=30)
            runs = httpx.get(server.url + "/api/v1/runs", timeout=10).json()["data"]
            assert [r["name"] for r in runs] == ["run-a"]
            a = runs[0]["id"]
            page.wait_for_function("document.querySelector('#heatmap').dataset.steps === '15'", timeout=20_000)
            assert "run-a" in page.inner_text("#run-select")
            heat = page.eval_on_selector("#heatmap", "c => ({...c.dataset})")
            assert heat == {"rows": "4", "steps": "15", "cells": "60"}, heat
            assert _canvas_colours(page, "#heatmap") > 10 and _canvas_colours(page, "#heatmap-scale") > 50
            assert page.eval_on_selector("#occupancy", "c => c.dataset.bars") == "4"
            assert _canvas_colours(page, "#occupancy") >= 3
            for stat in ("h_norm_drift", "k_cos_step", "k_cos_token", "k_cos_layer"):
                assert int(page.eval_on_selector(f"#chart-{stat}", "c => c.dataset.points")) > 0, stat
                assert _canvas_colours(page, f"#chart-{stat}") > 3, stat
            assert page.inner_text("#verdict").lower() == runs[0]["verdict"]
            stored = httpx.get(f"{server.url}/api/v1/runs/{a}/alerts", timeout=10).json()["count"]
            assert page.locator("#alerts tbody tr[data-rule]").count() == stored
            page.select_option("#heatmap-mode", "occ_negative")
            page.wait_for_function("document.querySelector('#heatmap-title').textContent.includes('negative')")
            page.wait_for_function("document.querySelector('#heatmap').dataset.cells === '60'")
            page.select_option("#heatmap-mode", "beta_p50")
            assert [c for c in console if c[0] in ("error", "pageerror")] == []

            # 3. an alert ingested for that run shows up live, and the heatmap grows
            for i, step in enumerate((30, 32, 34)):
                r = httpx.post(f"{server.url}/api/v1/runs/{a}/stats", headers={"Authorization": f"Bearer {ADMIN}"},
                               json={"batch_id": f"collapse-{i}", "records": _collapse_records(server.url, a, [step])},
                               timeout=10)
                assert r.status_code == 200, r.text
            row = '#alerts tr[data-rule="beta_collapse"][data-state="firing"][data-site="mlp"][data-layer="1"]'
            page.wait_for_selector(row, timeout=10_000)
            page.wait_for_function("document.querySelector('#heatmap').dataset.steps === '18'", timeout=10_000)
            blue = _heat_pixel(page, 3)
            assert blue[2] > blue[0] + 60, blue  # beta ~ 0 is drawn at the identity (blue) end
            assert page.evaluate("window.__sameDocument === true")
            _save(page, tmp_path, "live_page_run_a.png")

            # 4. acknowledge: no token explains itself, a wrong one shows the server's 403, admin works
            page.click(f"{row} button.ack")
            status = "document.querySelector('#alert-status').textContent"
            page.wait_for_function(f"{status}.includes('needs a write token')")
            page.fill("#token", "not-a-token")
            page.click("#token-save")
            page.click(f"{row} button.ack")
            page.wait_for_function(f"{status}.includes('HTTP 403')")
            assert "does not grant writes" in page.inner_text("#alert-status")
            page.fill("#token", ADMIN)
            page.click("#token-save")
            page.click(f"{row} button.ack")
            page.wait_for_selector(f"{row} button.ack[disabled]")
            assert "acknowledged" in page.inner_text(row)
            assert page.evaluate("localStorage.getItem('deltascope.token')") == ADMIN

            # 5. a second run with attn L00's gate forced to ~0 takes over the page (follow newest)
            real = ddl.train.DDLModel

            def faulty(cfg):
                model = real(cfg)
                model.blocks[0].attn_delta.beta_gate.register_forward_hook(
                    lambda mod, args, out: torch.full_like(out, 1e-4))
                return model

            monkeypatch.setattr(ddl.train, "DDLModel", faulty)
            _train(server.url, tmp_path / "run-b", steps=8)
            monkeypatch.setattr(ddl.train, "DDLModel", real)
            b = max(r["id"] for r in httpx.get(server.url + "/api/v1/runs", timeout=10).json()["data"])
            page.wait_for_selector('#alerts tr[data-rule="beta_collapse"][data-state="firing"]'
                                   '[data-site="attn"][data-layer="0"]', timeout=20_000)
            assert page.inner_text("#run-title") == f"#{b} run-b"
            assert page.locator(f'#toasts .toast[data-run="{b}"]').count() == 0  # no toast for the run on screen
            page.wait_for_function("document.querySelector('#heatmap').dataset.steps === '4'", timeout=10_000)
            page.hover("#heatmap", position={"x": 300, "y": 12})
            tip = page.inner_text("#tooltip")
            assert tip.startswith("attn L00 · step") and "β median: 0.0" in tip, tip
            assert page.evaluate("window.__sameDocument === true")

            # 6. compare B (on screen) with A
            page.select_option("#run-b", str(a))
            page.wait_for_selector("#compare-body:not([hidden]) #matrix tbody tr")
            assert page.eval_on_selector("#compare-beta", "c => c.dataset.rows") == "4"
            assert page.locator("#matrix tbody tr").count() > 20
            assert "loss" in page.inner_text("#scalars")
            shot = _save(page, tmp_path, "live_page_1400.png")
            assert shot.stat().st_size > 50_000

            # readable at 1000 px: nothing wider than the window
            page.set_viewport_size({"width": 1000, "height": 900})
            page.wait_for_timeout(400)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1000
            _save(page, tmp_path, "live_page_1000.png")

        # the one 403 above is the only thing the browser complained about
        errors = [c for c in console if c[0] in ("error", "pageerror") and "403" not in c[1]]
        assert errors == [], errors
    finally:
        server.stop()
