"""HttpSink against a real server subprocess: round trip, server down at start, a server killed
mid-run, a lost answer, alerts back to the job; plus the spool on its own."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from probes._spool import Spool
from probes.http_sink import HttpSink, _Transient
from probes.sink import Histogram, Sink
from server.catalogue import BETA_BINS, key
from tests.server.live import LiveServer, free_port, wait_for

FAST = {"batch_size": 4, "flush_interval": 0.05, "retry_initial": 0.05, "retry_max": 0.3,
        "timeout": 5.0}


def scalars(step: int, **force: float) -> dict[str, float]:
    out = {"loss": 3.0 - 0.001 * step, "lr": 3e-4}
    for layer in range(2):
        for site in ("attn", "mlp"):
            out[key("beta_p90", site, layer)] = 0.9
            out[key("beta_p10", site, layer)] = 0.2
            out[key("nonfinite", site, layer)] = 0.0
    out.update(force)
    return out


def hists(step: int) -> dict[str, Histogram]:
    counts = [0.0] * BETA_BINS
    counts[step % BETA_BINS] = 10.0
    return {key("beta_hist", "attn", 0): Histogram(0.0, 2.0, tuple(counts))}


def network_threads(sink: HttpSink) -> set[int]:
    """Idents of the threads that call the sink's HTTP layer: the caller's must never be one."""
    seen: set[int] = set()
    real = sink._post

    def post(*a, **k):
        seen.add(threading.get_ident())
        return real(*a, **k)

    sink._post = post
    return seen


def stored(server: LiveServer, run_id: int) -> tuple[list[int], list[tuple[str, int, int]]]:
    """(steps holding 'loss', batches in arrival order) read straight from the database."""
    db = sqlite3.connect(server.db_url.removeprefix("sqlite:///"))
    try:
        steps = [r[0] for r in db.execute(
            "SELECT s.step FROM stats s JOIN stat_keys k ON k.id = s.key_id "
            "WHERE s.run_id = ? AND k.key = 'loss' ORDER BY s.step", (run_id,))]
        batches = db.execute("SELECT batch_id, first_step, last_step FROM ingest_batches "
                             "WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
    finally:
        db.close()
    return steps, batches


def assert_in_order_exactly_once(server: LiveServer, run_id: int, n: int) -> None:
    steps, batches = stored(server, run_id)
    assert steps == list(range(n))  # every record, once (the key is (run, key, step))
    firsts = [b[1] for b in batches]
    assert firsts == sorted(firsts) and batches[0][1] == 0 and batches[-1][2] == n - 1
    assert all(a[2] + 1 == b[1] for a, b in zip(batches, batches[1:], strict=False))  # no gap
    assert len({b[0] for b in batches}) == len(batches)


@pytest.fixture
def server(tmp_path):
    s = LiveServer(tmp_path).start()
    yield s
    s.stop()


def test_round_trip_with_histograms_and_health(server, tmp_path):
    sink = HttpSink(server.url, "rt", config={"preset": "tiny"}, tags={"k": "v"}, beta_max=1.0,
                    spool_dir=tmp_path / "spool", **FAST)
    assert isinstance(sink, Sink)
    for s in range(10):
        sink.write(s, scalars(s), hists(s))
    sink.close()
    assert sink.stats.written == 10 and sink.stats.errors == 0 and sink.stats.dropped == 0
    assert sink.stats.spooled == 0 and sink.health["verdict"] == "healthy"
    run = httpx.get(f"{server.url}/api/v1/runs/{sink.run_id}").json()
    assert (run["name"], run["config"], run["tags"], run["beta_max"]) == ("rt", {"preset": "tiny"},
                                                                          {"k": "v"}, 1.0)
    assert_in_order_exactly_once(server, sink.run_id, 10)
    h = httpx.get(f"{server.url}/api/v1/runs/{sink.run_id}/histograms",
                  params={"site": "attn", "layer": 0}).json()
    assert h["total"] == 10 and h["points"][3]["counts"][3] == 10.0
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # delivered: spool removed


@pytest.mark.slow
def test_server_down_at_start_then_up_delivers_everything_once_in_order(tmp_path, caplog):
    port = free_port()
    server = LiveServer(tmp_path, port=port)
    with caplog.at_level(logging.WARNING, "deltascope.sinks.http"):
        sink = HttpSink(server.url, "late", spool_dir=tmp_path / "spool", **FAST)
        callers = network_threads(sink)
        for s in range(40):
            sink.write(s, scalars(s))
        assert wait_for(lambda: sink.stats.spooled >= 10)
        time.sleep(0.5)  # several retries while down
        assert callers and threading.get_ident() not in callers  # write() never waits for the network
        server.start()
        for s in range(40, 80):
            sink.write(s, scalars(s))
        sink.close()
    try:
        assert sink.stats.written == 80 and sink.stats.pending == 0 and sink.stats.outages == 1
        assert_in_order_exactly_once(server, sink.run_id, 80)
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1  # one warning per outage, not per step or retry
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    finally:
        server.stop()


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted(tmp_path):
    server = LiveServer(tmp_path).start()
    sink = HttpSink(server.url, "crashy", spool_dir=tmp_path / "spool", **FAST)
    try:
        for s in range(20):
            sink.write(s, scalars(s))
        sink.flush()
        assert sink.stats.written == 20
        server.kill()
        for s in range(20, 50):
            sink.write(s, scalars(s))
        sink.flush()
        assert sink.stats.pending > 0 and sink.stats.written == 20
        server.start()
        for s in range(50, 60):
            sink.write(s, scalars(s))
        sink.close()
        assert sink.stats.written == 60 and sink.stats.pending == 0
        assert_in_order_exactly_once(server, sink.run_id, 60)
    finally:
        sink.close()
        server.stop()


@pytest.mark.slow
def test_a_server_back_with_a_new_database_and_the_run_id_taken_gets_the_run_again(tmp_path):
    """The server restarts on an empty database and another job registers first, taking the run id
    this sink had: its token now gets 403. The sink registers again instead of dropping batches."""
    old = LiveServer(tmp_path).start()
    sink = HttpSink(old.url, "moved", spool_dir=tmp_path / "spool", **FAST)
    try:
        for s in range(10):
            sink.write(s, scalars(s))
        sink.flush()
        first_id = sink.run_id
        assert sink.stats.written == 10
        old.kill()
        (tmp_path / "new").mkdir()
        server = LiveServer(tmp_path / "new", port=old.port).start()
        squatter_id, _ = server.register("squatter")
        assert squatter_id == first_id
        for s in range(10, 30):
            sink.write(s, scalars(s))
        sink.close()
        assert sink.stats.rejected == 0 and sink.stats.written == 30 and sink.run_id != first_id
        steps, _ = stored(server, sink.run_id)
        assert steps == list(range(10, 30))  # nothing of it went to, or was refused for, the squatter
        assert stored(server, squatter_id)[0] == []
        server.stop()
    finally:
        sink.close()
        old.stop()


def test_a_lost_answer_is_replayed_as_a_duplicate(server, tmp_path, monkeypatch):
    sink = HttpSink(server.url, "lossy", spool_dir=tmp_path / "spool", **FAST)
    real = sink._post
    lost = []

    def post(path: str, body: dict):
        r = real(path, body)
        if path.endswith("/stats") and not lost:
            lost.append(body["batch_id"])
            raise _Transient("answer lost on the way back")  # stored, but the job never hears
        return r

    monkeypatch.setattr(sink, "_post", post)
    for s in range(12):
        sink.write(s, scalars(s))
    sink.close()
    assert sink.stats.duplicates == 1 and sink.stats.written == 12
    steps, batches = stored(server, sink.run_id)
    assert steps == list(range(12)) and batches[0][0] == lost[0]


def test_alerts_come_back_to_the_job(server, tmp_path):
    got: list[dict] = []
    sink = HttpSink(server.url, "alerting", spool_dir=tmp_path / "spool", on_alert=got.append, **FAST)
    sink.write(0, scalars(0))
    sink.write(1, scalars(1, **{key("nonfinite", "mlp", 1): 4.0}))
    sink.close()
    assert [(t["rule"], t["site"], t["layer"], t["state"], t["step"]) for t in got] == [
        ("nonfinite", "mlp", 1, "firing", 1)]
    assert sink.health["verdict"] == "failing" and sink.health["step"] == 1
    assert [a["rule"] for a in sink.health["firing"]] == ["nonfinite"]


def test_values_the_server_would_refuse_are_left_out_not_sent(server, tmp_path, caplog):
    sink = HttpSink(server.url, "dirty", spool_dir=tmp_path / "spool", **FAST)
    with caplog.at_level(logging.WARNING, "deltascope.sinks.http"):
        for s in range(3):
            sink.write(s, {**scalars(s), "loss": float("nan"), "not a key": 1.0})
        sink.close()
    assert sink.stats.written == 3 and sink.stats.rejected == 0
    assert sink.stats.nonfinite == 3 and sink.stats.bad_keys == 3
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1
    layers = httpx.get(f"{server.url}/api/v1/runs/{sink.run_id}/layers").json()
    assert "loss" not in layers["scalars"] and layers["scalars"]["lr"] == 3e-4


def test_never_blocks_or_raises_without_a_server(tmp_path):
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", "nobody", spool_dir=tmp_path / "spool",
                    queue_size=8, **FAST)
    callers = network_threads(sink)
    for s in range(500):
        sink.write(s, scalars(s))
    assert wait_for(lambda: callers)
    assert threading.get_ident() not in callers  # the network is only ever tried off the caller's thread
    sink.flush(timeout=5)
    sink.close(timeout=5)
    sink.close()
    sink.write(999, scalars(999))
    st = sink.stats
    assert st.dropped >= 1 and st.written == 0 and st.pending == st.spooled >= 1
    spooled = [json.loads(line) for line in sink.spool.path.read_text().splitlines()]
    steps = [r["step"] for b in spooled for r in b["records"]]
    assert steps == sorted(steps) and len(steps) + st.dropped == 501


# -- the spool on its own ---------------------------------------------------------------------


def test_spool_replays_in_order_and_truncates_when_drained(tmp_path):
    sp = Spool(tmp_path / "s.jsonl")
    for i in range(3):
        sp.append({"batch_id": f"b{i}", "records": [{"step": i}]})
    seen = []
    while (b := sp.peek()) is not None:
        seen.append(b["batch_id"])
        sp.ack()
        if b["batch_id"] == "b0":
            assert sp.cursor_path.read_text() == str(len(Path(sp.path).read_bytes().split(b"\n")[0]) + 1)
    assert seen == ["b0", "b1", "b2"] and sp.pending == 0
    assert sp.path.stat().st_size == 0 and not sp.cursor_path.exists()
    sp.remove()
    assert not sp.path.exists()


def test_spool_cuts_a_torn_last_line(tmp_path):
    sp = Spool(tmp_path / "s.jsonl")
    sp.append({"batch_id": "ok", "records": []})
    with open(sp.path, "ab") as f:
        f.write(b'{"batch_id": "torn", "rec')
    sp.pending += 1  # as if the append had been counted before the crash
    assert sp.peek()["batch_id"] == "ok"
    sp.ack()
    assert sp.peek() is None and sp.pending == 0


def test_a_batch_over_the_body_limit_is_split_not_lost(tmp_path):
    server = LiveServer(tmp_path, max_body_bytes="2048").start()
    try:
        sink = HttpSink(server.url, "split", spool_dir=tmp_path / "spool",
                        **{**FAST, "batch_size": 8, "flush_interval": 5.0})
        for s in range(8):  # about 500 bytes a record: 8 of them are over 2 KiB
            sink.write(s, scalars(s))
        sink.close()
        assert sink.stats.written == 8 and sink.stats.rejected == 0
        steps, batches = stored(server, sink.run_id)
        assert steps == list(range(8)) and len(batches) > 1
        assert all("." in b[0] for b in batches)  # parts of the one original batch id
    finally:
        server.stop()
