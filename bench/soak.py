"""Soak: many simulated training jobs posting stats every step to one server on loopback, for a
bounded time; then every acknowledged record is read back.

Each job is a thread with its own HTTP connection, as each training process has its own HTTP
sink: it registers a run, then posts one batch per step holding that step's record, the full
catalogue for 24 sites (12 layers x attn/mlp: 27 stats each, plus loss and lr = 650 points) and
a BETA_BINS-bin beta histogram per site. A job steps every ``--step-interval`` seconds (0: as
soon as the previous step is acknowledged), starting at a random offset so jobs do not march in
lock-step. Every ``--collapse-every``-th job collapses one gate (beta_p90/attn/L03 = 0.01) from
step 5, so an alert fires at step 7 and stays firing; the others stay healthy. A reader thread
plays a dashboard meanwhile (runs list, layers, health, history, /metrics each
``--read-interval``).
A failed POST is retried with the same batch id, like the HTTP sink's replay.

Every value is a function of (job, step, key), so the read-back checks content, not just counts:
through the API each run's last_step, its ``loss`` and ``beta_p90/mlp/L11`` histories (every step
and value) and its histogram count; straight from the database the point, histogram and batch
rows per run (all 650 keys x steps). ``lost`` counts acknowledged steps missing; ``extra`` counts
stored steps never acknowledged (possible only when an answer got lost after the commit).

    python bench/soak.py --jobs 50 --seconds 180                 # SQLite, a temporary file
    python bench/soak.py --jobs 50 --seconds 180 --pg            # a throwaway PostgreSQL cluster
    python bench/soak.py --db-url postgresql+psycopg://u@host/db # the server started on that URL
    python bench/soak.py --url http://127.0.0.1:8765 --pid 4242  # a running server (RSS of pid)

Prints a Markdown table and exits non-zero when anything failed; ``--json PATH`` writes the whole
report. tests/server/test_soak.py runs the same code in a short form. The server is started with
tests/server/live.py and the PostgreSQL cluster with tests/server/pg.py, as in the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the tests' server and cluster helpers
    sys.path.insert(0, str(ROOT))

from server.catalogue import BETA_BINS, SITES, STAT_NAMES, key  # noqa: E402
from tests.server.live import LiveServer  # noqa: E402
from tests.server.pg import PgCluster  # noqa: E402

LAYERS = 12
API = "/api/v1"
# stats some rule reads, at values no default threshold comes near (server/thresholds.py); a
# +-0.01 wiggle keeps them there
BASE = {"beta_mean": 0.6, "beta_p10": 0.2, "beta_p50": 0.6, "beta_p90": 0.9, "gate_logit_sat": 0.02,
        "h_norm_mean": 1.5, "h_norm_drift": 1.1, "k_concentration": 0.3, "k_abs_concentration": 0.3,
        "k_cos_step": 0.9, "k_cos_probe": 0.9, "nonfinite": 0.0}
COLLAPSE = key("beta_p90", "attn", 3)
COLLAPSE_FROM = 5
FOR_EVALS = 3  # Thresholds.for_evals: the collapse fires at step COLLAPSE_FROM + 2
PROBE = ("beta_p90", "mlp", LAYERS - 1)  # a per-site key read back through the API


# -- what a job sends ---------------------------------------------------------------------------
def scalar(job: int, step: int, k: str, layer: int = 0, collapse: bool = False) -> float:
    """The value of ``k`` that job ``job`` logs at ``step``."""
    if k == "loss":
        return 3.0 + 1.0 / (1.0 + 0.01 * step) + job * 1e-3
    if k == "lr":
        return 3e-4
    if collapse and k == COLLAPSE and step >= COLLAPSE_FROM:
        return 0.01
    stat = k.split("/", 1)[0]
    if stat == "nonfinite":
        return 0.0
    return BASE.get(stat, 0.5) + 0.01 * math.sin(0.1 * step + layer + job)


def counts(step: int, layer: int) -> list[float]:
    centre = (step + layer) % BETA_BINS
    return [float(max(0, 100 - 8 * abs(i - centre))) for i in range(BETA_BINS)]


class Record:
    """Builds one job's records; the key list is made once per job."""

    def __init__(self, job: int, collapse: bool, layers: int = LAYERS) -> None:
        self.job, self.collapse = job, collapse
        self.keys = [(key(s, site, layer), layer) for layer in range(layers) for site in SITES
                     for s in STAT_NAMES]
        self.hist_keys = [(key("beta_hist", site, layer), layer) for layer in range(layers) for site in SITES]

    @property
    def points(self) -> int:
        return len(self.keys) + 2

    def body(self, step: int) -> bytes:
        scalars = {k: scalar(self.job, step, k, layer, self.collapse) for k, layer in self.keys}
        scalars["loss"], scalars["lr"] = scalar(self.job, step, "loss"), scalar(self.job, step, "lr")
        hists = {k: {"lo": 0.0, "hi": 2.0, "counts": counts(step, layer)} for k, layer in self.hist_keys}
        return json.dumps({"batch_id": f"j{self.job}-s{step}", "records": [
            {"step": step, "scalars": scalars, "hists": hists}]}).encode()


