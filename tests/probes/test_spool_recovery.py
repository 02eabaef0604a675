"""Spools that outlive their job: a job killed with SIGKILL while its batches wait, its spool sent
afterwards by ``deltascope flush-spool`` (the real console script) or by the next HttpSink on the
same directory; a replay cut short that resumes after its cursor; a live sink's spool left alone;
the command's one-line answers. Real server subprocess, real job processes; plus the spool's
reopening on its own."""

from __future__ import annotations

import json
import logging
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from probes._spool import Spool
from probes.http_sink import HttpSink
from probes.spool_replay import replay_spool
from tests.probes.test_http_sink import FAST, assert_in_order_exactly_once, scalars, stored
from tests.server.live import ROOT, LiveServer, free_port, wait_for

DELTASCOPE = Path(sys.executable).parent / "deltascope"  # the console script pyproject installs

JOB = textwrap.dedent("""
    import json, sys, time
    from probes.http_sink import HttpSink

    sink = HttpSink(sys.argv[1], "killed", config={"preset": "tiny"}, tags={"job": "1"}, spool_dir=sys.argv[2],
                    batch_size=4, flush_interval=0.05, retry_initial=0.05, retry_max=0.3, timeout=5.0)
    for line in sys.stdin:  # "A B": write steps A..B-1, flush, report
        a, b = map(int, line.split())
        for s in range(a, b):
            sink.write(s, {"loss": 3.0 - 0.001 * s, "lr": 3e-4})
        sink.flush()
        print(json.dumps({"run_id": sink.run_id, "written": sink.stats.written,
                          "pending": sink.stats.pending}), flush=True)
    time.sleep(600)  # never reached in these tests: the job is killed first
""")


class Job:
    """A training job in its own process, streaming through an HttpSink, killable with SIGKILL."""

    def __init__(self, url: str, spool_dir: Path, tmp: Path) -> None:
        self.err = tmp / "job.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", JOB, url, str(spool_dir)], cwd=ROOT, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def write(self, a: int, b: int) -> dict:
        self.proc.stdin.write(f"{a} {b}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.err.read_text()
        return json.loads(line)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no atexit, no close(): what is on disk is all there is
        self.proc.wait(10)
        self.proc.stdin.close()
        self.proc.stdout.close()


def killed_job_spool(tmp: Path, url: str, n: int) -> Path:
    """The spool directory of a job that wrote steps 0..n-1 to a server that never answered, then died."""
    spool = tmp / "spool"
    job = Job(url, spool, tmp)
    try:
        got = job.write(0, n)
    finally:
        job.kill()
    assert got["written"] == 0 and got["pending"] > 0
    return spool


def flush_spool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DELTASCOPE), "flush-spool", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def run_named(server: LiveServer, name: str) -> int:
    runs = [r["id"] for r in httpx.get(f"{server.url}/api/v1/runs", timeout=10).json()["data"] if r["name"] == name]
    assert len(runs) == 1, runs  # one run, never a second one for the same job's batches
    return runs[0]


def spool_files(spool: Path) -> dict[str, Path]:
    (data,) = spool.glob("*.jsonl")
    return {"data": data, "ack": Path(f"{data}.ack"), "meta": Path(f"{data}.meta.json"),
            "lock": Path(f"{data}.lock")}


def pending_in(data: Path) -> int:
    sp = Spool.open(data)
    assert sp is not None
    try:
        return sp.pending
    finally:
        sp.close()


@pytest.fixture
def down_server(tmp_path):
    """A server that is not running yet: ``.start()`` it when the test wants it up."""
    s = LiveServer(tmp_path, port=free_port())
    yield s
    s.stop()


@pytest.mark.slow
def test_flush_spool_sends_a_killed_jobs_spool_exactly_once(down_server, tmp_path):
    spool = killed_job_spool(tmp_path, down_server.url, 30)
    f = spool_files(spool)
    meta = json.loads(f["meta"].read_text())
    assert (meta["url"], meta["run"], meta["run_id"], meta["token"]) == (
        down_server.url, {"name": "killed", "config": {"preset": "tiny"}, "tags": {"job": "1"}, "beta_max": 2.0},
        None, None)
    assert f["data"].name.startswith(f"killed-{meta['batch_prefix']}")
    assert stat.S_IMODE(f["meta"].stat().st_mode) == 0o600 and f["lock"].exists()

    down_server.start()
    r = flush_spool("--dir", spool)
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = r.stdout.splitlines()
    assert "run 'killed'" in line and "spool removed" in line and not r.stderr
    assert_in_order_exactly_once(down_server, run_named(down_server, "killed"), 30)
    assert not list(spool.iterdir())  # batches, cursor, metadata and lock all gone

    r = flush_spool("--dir", spool)
    assert r.returncode == 0 and r.stdout.startswith("nothing to send")


