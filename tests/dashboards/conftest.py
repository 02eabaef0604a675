"""A synthetic run directory shaped like ``deltascope train --out DIR`` writes it.

Per (site, layer) the gate's beta distribution is a scaled Beta law whose mean and spread evolve
from the init (every token at beta = beta_init = 1) toward a per-layer target: attention layers
drift toward identity, MLP layers toward reflection, one attention layer splits into two modes.
Tokens are sampled, binned into BETA_BINS bins on [0, beta_max] and summarised the way the probes
do, so quantiles, occupancies and histograms agree. Two events are injected for the alert timeline:
the last MLP layer collapses (beta -> 0, logits saturate) from 60% of training on, and the first
attention layer's direction wobbles for two log steps at step 150 (pending, never firing).
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.catalogue import BETA_BINS, SITES, key, parse_key
from server.thresholds import Thresholds

TOKENS = 2048
WOBBLE_STEPS = (150, 160)


def _target(site: str, layer: int, n_layer: int) -> float:
    frac = layer / max(n_layer - 1, 1)
    return 0.35 + 0.4 * frac if site == "attn" else 1.25 + 0.45 * frac


def _beta_tokens(rng: np.random.Generator, t: float, site: str, layer: int, n_layer: int,
                 beta_max: float, collapse: tuple[str, int] | None) -> np.ndarray:
    m = _target(site, layer, n_layer)
    mean = m + (1.0 - m) * math.exp(-t / 0.15)
    conc = 15 + 400 * math.exp(-t / 0.1)
    if (site, layer) == collapse and t > 0.6:
        s = min((t - 0.6) / 0.15, 1.0)  # log-linear slide to beta ~ 0.004 by 75% of training
        mean = math.exp((1 - s) * math.log(mean) + s * math.log(0.004))
        conc = 15 + 300 * s
    u = min(max(mean / beta_max, 1e-4), 1 - 1e-4)
    beta = beta_max * rng.beta(u * conc, (1 - u) * conc, TOKENS)
    if (site, layer) == ("attn", 1) and t > 0.2:  # a second mode of tokens that skip the layer
        n = int(TOKENS * min(0.35, (t - 0.2)))
        beta[:n] = beta_max * rng.beta(2, 120, n)
    return beta


def write_run(out: Path, n_layer: int = 3, steps: int = 600, every: int = 10, beta_max: float = 2.0,
              collapse: tuple[str, int] | None = ("mlp", 2), wobble: bool = True, seed: int = 0) -> Path:
    """Write stats.jsonl, config.json and summary.json under ``out``; returns ``out``."""
    th = Thresholds()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    edges = np.linspace(0.0, beta_max, BETA_BINS + 1)
    first_h: dict[tuple[str, int], float] = {}
    prev_site: tuple[str, int] | None = None
    lines: list[dict] = []
    warmup, peak = steps // 10, 3e-3
    loss = math.nan
    for step in range(0, steps, every):
        t = step / steps
        lr = peak * (step + 1) / warmup if step < warmup else \
            peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))
        loss = 2.3 + 6.0 * math.exp(-step / 110) + 0.04 * rng.standard_normal()
        rec: dict = {"step": step, "loss": loss, "lr": lr, "grad_norm": 0.8 + 0.3 * rng.random()}
        prev_site = None
        for layer in range(n_layer):
            for site in SITES:
                b = _beta_tokens(rng, t, site, layer, n_layer, beta_max, collapse)
                counts, _ = np.histogram(b, bins=edges)
                u = np.clip(b / beta_max, 1e-12, 1 - 1e-12)
                logit = np.log(u / (1 - u))
                h = (1.2 + 0.4 * layer) * (1 + 1.5 * t) * (1 + 0.02 * rng.standard_normal())
                if (site, layer) == collapse and t > 0.6:
                    h *= 1 - 0.6 * min((t - 0.6) / 0.15, 1.0)
                first_h.setdefault((site, layer), h)
                conc = 0.3 + 0.08 * layer + 0.05 * rng.random()
                cos_step = 1 - 0.55 * math.exp(-t / 0.08) - 0.01 * rng.random()
                if wobble and (site, layer) == ("attn", 0) and step in WOBBLE_STEPS:
                    cos_step = 0.18
                stats = {
                    "beta_mean": b.mean(), "beta_std": b.std(),
                    "beta_p01": np.quantile(b, 0.01), "beta_p10": np.quantile(b, 0.10),
                    "beta_p50": np.quantile(b, 0.50), "beta_p90": np.quantile(b, 0.90),
                    "beta_p99": np.quantile(b, 0.99),
                    "occ_identity": np.mean(b < th.identity_below),
                    "occ_projection": np.mean(np.abs(b - 1) < th.projection_band),
                    "occ_reflection": np.mean(b > th.reflection_above),
                    "occ_negative": np.mean(b > 1),
                    "gate_logit_sat": np.mean(np.abs(logit) > th.logit_saturation),
                    "h_norm_mean": h, "h_norm_p01": 0.3 * h, "h_norm_min": 0.12 * h, "h_norm_max": 4.5 * h,
                    "h_norm_drift": h / first_h[(site, layer)],
                    "k_unit_err": 1e-7 * rng.random(),
                    "k_concentration": conc, "k_abs_concentration": conc + 0.15,
                    "k_cos_token": 0.22 + 0.12 * t + 0.04 * layer + 0.01 * rng.standard_normal(),
                    "write_erase": 1 + 0.2 * rng.standard_normal(), "update_ratio": 0.05 + 0.1 * t,
                    "nonfinite": 0.0,
                }
                if step > 0:
                    stats["k_cos_step"] = cos_step
                if prev_site is not None:
                    stats["k_cos_layer"] = 0.1 + 0.02 * rng.random()
                prev_site = (site, layer)
                rec.update({key(s, site, layer): round(float(v), 7) for s, v in stats.items()})
                rec[key("beta_hist", site, layer)] = [int(c) for c in counts]
        lines.append(rec)
        if step and step % 200 == 0:
            lines.append({"step": step, "val_loss": loss + 0.12})
    lines.append({"step": steps - 1, "val_loss": loss + 0.15})
    with (out / "stats.jsonl").open("w") as f:
        for rec in lines:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    config = {"preset": "tiny", "n_layer": n_layer, "d_model": 128, "n_head": 4, "head_dim": 32, "d_v": 1,
              "beta_max": beta_max, "beta_init": 1.0, "residual": "delta", "geometry": "k_map",
              "value_head": "code", "vocab_size": 4096, "block_size": 128, "batch_size": 16, "seq_len": 128,
              "lr": peak, "max_steps": steps, "params": 1234567, "corpus": "synthetic"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    summary = {"steps": steps, "loss": loss, "val_loss": loss + 0.15, "tokens_per_s": 5100.0,
               "stopped_by": None, "alerts": []}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out


@pytest.fixture(scope="session")
def make_run() -> Callable[..., Path]:
    """The generator itself, for tests that need a variant (other depth, beta_max, no collapse)."""
    return write_run


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer run of 600 steps logged every 10, with a collapse of mlp L02 from step 360."""
    return write_run(tmp_path_factory.mktemp("runs") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real deltascope server (uvicorn, SQLite in a temp dir) on a free loopback port."""
    import httpx
    import uvicorn

    from server import Settings, create_app

    db = tmp_path_factory.mktemp("server") / "deltascope.db"
    app = create_app(Settings(db_url=f"sqlite:///{db}", log_level="warning"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not come up")
        time.sleep(0.1)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def ingest_run(url: str, run_dir: Path, name: str = "tiny") -> int:
    """Register ``run_dir`` on the server and send its stats.jsonl as the HTTP sink would; the run id."""
    import httpx

    config = json.loads((run_dir / "config.json").read_text())
    beta_max = config["beta_max"]
    r = httpx.post(f"{url}/api/v1/runs", json={"name": name, "config": config, "beta_max": beta_max})
    r.raise_for_status()
    rid, token = r.json()["id"], r.json()["token"]
    records = []
    for line in (run_dir / "stats.jsonl").read_text().splitlines():
        obj = json.loads(line)
        rec: dict = {"step": obj.pop("step"), "scalars": {}, "hists": {}}
        for k, v in obj.items():
            p = parse_key(k)
            if isinstance(v, list) and p is not None:
                rec["hists"][k] = {"lo": 0.0, "hi": beta_max, "counts": [float(c) for c in v]}
            elif v is not None:
                rec["scalars"][k] = float(v)
        records.append(rec)
    for i in range(0, len(records), 20):
        r = httpx.post(f"{url}/api/v1/runs/{rid}/stats", headers={"Authorization": f"Bearer {token}"},
                       json={"batch_id": f"b{i}", "records": records[i : i + 20]}, timeout=30)
        r.raise_for_status()
    return rid
