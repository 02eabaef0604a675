"""Server ingest throughput: points/s through ``POST /api/v1/runs/{id}/stats`` on a real server.

Each record is one log step of a 12-layer model: 24 sites (attn, mlp) x the catalogue's 27 stats
plus ``loss`` and ``lr`` (650 points), values shaped like a healthy run (no alerts, so the
detector does its usual work and nothing more). Bodies are serialised before the clock starts,
so the client's JSON encoding is not counted; each POST is answered only after its commit.

    python bench/ingest.py                        # starts a server on a temporary SQLite file
    python bench/ingest.py --records 5 --batches 200 --hists
    python bench/ingest.py --url http://127.0.0.1:8765   # an already running server
    python bench/ingest.py --against-mlflow       # also an MLflow tracking server, same records

Prints one line: points/s, the batch shape and the database. With ``--against-mlflow`` it also
starts ``mlflow server`` (sqlite backend in a temporary directory, ``--workers 1``, job execution
off) and sends the SAME records, batch by batch, through ``MlflowClient().log_batch`` in chunks
of <= 1000 metrics (MLflow's per-call limit), sequentially from one thread like ours; each side
sends batches until ``--seconds`` (default 25) have passed or the batches run out, then it prints
one line per side and the ratio. Metric objects are built before the clock starts, like our bodies.
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


MLFLOW_CHUNK = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH


def start_mlflow(tmp: str) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend under ``tmp``, one worker, no job runner."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
           "--default-artifact-root", f"{tmp}/mlartifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("mlflow server did not start in 60 s")


def bench_mlflow(url: str, batches: list[list[dict]], warmup: int, seconds: float) -> tuple[int, float, int]:
    """(points, seconds, batches sent) for log_batch against the MLflow server at ``url``."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run_id = client.create_run(experiment_id="0", run_name="bench-ingest").info.run_id
    ts0 = int(time.time() * 1000)
    chunked = []
    for recs in batches[:warmup + 200]:  # ~650k points: more than MLflow takes in --seconds
        ms = [Metric(k, float(v), ts0 + r["step"], r["step"]) for r in recs for k, v in r["scalars"].items()]
        chunked.append([ms[i:i + MLFLOW_CHUNK] for i in range(0, len(ms), MLFLOW_CHUNK)])
    for chunks in chunked[:warmup]:
        for ch in chunks:
            client.log_batch(run_id, metrics=ch)
    points = sent = 0
    t0 = time.perf_counter()
    for chunks in chunked[warmup:]:
        for ch in chunks:
            client.log_batch(run_id, metrics=ch)
            points += len(ch)
        sent += 1
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    client.set_terminated(run_id)
    return points, dt, sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start one on a temporary SQLite file)")
    ap.add_argument("--db", help="SQLAlchemy URL for the started server")
    ap.add_argument("--batches", type=int, default=None,
                    help="timed batches (default 100; 1000 with --against-mlflow, cut by --seconds)")
    ap.add_argument("--records", type=int, default=5, help="log steps per batch")
    ap.add_argument("--warmup", type=int, default=5, help="batches sent before timing")
    ap.add_argument("--hists", action="store_true", help="also send 24 beta histograms per record")
    ap.add_argument("--against-mlflow", action="store_true",
                    help="also measure an MLflow tracking server (subprocess) on the same records")
    ap.add_argument("--seconds", type=float, default=None,
                    help="stop each side after this many timed seconds (default: none; 25 with "
                         "--against-mlflow)")
    a = ap.parse_args()
    if a.batches is None:
        a.batches = 1000 if a.against_mlflow else 100
    if a.seconds is None:
        a.seconds = 25.0 if a.against_mlflow else float("inf")
    if a.against_mlflow and a.hists:
        ap.error("--hists has no MLflow counterpart")

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
                batches = [[record(b * a.records + i, rng, a.hists) for i in range(a.records)]
                           for b in range(n)]
                bodies = [json.dumps({"batch_id": f"b{b}", "records": recs})
                          for b, recs in enumerate(batches)]
                for body in bodies[:a.warmup]:
                    c.post(path, content=body).raise_for_status()
                points = sent = 0
                t0 = time.perf_counter()
                for body in bodies[a.warmup:]:
                    r = c.post(path, content=body)
                    r.raise_for_status()
                    points += r.json()["points"]
                    sent += 1
                    if time.perf_counter() - t0 >= a.seconds:
                        break
                dt = time.perf_counter() - t0
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        per = points // (sent * a.records)
        print(f"ingest: {points / dt:,.0f} points/s ({points:,} points in {dt:.2f} s; {sent} batches "
              f"x {a.records} records x {per} points{', + 24 histograms/record' if a.hists else ''}; "
              f"{'server at ' + a.url if a.url else db.split(':')[0]})", flush=True)
        if not a.against_mlflow:
            return
        mproc, murl = start_mlflow(tmp)
        try:
            mpoints, mdt, msent = bench_mlflow(murl, batches, a.warmup, a.seconds)
        finally:
            mproc.terminate()
            try:
                mproc.wait(20)
            except subprocess.TimeoutExpired:
                mproc.kill()
                mproc.wait(10)
        print(f"mlflow: {mpoints / mdt:,.0f} points/s ({mpoints:,} points in {mdt:.2f} s; {msent} batches "
              f"x {a.records} records x {per} points, log_batch chunks <= {MLFLOW_CHUNK}; "
              f"mlflow server --workers 1, sqlite)")
        print(f"ratio: deltascope / mlflow = {(points / dt) / (mpoints / mdt):.1f}x")


if __name__ == "__main__":
    main()