@pytest.mark.slow
def test_a_registered_run_killed_during_an_outage_is_completed_in_the_same_run(tmp_path):
    server = LiveServer(tmp_path).start()
    spool = tmp_path / "spool"
    job = Job(server.url, spool, tmp_path)
    try:
        first = job.write(0, 20)
        assert first["written"] == 20 and first["pending"] == 0
        server.kill()
        assert job.write(20, 50)["pending"] > 0
    finally:
        job.kill()
    try:
        meta_path = spool_files(spool)["meta"]
        meta = json.loads(meta_path.read_text())
        token = meta["token"]
        assert meta["run_id"] == first["run_id"] and token  # the spool knows its run and may write to it
        assert stat.S_IMODE(meta_path.stat().st_mode) == 0o600
        server.start()  # same database
        r = flush_spool("--dir", spool)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"#{first['run_id']}" in r.stdout and token not in r.stdout + r.stderr
        assert_in_order_exactly_once(server, run_named(server, "killed"), 50)
        assert not list(spool.iterdir())
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("squatter", [False, True], ids=["run-unknown-404", "run-id-reused-403"])
def test_a_server_that_lost_the_run_gets_it_registered_again(tmp_path, squatter):
    old = LiveServer(tmp_path).start()
    spool = tmp_path / "spool"
    job = Job(old.url, spool, tmp_path)
    try:
        assert job.write(0, 20)["written"] == 20
        old.kill()
        assert job.write(20, 50)["pending"] > 0
    finally:
        job.kill()
    (tmp_path / "new").mkdir()
    server = LiveServer(tmp_path / "new", port=old.port).start()  # same address, a new database
    try:
        if squatter:
            server.register("squatter")  # takes the id the spool recorded: its token no longer fits
        r = flush_spool("--dir", spool)
        assert r.returncode == 0, r.stdout + r.stderr
        steps, batches = stored(server, run_named(server, "killed"))
        assert steps == list(range(20, 50)) and len({b[0] for b in batches}) == len(batches)
        assert not list(spool.iterdir())
    finally:
        server.stop()


@pytest.mark.slow
def test_the_next_sink_on_the_same_directory_sends_a_killed_jobs_spool(down_server, tmp_path, caplog):
    spool = killed_job_spool(tmp_path, down_server.url, 30)
    down_server.start()
    with caplog.at_level(logging.WARNING, "deltascope.sinks.http"):
        sink = HttpSink(down_server.url, "next", spool_dir=spool, **FAST)
        for s in range(10):
            sink.write(s, scalars(s))
        assert wait_for(lambda: sink.recovered, timeout=60)
        sink.close()
    (rec,) = sink.recovered
    assert rec.delivered and rec.run_name == "killed" and rec.sent > 0 and rec.duplicates == 0
    assert len([r for r in caplog.records if "recovered an orphan spool" in r.getMessage()]) == 1
    assert rec.run_id == run_named(down_server, "killed") != sink.run_id
    assert_in_order_exactly_once(down_server, rec.run_id, 30)
    assert_in_order_exactly_once(down_server, sink.run_id, 10)
    assert not list(spool.iterdir())


@pytest.mark.slow
def test_a_replay_cut_short_resumes_after_its_cursor_and_loses_nothing(down_server, tmp_path):
    spool = killed_job_spool(tmp_path, down_server.url, 40)
    f = spool_files(spool)
    lines = f["data"].read_bytes().splitlines(keepends=True)
    assert len(lines) >= 5
    down_server.start()

    calls = iter(range(10**6))
    r = replay_spool(f["data"], stop=lambda: next(calls) >= 3)  # stopped after 3 batches, as a killed replay
    assert (r.sent, r.remaining, r.duplicates) == (3, len(lines) - 3, 0) and not r.delivered
    assert json.loads(f["meta"].read_text())["run_id"] == r.run_id  # written back before any batch went
    assert int(f["ack"].read_text()) == len(b"".join(lines[:3]))
    f["ack"].write_text(str(len(b"".join(lines[:2]))))  # the last cursor update lost: batch 3 looks pending

    out = flush_spool("--dir", spool)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(lines) - 2} batches sent (1 already stored)" in out.stdout
    run_id = run_named(down_server, "killed")
    assert run_id == r.run_id
    assert_in_order_exactly_once(down_server, run_id, 40)
    _, batches = stored(down_server, run_id)
    assert [b[0] for b in batches] == [json.loads(line)["batch_id"] for line in lines]  # original ids, once
    assert not list(spool.iterdir())


