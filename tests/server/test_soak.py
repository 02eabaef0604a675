"""Load: 50 simulated jobs against one real server on loopback, on SQLite and on PostgreSQL.

The jobs, the dashboard reader and the read-back are bench/soak.py's own code, so the CI form and
the long soak cannot drift apart. The short form (50 jobs x 8 steps, 24 sites, stats every step)
runs everywhere; the long form (``-m soak``, DELTASCOPE_SOAK_SECONDS, default 180) is deselected
by default. Both assert no error and nothing lost, never a time: the figures are printed
(``-s``) for docs/RELIABILITY.md. SIGKILL mid-load: every acknowledged record survives, on both
databases. PostgreSQL is a throwaway cluster of Debian's packages (tests/server/pg.py); without
it those cases skip with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server.db import make_engine, migrate
from tests.server.live import ROOT, LiveServer


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


soak = _load_bench()
JOBS = 50

# one worker runs them all: each saturates the server, and the session's PostgreSQL cluster is
# started once
pytestmark = pytest.mark.xdist_group("soak")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'soak.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def live(tmp_path, db_url):
    server = LiveServer(tmp_path, db_url=db_url).start()
    yield server
    server.stop()


def _soak(live: LiveServer, steps: int | None, seconds: float) -> dict:
    assert live.proc is not None
    jobs = soak.register(live.url, JOBS, collapse_every=10)
    load = soak.drive(live.url, jobs, steps=steps, seconds=seconds, interval=0.0, pid=live.proc.pid,
                      read_interval=0.5)
    check = soak.verify(live.url, jobs, live.db_url)
    report = {"config": {"jobs": JOBS, "step_interval": 0.0, "db": sa.make_url(live.db_url).get_backend_name()},
              "load": load, "check": check}
    print("\n" + soak.table(report["config"], load, check))
    log = live.log()
    assert load["errors"] == 0, (load["error_samples"], log[-3000:])
    assert load["read_errors"] == 0, (load["read_error_samples"], log[-3000:])
    assert check["problems"] == [], (check["problems"][:10], log[-3000:])
    assert check["lost"] == check["extra"] == 0
    assert check["records_stored"] == load["records_acked"] > 0
    if steps is not None:
        assert all(j.acked == list(range(1, steps + 1)) for j in jobs)  # in order, no gap, no replay
    else:
        assert all(j.acked == list(range(1, len(j.acked) + 1)) for j in jobs)
    # still answering: one more step of a collapsed run is judged, a healthy run stays healthy
    sick, well = jobs[0], jobs[1]
    step = len(sick.acked) + 1
    r = httpx.post(f"{live.url}/api/v1/runs/{sick.run_id}/stats", content=soak.Record(sick.index, True).body(step),
                   headers={**sick.headers, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert [(a["rule"], a["site"], a["layer"]) for a in r.json()["firing"]] == [("beta_collapse", "attn", 3)]
    assert r.json()["verdict"] != "healthy"
    h = httpx.get(f"{live.url}/api/v1/runs/{well.run_id}/health", timeout=30).json()
    assert h["verdict"] == "healthy" and h["firing"] == []
    return report


@pytest.mark.slow
def test_50_jobs_every_step_lose_nothing(live):
    """The short form CI runs: 50 concurrent jobs x 8 steps, each step one POST of 650 points and
    24 histograms; a dashboard reads meanwhile."""
    _soak(live, steps=8, seconds=300)


@pytest.mark.slow
@pytest.mark.soak
def test_long_soak(live):
    """The long form: ``pytest -m soak tests/server/test_soak.py -s``; DELTASCOPE_SOAK_SECONDS
    sets its length (default 180 s per database)."""
    _soak(live, steps=None, seconds=float(os.environ.get("DELTASCOPE_SOAK_SECONDS", "180")))


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_record(live):
    """kill -9 while 10 jobs post: after a restart on the same database every acknowledged step of
    every run is there, at most the one step each job had in flight is there unacknowledged, no
    run has a gap, and every job carries on."""
    jobs = soak.register(live.url, 10, collapse_every=10)
    stop = threading.Event()
    driver = threading.Thread(target=soak.drive, args=(live.url, jobs), daemon=True, kwargs={
        "steps": None, "seconds": 120, "interval": 0.0, "stop": stop, "read_interval": 0})
    driver.start()
    deadline = time.monotonic() + 60
    while sum(len(j.acked) for j in jobs) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    live.kill()  # mid-stream: some POSTs are in flight
    stop.set()
    driver.join(30)
    assert not driver.is_alive()
    assert sum(len(j.acked) for j in jobs) >= 20
    live.start()
    check = soak.verify(live.url, jobs, live.db_url)
    assert check["lost"] == 0, check["problems"]
    assert check["extra"] <= len(jobs)
    assert check["problems"] == [], check["problems"][:10]
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for j in jobs:
            hist = soak._history(c, j.run_id, c.get(f"/api/v1/runs/{j.run_id}").json()["last_step"] or 0,
                                 stat="loss")
            stored = [p["step"] for p in hist]
            assert stored == list(range(1, len(stored) + 1))  # no gap, no half batch
            assert len(stored) <= len(set(j.acked)) + 1
            nxt = len(stored) + 1
            r = c.post(f"/api/v1/runs/{j.run_id}/stats", content=soak.Record(j.index, j.collapse).body(nxt),
                       headers={**j.headers, "content-type": "application/json"})
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
            assert c.get(f"/api/v1/runs/{j.run_id}").json()["last_step"] == nxt


def test_pg_helper_leaves_nothing_behind():
    """The cluster helper's own contract: a database that answers, then no process and no files."""
    from tests.server import pg

    if (reason := pg.missing()) is not None:
        pytest.skip(reason)
    with pg.PgCluster(prefix="deltascope-pg-selftest-") as cluster:
        url = cluster.create_database("selftest")
        engine = sa.create_engine(url)
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT current_database()")).scalar() == "selftest"
        engine.dispose()
        where, pid_file = cluster.dir, cluster.data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
    assert where is not None and not where.exists()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"postmaster {pid} still running"