# -- the jobs -----------------------------------------------------------------------------------
@dataclass
class Job:
    index: int
    run_id: int
    headers: dict[str, str]
    collapse: bool
    requests: int = 0
    acked: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def register(url: str, n: int, collapse_every: int) -> list[Job]:
    jobs = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            r = c.post(f"{API}/runs", json={"name": f"soak-{i:03d}", "tags": {"bench": "soak"},
                                            "config": {"layers": LAYERS, "job": i}})
            r.raise_for_status()
            jobs.append(Job(i, r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"},
                            collapse=collapse_every > 0 and i % collapse_every == 0))
    return jobs


def run_job(job: Job, url: str, steps: int | None, deadline: float, interval: float,
            stop: threading.Event, offset: float, attempts: int = 3) -> None:
    """Post one record per step until ``steps``, ``deadline`` or ``stop``; each failed POST is
    retried (same batch id) up to ``attempts`` times, then the step is given up."""
    rec = Record(job.index, job.collapse)
    path = f"{API}/runs/{job.run_id}/stats"
    headers = {**job.headers, "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        due = time.monotonic() + offset
        step = 0
        while (steps is None or step < steps) and not stop.wait(max(0.0, due - time.monotonic())):
            if time.monotonic() >= deadline:
                return
            step += 1
            due = max(due + interval, time.monotonic()) if interval else time.monotonic()
            body = rec.body(step)
            for attempt in range(attempts):
                job.requests += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(path, content=body)
                except httpx.HTTPError as e:
                    job.errors.append(f"step {step}: {type(e).__name__}: {e}")
                else:
                    job.latencies.append(time.perf_counter() - t0)
                    if r.status_code == 200 and (r.json()["accepted"] == 1 or r.json()["duplicate"]):
                        job.acked.append(step)
                        break
                    job.errors.append(f"step {step}: HTTP {r.status_code}: {r.text[:200]}")
                if attempt + 1 < attempts and stop.wait(0.5):
                    return


@dataclass
class Reader:
    """A dashboard's reads while the jobs write: latency and errors of each."""

    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, url: str, jobs: list[Job], interval: float, stop: threading.Event) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.wait(interval):
                rid = rng.choice(jobs).run_id
                site, layer = rng.choice(SITES), rng.randrange(LAYERS)
                for path, params in ((f"{API}/runs", {"limit": 100}), (f"{API}/runs/{rid}/layers", {}),
                                     (f"{API}/runs/{rid}/health", {}),
                                     (f"{API}/runs/{rid}/history", {"stat": "beta_p50", "site": site,
                                                                    "layer": layer}),
                                     ("/metrics", {})):
                    self.requests += 1
                    t0 = time.perf_counter()
                    try:
                        r = c.get(path, params=params)
                    except httpx.HTTPError as e:
                        self.errors.append(f"{path}: {type(e).__name__}: {e}")
                        continue
                    self.latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        self.errors.append(f"{path}: HTTP {r.status_code}: {r.text[:200]}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) of a process, from /proc; empty when it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class Memory:
    """Samples the server's resident memory while the jobs run."""

    pid: int | None
    samples: list[int] = field(default_factory=list)
    hwm: int | None = None

    def sample(self) -> None:
        if self.pid is not None and (s := proc_status(self.pid)):
            self.samples.append(s["VmRSS"])
            self.hwm = s.get("VmHWM", self.hwm)

    def run(self, stop: threading.Event, every: float = 0.5) -> None:
        while not stop.wait(every):
            self.sample()


def drive(url: str, jobs: list[Job], *, steps: int | None, seconds: float, interval: float,
          stop: threading.Event | None = None, pid: int | None = None, read_interval: float = 1.0,
          progress: bool = False) -> dict[str, Any]:
    """Run every job to its end (``steps``, ``seconds`` or ``stop``); returns the load figures."""
    stop = stop or threading.Event()
    mem, reader, done = Memory(pid), Reader(), threading.Event()
    mem.sample()
    rng = random.Random(1)
    t0 = time.monotonic()
    deadline = t0 + seconds
    spread = interval if interval else 0.2
    threads = [threading.Thread(target=run_job, name=f"job-{j.index}",
                                args=(j, url, steps, deadline, interval, stop, rng.uniform(0, spread)))
               for j in jobs]
    side = [threading.Thread(target=mem.run, args=(done,), daemon=True)]
    if read_interval > 0:
        side.append(threading.Thread(target=reader.run, args=(url, jobs, read_interval, done), daemon=True))
    for t in threads + side:
        t.start()
    next_report = t0 + 30
    for t in threads:
        while t.is_alive():
            t.join(1.0)
            if progress and time.monotonic() >= next_report:
                next_report += 30
                acked = sum(len(j.acked) for j in jobs)
                errs = sum(len(j.errors) for j in jobs)
                rss = mem.samples[-1] / 2**20 if mem.samples else float("nan")
                print(f"  t={time.monotonic() - t0:5.0f} s  acked {acked:>7,}  errors {errs}  "
                      f"server RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - t0
    done.set()
    for t in side:
        t.join(10)
    mem.sample()
    lat = sorted(x for j in jobs for x in j.latencies)
    acked = sum(len(j.acked) for j in jobs)
    points = Record(0, False).points
    per_job = [len(j.acked) for j in jobs]
    return {
        "elapsed_s": elapsed,
        "requests": sum(j.requests for j in jobs),
        "errors": sum(len(j.errors) for j in jobs),
        "error_samples": [e for j in jobs for e in j.errors][:10],
        "records_acked": acked,
        "points_acked": acked * points,
        "hist_bins_acked": acked * 2 * LAYERS * BETA_BINS,
        "points_per_s": acked * points / elapsed if elapsed else 0.0,
        "steps_per_job_min": min(per_job, default=0),
        "steps_per_job_max": max(per_job, default=0),
        "latency_s": percentiles(lat),
        "reads": reader.requests,
        "read_errors": len(reader.errors),
        "read_error_samples": reader.errors[:10],
        "read_latency_s": percentiles(sorted(reader.latencies)),
        "rss_bytes": {"start": mem.samples[0] if mem.samples else None,
                      "end": mem.samples[-1] if mem.samples else None,
                      "peak": max(mem.samples, default=None), "hwm": mem.hwm},
    }


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50 / p99 and the max of sorted ``xs``."""
    if not xs:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": xs[math.ceil(0.50 * len(xs)) - 1], "p99": xs[math.ceil(0.99 * len(xs)) - 1], "max": xs[-1]}


# -- reading it all back ------------------------------------------------------------------------
def _history(c: httpx.Client, run_id: int, last: int, **params: Any) -> list[dict[str, Any]]:
    """Every point of one stat, in windows of 10,000 steps (the API's most without downsampling)."""
    pts: list[dict[str, Any]] = []
    for lo in range(0, last + 1, 10_000):
        r = c.get(f"{API}/runs/{run_id}/history", params={
            **params, "since_step": lo, "until_step": lo + 9_999, "max_points": 10_000})
        r.raise_for_status()
        assert not r.json()["downsampled"]
        pts += r.json()["points"]
    return pts


def verify(url: str, jobs: list[Job], db_url: str | None = None) -> dict[str, Any]:
    """Compare what each run holds with what its job had acknowledged."""
    problems: list[str] = []
    lost = extra = stored_total = 0
    stored_by_run: dict[int, list[int]] = {}
    points = Record(0, False).points
    with httpx.Client(base_url=url, timeout=60) as c:
        for j in jobs:
            acked = set(j.acked)
            r = c.get(f"{API}/runs/{j.run_id}")
            r.raise_for_status()
            run = r.json()
            last = run["last_step"] or 0
            loss = _history(c, j.run_id, last, stat="loss")
            steps = [p["step"] for p in loss]
            stored_by_run[j.run_id] = steps
            stored_total += len(steps)
            if steps != sorted(set(steps)):
                problems.append(f"run {j.run_id}: loss history not strictly increasing")
            lost += len(acked - set(steps))
            extra += len(set(steps) - acked)
            if steps and run["last_step"] != steps[-1]:
                problems.append(f"run {j.run_id}: last_step {run['last_step']} != last stored {steps[-1]}")
            bad = [p["step"] for p in loss if p["value"] != scalar(j.index, p["step"], "loss")]
            stat, site, layer = PROBE
            probe = _history(c, j.run_id, last, stat=stat, site=site, layer=layer)
            bad += [p["step"] for p in probe
                    if p["value"] != scalar(j.index, p["step"], key(*PROBE), layer, j.collapse)]
            if [p["step"] for p in probe] != steps:
                problems.append(f"run {j.run_id}: {key(*PROBE)} steps differ from loss steps")
            if bad:
                problems.append(f"run {j.run_id}: {len(bad)} values differ from those sent, e.g. step {bad[0]}")
            h = c.get(f"{API}/runs/{j.run_id}/histograms",
                      params={"site": site, "layer": layer, "max_points": 1}).json()
            if h["total"] != len(steps):
                problems.append(f"run {j.run_id}: {h['total']} histograms for {len(steps)} steps")
            firing = c.get(f"{API}/runs/{j.run_id}/alerts", params={"state": "firing"}).json()["data"]
            got = sorted((a["rule"], a["site"], a["layer"]) for a in firing)
            want = ([("beta_collapse", "attn", 3)]
                    if j.collapse and last >= COLLAPSE_FROM + FOR_EVALS - 1 else [])
            if got != want:
                problems.append(f"run {j.run_id}: firing alerts {got}, expected {want}")
        healthz = c.get("/healthz").status_code
    if healthz != 200:
        problems.append(f"/healthz answered {healthz} after the soak")
    out: dict[str, Any] = {"records_stored": stored_total, "lost": lost, "extra": extra, "db": None}
    if db_url is not None:
        out["db"] = db_counts(db_url)
        out["db"]["mismatched_runs"] = 0
        for j in jobs:
            n = len(stored_by_run[j.run_id])
            got = out["db"]["runs"].get(j.run_id, {"points": 0, "steps": 0, "hists": 0, "batches": 0})
            want = {"points": n * points, "steps": n, "hists": n * 2 * LAYERS, "batches": n}
            if got != want:
                out["db"]["mismatched_runs"] += 1
                problems.append(f"run {j.run_id}: database holds {got}, expected {want}")
        out["db"]["runs"] = len(out["db"]["runs"])
    out["problems"] = problems
    return out


def db_counts(db_url: str) -> dict[str, Any]:
    """Rows per run straight from the database, and its size on disk."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            runs: dict[int, dict[str, int]] = {}
            for table, cols in (("stats", "count(*), count(DISTINCT step)"), ("histograms", "count(*)"),
                                ("ingest_batches", "count(*)")):
                for row in conn.exec_driver_sql(f"SELECT run_id, {cols} FROM {table} GROUP BY run_id"):
                    r = runs.setdefault(int(row[0]), {"points": 0, "steps": 0, "hists": 0, "batches": 0})
                    if table == "stats":
                        r["points"], r["steps"] = int(row[1]), int(row[2])
                    else:
                        r["hists" if table == "histograms" else "batches"] = int(row[1])
            if engine.dialect.name == "postgresql":
                size = int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())
            else:
                f = Path(sa.make_url(db_url).database or "")
                size = sum(p.stat().st_size for p in (f, Path(f"{f}-wal")) if p.exists())
    finally:
        engine.dispose()
    return {"runs": runs, "size_bytes": size}


# -- the server ---------------------------------------------------------------------------------
@contextmanager
def server(db_url: str | None, pg: bool, tmp: Path) -> Iterator[LiveServer]:
    """``python -m server`` on a free loopback port; on a temporary SQLite file unless told."""
    with ExitStack() as stack:
        if pg:
            db_url = stack.enter_context(PgCluster()).create_database("soak")
        live = LiveServer(tmp, db_url=db_url or f"sqlite:///{tmp / 'soak.db'}").start()
        stack.callback(live.stop)
        yield live


def table(cfg: dict[str, Any], load: dict[str, Any], check: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:,.0f}" if x >= 0.01 else f"{1000 * x:.1f}"

    def mib(x: int | None) -> str:
        return "-" if x is None else f"{x / 2**20:,.0f}"

    lat, rl, rss = load["latency_s"], load["read_latency_s"], load["rss_bytes"]
    db = check.get("db") or {}
    rows = [
        ("requests (stats POSTs)", f"{load['requests']:,}"),
        ("errors (non-200 or no answer)", f"{load['errors']:,}"),
        ("records acknowledged", f"{load['records_acked']:,}"),
        ("points acknowledged (+ histogram bins)",
         f"{load['points_acked']:,} (+ {load['hist_bins_acked']:,})"),
        ("steps per job, min / max", f"{load['steps_per_job_min']:,} / {load['steps_per_job_max']:,}"),
        ("points/s", f"{load['points_per_s']:,.0f}"),
        ("ingest latency p50 / p99 / max (ms)", f"{ms(lat['p50'])} / {ms(lat['p99'])} / {ms(lat['max'])}"),
        ("dashboard reads, errors", f"{load['reads']:,}, {load['read_errors']}"),
        ("read latency p50 / p99 / max (ms)", f"{ms(rl['p50'])} / {ms(rl['p99'])} / {ms(rl['max'])}"),
        ("server RSS start / end / peak (MiB)",
         f"{mib(rss['start'])} / {mib(rss['end'])} / {mib(rss['hwm'] or rss['peak'])}"),
        ("records read back; lost; extra", f"{check['records_stored']:,}; {check['lost']}; {check['extra']}"),
    ]
    if db:
        rows.append(("runs whose database rows differ (of runs); size (MiB)",
                     f"{db['mismatched_runs']} ({db['runs']}); {mib(db['size_bytes'])}"))
    rows.append(("problems", str(len(check["problems"]))))
    head = (f"soak: {cfg['jobs']} jobs x {2 * LAYERS} sites, 1 record per POST, step interval "
            f"{cfg['step_interval']} s, {load['elapsed_s']:.0f} s, {cfg['db']}")
    width = max(len(r[0]) for r in rows)
    lines = [head, "", f"| {'what':<{width}} | value |", f"| {'-' * width} | ---: |"]
    lines += [f"| {a:<{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50, help="simulated training jobs (one run each)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time bound (default 180; 600 as a safety bound when --steps is given)")
    ap.add_argument("--steps", type=int, default=None, help="log steps per job (default: until --seconds)")
    ap.add_argument("--step-interval", type=float, default=0.0,
                    help="seconds between a job's steps (default 0: next step once acknowledged)")
    ap.add_argument("--collapse-every", type=int, default=10,
                    help="every n-th job collapses a gate from step 5 so an alert fires (0: none)")
    ap.add_argument("--read-interval", type=float, default=1.0,
                    help="seconds between the dashboard reader's rounds (0: no reader)")
    ap.add_argument("--db-url", help="SQLAlchemy URL for the started server (default: temporary SQLite)")
    ap.add_argument("--pg", action="store_true", help="start a throwaway PostgreSQL cluster and use it")
    ap.add_argument("--url", help="target a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    ap.add_argument("--json", type=Path, help="write the whole report here")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (600.0 if args.steps else 180.0)
    with tempfile.TemporaryDirectory(prefix="deltascope-soak-") as tmp, ExitStack() as stack:
        if args.url:
            url, pid, db_url = args.url.rstrip("/"), args.pid, args.db_url
        else:
            live = stack.enter_context(server(args.db_url, args.pg, Path(tmp)))
            assert live.proc is not None
            url, pid, db_url = live.url, live.proc.pid, live.db_url
        db = sa.make_url(db_url).get_backend_name() if db_url else "server at " + url
        cfg = {"jobs": args.jobs, "steps": args.steps, "seconds": seconds, "step_interval": args.step_interval,
               "collapse_every": args.collapse_every, "db": db, "url": url}
        print(f"soak: {args.jobs} jobs against {url} ({db}), "
              f"{f'{args.steps} steps, ' if args.steps else ''}at most {seconds:.0f} s", file=sys.stderr)
        jobs = register(url, args.jobs, args.collapse_every)
        load = drive(url, jobs, steps=args.steps, seconds=seconds, interval=args.step_interval, pid=pid,
                     read_interval=args.read_interval, progress=True)
        check = verify(url, jobs, db_url)
    report = {"config": cfg, "load": load, "check": check}
    print(table(cfg, load, check))
    for p in check["problems"][:20] + load["error_samples"] + load["read_error_samples"]:
        print("  " + p)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok(report) else 1


def ok(report: dict[str, Any]) -> bool:
    """No error, nothing lost, every check passed."""
    load, check = report["load"], report["check"]
    return not (load["errors"] or load["read_errors"] or check["lost"] or check["problems"])


if __name__ == "__main__":
    raise SystemExit(main())