@pytest.mark.slow
def test_a_live_sinks_spool_is_left_alone_and_flushed_once_it_closes(tmp_path):
    server = LiveServer(tmp_path).start()
    spool = tmp_path / "spool"
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", "alive", spool_dir=spool, **FAST)
    try:
        for s in range(12):
            sink.write(s, scalars(s))
        sink.flush()
        assert sink.stats.pending > 0
        before = {p.name: p.read_bytes() for p in spool.iterdir()}
        r = flush_spool("--dir", spool, "--url", server.url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "in use by a running job" in r.stdout
        assert {p.name: p.read_bytes() for p in spool.iterdir()} == before
        assert httpx.get(f"{server.url}/api/v1/runs", timeout=10).json()["count"] == 0
        sink.close(timeout=5)  # the server it knows is still away: the batches stay, the lock goes
        assert sink.stats.pending > 0

        r = flush_spool("--dir", spool, "--url", server.url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_in_order_exactly_once(server, run_named(server, "alive"), 12)
        assert not list(spool.iterdir())
    finally:
        sink.close()
        server.stop()


@pytest.mark.slow
def test_flush_spool_answers_misuse_and_an_unreachable_server_in_one_line(tmp_path):
    r = flush_spool("--dir", tmp_path / "nowhere")
    assert r.returncode == 2 and not r.stdout
    (line,) = r.stderr.splitlines()
    assert line.startswith("deltascope: error: no spool directory") and "--dir" in line
    r = flush_spool("--dir", tmp_path, "--url", "not a url")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--url" in r.stderr

    spool = tmp_path / "spool"
    dead = f"http://127.0.0.1:{free_port()}"
    sink = HttpSink(dead, "stranded", spool_dir=spool, **FAST)
    for s in range(8):
        sink.write(s, scalars(s))
    sink.close(timeout=5)
    data = spool_files(spool)["data"]
    n = pending_in(data)
    assert n > 0
    for args in ((), ("--url", f"http://127.0.0.1:{free_port()}")):
        r = flush_spool("--dir", spool, *args)
        assert r.returncode == 1, r.stdout + r.stderr
        (line,) = r.stdout.splitlines()
        assert "run 'stranded' (not registered)" in line and f"{n} remain" in line and "ConnectError" in line
        (why,) = r.stderr.splitlines()
        assert "not fully delivered" in why and "Traceback" not in r.stderr
        assert pending_in(data) == n  # intact for a later attempt


# -- reopening a spool on its own -------------------------------------------------------------


def test_reopening_counts_what_follows_the_cursor_and_cuts_a_torn_line(tmp_path):
    sp = Spool(tmp_path / "s.jsonl")
    assert sp.lock()
    for i in range(3):
        sp.append({"batch_id": f"b{i}", "records": [{"step": i}]})
    assert sp.peek()["batch_id"] == "b0"
    sp.ack()
    with open(sp.path, "ab") as f:
        f.write(b'{"batch_id":"torn","rec')  # a crash mid-append
    whole = sp.path.stat().st_size
    assert Spool.open(sp.path) is None  # its owner still holds it
    sp.close()

    again = Spool.open(sp.path)
    assert again is not None and again.pending == 2 and again.meta is None
    assert sp.path.stat().st_size == whole - len(b'{"batch_id":"torn","rec')
    assert [again.peek()["batch_id"], again.ack(), again.peek()["batch_id"]] == ["b1", None, "b2"]
    again.close()

    sp.cursor_path.write_text("3")  # not at a line start: counted from the top (replays, no loss)
    top = Spool.open(sp.path)
    assert top.pending == 3 and top.peek()["batch_id"] == "b0"
    top.close()


def test_metadata_is_private_and_on_disk_only_while_batches_wait(tmp_path):
    sp = Spool(tmp_path / "s.jsonl")
    sp.set_meta({"url": "http://x", "token": None})
    assert not sp.meta_path.exists()  # nothing spooled, nothing to describe
    sp.append({"batch_id": "b0", "records": [{"step": 0}]})
    assert stat.S_IMODE(sp.meta_path.stat().st_mode) == 0o600
    sp.set_meta({"url": "http://x", "token": "secret"})  # registered while batches wait
    assert sp.read_meta()["token"] == "secret"
    sp.peek()
    sp.ack()
    assert not sp.meta_path.exists() and sp.path.stat().st_size == 0
    sp.append({"batch_id": "b1", "records": [{"step": 1}]})
    assert sp.read_meta()["token"] == "secret"
