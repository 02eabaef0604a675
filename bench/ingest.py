"""Server ingest throughput: points/s through ``POST /api/v1/runs/{id}/stats`` on a real server.

Each record is one log step of a 12-layer model: 24 sites (attn, mlp) x the catalogue's 27 stats
plus ``loss`` and ``lr`` (650 points), values shaped like a healthy run (no alerts, so the
detector does its usual work and nothing more). Bodies are serialised before the clock starts,
so the client's JSON encoding is not counted; each POST is answered only after its commit.

    python bench/ingest.py                        # starts a server on a temporary SQLite file
    python bench/ingest.py --records 5 --batches 200 --hists
    python bench/ingest.py --url http://127.0.0.1:8765   # an already running server

Prints one line: points/s, the batch shape and the database.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.catalogue import BETA_BINS, STAT_NAMES, key

LAYERS = 12
HEALTHY = {"beta_p90": 0.9, "beta_p10": 0.2, "gate_logit_sat": 0.01, "h_norm_mean": 1.5,
           "h_norm_drift": 1.1, "k_abs_concentration": 0.3, "k_cos_probe": 0.9, "k_cos_step": 0.9,
           "k_concentration": 0.3, "nonfinite": 0.0}


def record(step: int, rng: random.Random, hists: bool) -> dict:
    scalars = {key(s, site, layer): HEALTHY.get(s, rng.random())
               for layer in range(LAYERS) for site in ("attn", "mlp") for s in STAT_NAMES}
    scalars.update(loss=3.0 + rng.random(), lr=3e-4)
    rec: dict = {"step": step, "scalars": scalars}
    if hists:
        rec["hists"] = {key("beta_hist", site, layer): {"lo": 0.0, "hi": 2.0, "counts": [
            float(rng.randrange(100)) for _ in range(BETA_BINS)]}
            for layer in range(LAYERS) for site in ("attn", "mlp")}
    return rec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DELTASCOPE_DB_URL": db_url, "DELTASCOPE_PORT": str(port),
           "DELTASCOPE_LOG_LEVEL": "warning"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "server"], env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start in 30 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start one on a temporary SQLite file)")
    ap.add_argument("--db", help="SQLAlchemy URL for the started server")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--records", type=int, default=5, help="log steps per batch")
    ap.add_argument("--warmup", type=int, default=5, help="batches sent before timing")
    ap.add_argument("--hists", action="store_true", help="also send 24 beta histograms per record")
    a = ap.parse_args()

    rng = random.Random(0)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        db = a.db or f"sqlite:///{tmp}/bench.db"
        url = a.url
        if url is None:
            proc, url = start_server(db)
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                run = c.post("/api/v1/runs", json={"name": "bench-ingest"}).json()
                c.headers.update({"authorization": f"Bearer {run['token']}",
                                  "content-type": "application/json"})
                path = f"/api/v1/runs/{run['id']}/stats"
                n = a.warmup + a.batches
                bodies = [json.dumps({"batch_id": f"b{b}", "records": [
                    record(b * a.records + i, rng, a.hists) for i in range(a.records)]})
                    for b in range(n)]
                for body in bodies[:a.warmup]:
                    c.post(path, content=body).raise_for_status()
                points = 0
                t0 = time.perf_counter()
                for body in bodies[a.warmup:]:
                    r = c.post(path, content=body)
                    r.raise_for_status()
                    points += r.json()["points"]
                dt = time.perf_counter() - t0
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    per = points // (a.batches * a.records)
    print(f"ingest: {points / dt:,.0f} points/s ({points:,} points in {dt:.2f} s; {a.batches} batches "
          f"x {a.records} records x {per} points{', + 24 histograms/record' if a.hists else ''}; "
          f"{'server at ' + a.url if a.url else db.split(':')[0]})")


if __name__ == "__main__":
    main()