def _alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its reaper does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status and "postgres" in Path(f"/proc/{pid}/comm").read_text()


def _first_batch(store, run_id: int, layers: int, start: threading.Barrier, failures: list[str]) -> None:
    from server.catalogue import SITES, STAT_NAMES, key
    from server.schemas import StatsBatch

    scalars = {key(s, site, layer): 0.5 for layer in range(layers) for site in SITES for s in STAT_NAMES}
    batch = StatsBatch.model_validate({"batch_id": "b1", "records": [{"step": 1, "scalars": scalars}]})
    start.wait()
    try:
        store.ingest(run_id, batch)
    except Exception as e:  # any failure is the finding
        failures.append(f"{layers} layers: {type(e).__name__}: {str(e).splitlines()[0]}")


def test_concurrent_first_batches_with_different_keys_do_not_deadlock_on_postgresql(pg_cluster):
    """Jobs of different sizes starting at once each intern their new metric keys in a short
    transaction of their own; on PostgreSQL (no process-wide writer lock) two such inserts that
    met the same keys in different orders deadlocked and one job got a 500."""
    from server.schemas import RunCreate
    from server.store import Store
    from server.thresholds import Thresholds

    failures: list[str] = []
    sizes = [4, 6, 8, 12, 16, 24, 32, 48]  # layers: overlapping key sets, iterated in different orders
    for round_ in range(2):
        engine = make_engine(pg_cluster.create_database(f"intern_{round_}"))
        migrate(engine)
        store = Store(engine, Thresholds())
        runs = [store.create_run(RunCreate(name=f"size-{n}"))[0] for n in sizes]
        start = threading.Barrier(len(sizes))
        threads = [threading.Thread(target=_first_batch, args=(store, r, n, start, failures))
                   for r, n in zip(runs, sizes, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        engine.dispose()
    assert failures == []


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_step_sent_again_under_a_new_batch_id_keeps_the_last_value(db, request, tmp_path):
    """The points upsert of each dialect (PostgreSQL: one statement over arrays): a step repeated
    inside a batch and across batches is stored once, with its last value."""
    from fastapi.testclient import TestClient

    from server import Settings, create_app
    from tests.server.conftest import Run

    url = request.getfixturevalue("pg_url") if db == "postgresql" else f"sqlite:///{tmp_path / 'u.db'}"
    with TestClient(create_app(Settings(db_url=url))) as c:
        run = Run(c, "upsert")
        rec = lambda step, v: {"step": step, "scalars": {"loss": v, "beta_p50/attn/L00": v / 10}}  # noqa: E731
        assert run.post({"batch_id": "a", "records": [rec(1, 1.0), rec(2, 2.0), rec(2, 2.5)]}).status_code == 200
        assert run.post({"batch_id": "b", "records": [rec(2, 3.0), rec(3, 4.0)]}).status_code == 200
        h = run.get("/history", stat="beta_p50", site="attn", layer=0)
        assert [(p["step"], p["value"]) for p in h["points"]] == [(1, 0.1), (2, 0.3), (3, 0.4)]
