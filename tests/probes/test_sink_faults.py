"""Training never stalls or dies because of instrumentation (issue 7): each fault is real, a sink
that meets it is attached to a real training loop (tiny model, AdamW, a Probe logging every step),
and every test checks the same four things:

- the loop ran all its steps and nothing reached it (an exception in any thread fails the test);
- the destination is only ever touched from the sink's own thread, never the training thread or
  the probe's host thread: training cannot wait for it, whatever it does (no wall-clock asserts);
- the sink's logger warned once per fault kind, whatever the number of steps;
- the sink's counters (plus, for HttpSink, the records left in its spool) account for every log
  step that a healthy MemorySink beside it received.

Faults: the server down at start, killed mid-run, slow, stalled past the client timeout or
answering 500s; the spool's disk full (/dev/full: a real ENOSPC from the kernel); the MLflow server
unreachable; a TensorBoard or JSONL directory under a regular file; a JSONL file on a full disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from probes import JsonlSink, MemorySink, MLflowSink, Probe, TensorBoardSink
from probes.http_sink import HttpSink
from tests.probes.conftest import batch, tiny
from tests.server.live import LiveServer, free_port

STEPS = 24
CLOSE = 60.0  # an upper bound for flush() and close(), never reached by a sink whose thread is free
HOLD = 600.0  # a client timeout no hold in these tests comes near
QUICK = {"batch_size": 4, "flush_interval": 0.05, "retry_initial": 0.05, "retry_max": 0.3}


# -- the loop -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a training run saw: steps completed, the probe, and a healthy sink beside the faulty."""

    done: int
    probe: Probe
    control: MemorySink


def train(sink: Any, steps: int = STEPS, between: dict[int, Callable[[Probe], None]] | None = None,
          after: Callable[[], None] | None = None) -> Run:
    """``steps`` AdamW steps of the tiny model with a Probe logging every step into ``sink`` and a
    MemorySink. The test's own doings (kill a server...): ``between[s](probe)`` before step s,
    ``after()`` once the last step is done, before the flush and close that end a run."""
    model = tiny()
    x = batch(model, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    control = MemorySink()
    probe = Probe(model, every=1, sinks=[sink, control])
    done = 0
    for step in range(steps):
        if between and step in between:
            between[step](probe)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step(step, scalars={"loss": loss.detach()})
        done += 1
    if after is not None:
        after()
    sink.flush(timeout=CLOSE)  # generous, for a loaded machine; probe.flush uses the sink's default
    probe.flush()  # the last log step handed to the sinks, and flushed
    sink.close(timeout=CLOSE)
    probe.close()
    return Run(done, probe, control)


def touched_by(sink: Any, method: str) -> set[int]:
    """Idents of the threads that call ``sink.<method>``, the door to its destination (a spy: the
    real method runs)."""
    seen: set[int] = set()
    real = getattr(sink, method)

    def spy(*a: Any, **k: Any) -> Any:
        seen.add(threading.get_ident())
        return real(*a, **k)

    setattr(sink, method, spy)
    return seen


def assert_ran(run: Run, sink: Any, callers: set[int]) -> None:
    assert run.done == STEPS
    assert run.probe.stats.log_steps == STEPS and run.probe.stats.dropped == 0
    assert [r.step for r in run.control.records] == list(range(STEPS))
    assert callers == {sink._thread.ident}  # neither the training thread nor the probe's
    assert not sink._thread.is_alive()  # close() finished the thread, it did not give up on it


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and (r.name == logger or r.name.startswith(logger + "."))]


def assert_warned_once_each(caplog: pytest.LogCaptureFixture, logger: str, *patterns: str) -> None:
    """Exactly one warning per pattern from ``logger``, and none other: not one per step."""
    got = warnings_from(caplog, logger)
    assert len(got) == len(patterns), got
    for p in patterns:
        assert sum(bool(re.search(p, m)) for m in got) == 1, (p, got)
    assert warnings_from(caplog, "deltascope.probes") == []


def spooled_steps(sink: HttpSink) -> list[int]:
    if not sink.spool.path.is_file():
        return []
    batches = [json.loads(line) for line in sink.spool.path.read_text().splitlines()]
    assert len(batches) == sink.stats.pending
    return [r["step"] for b in batches for r in b["records"]]


@pytest.fixture
def logs(caplog):
    with caplog.at_level(logging.WARNING):
        yield caplog


# -- a misbehaving server -------------------------------------------------------------------------


class BadServer:
    """A real HTTP server on 127.0.0.1 speaking just enough of the deltascope API. ``hold``: every
    request waits until ``release`` is set, then ``delay`` s more; ``status``: every request gets
    this status and nothing else."""

    def __init__(self, hold: bool = False, delay: float = 0.0, status: int | None = None) -> None:
        self.received = self.answered = 0
        self.release = threading.Event()
        lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    srv.received += 1
                if hold:
                    srv.release.wait()
                time.sleep(delay)
                code, body = status, {"detail": "broken"}
                if code is None and self.path == "/api/v1/runs":
                    code, body = 201, {"id": 1, "token": "t"}
                elif code is None:
                    code, body = 200, {"duplicate": False, "verdict": "healthy", "firing": [], "alerts": []}
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting
                    return
                with lock:
                    srv.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> BadServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


# -- HttpSink -------------------------------------------------------------------------------------


def test_http_server_down_at_start(tmp_path, logs):
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", "down", spool_dir=tmp_path, timeout=5.0, **QUICK)
    callers = touched_by(sink, "_post")
    run = train(sink)
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks", "unreachable", "undelivered")
    st = sink.stats
    assert st.written == 0 and st.dropped == 0 and st.outages == 1
    assert spooled_steps(sink) == list(range(STEPS))  # all of it, in order, for a later replay


@pytest.mark.slow
def test_http_server_killed_mid_run(tmp_path, logs):
    server = LiveServer(tmp_path).start()
    sink = HttpSink(server.url, "killed", spool_dir=tmp_path / "spool", timeout=CLOSE, **QUICK)
    callers = touched_by(sink, "_post")
    mid = STEPS // 2

    def kill(probe: Probe) -> None:
        probe.flush()  # the first half delivered, then SIGKILL: no goodbye, the port closed
        assert sink.stats.written == mid
        server.kill()

    try:
        run = train(sink, between={mid: kill})
    finally:
        server.stop()
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks", "unreachable", "undelivered")
    assert sink.stats.written == mid and sink.stats.dropped == 0 and sink.stats.outages == 1
    assert spooled_steps(sink) == list(range(mid, STEPS))


def test_http_slow_server_is_never_waited_for(tmp_path, logs):
    """The server holds every request until the loop is over, then answers each after 0.2 s. The
    loop's second half runs while a request is held. Slow is not lost: no warning, all delivered."""
    with BadServer(hold=True, delay=0.2) as server:
        sink = HttpSink(server.url, "slow", spool_dir=tmp_path, timeout=HOLD, **QUICK)
        callers = touched_by(sink, "_post")
        seen: dict[str, int] = {}

        def until_held(probe: Probe) -> None:  # between steps: a request is inside the server
            deadline = time.monotonic() + CLOSE
            while server.received == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["held"] = server.received

        def release() -> None:
            seen["answered"] = server.answered
            server.release.set()

        run = train(sink, between={STEPS // 2: until_held}, after=release)
    assert seen == {"held": seen["held"], "answered": 0} and seen["held"] >= 1
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks")
    assert sink.stats.written == STEPS and sink.stats.dropped == 0 and sink.stats.spooled == 0


@pytest.mark.parametrize("fault", ["stalled", "http_500"])
def test_http_server_stalled_or_failing(fault, tmp_path, logs):
    """Stalled: the server holds every request past the client's timeout. 500: it answers every
    request with an internal error. Either way: spooled, one warning, nothing waits."""
    bad = BadServer(hold=True) if fault == "stalled" else BadServer(status=500)
    with bad as server:
        sink = HttpSink(server.url, fault, spool_dir=tmp_path, timeout=0.5 if fault == "stalled" else HOLD,
                        **QUICK)
        callers = touched_by(sink, "_post")
        run = train(sink)
        assert server.received >= 1 and server.answered == (0 if fault == "stalled" else server.received)
    assert_ran(run, sink, callers)
    reason = "Timeout" if fault == "stalled" else "HTTP 500"
    assert_warned_once_each(logs, "deltascope.sinks", f"unreachable.*{reason}", "undelivered")
    assert sink.stats.written == 0 and sink.stats.dropped == 0 and sink.stats.outages == 1
    assert spooled_steps(sink) == list(range(STEPS))


def _full_spool(tmp_path: Path) -> HttpSink:
    """Server down and the spool file on a full disk: its path, known once the sink exists and
    written only at the first outage, is a symlink to /dev/full, where every write is ENOSPC."""
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", "full", spool_dir=tmp_path, timeout=5.0, **QUICK)
    os.symlink("/dev/full", sink.spool.path)
    return sink


def test_http_spool_on_a_full_disk(tmp_path, logs):
    sink = _full_spool(tmp_path)
    callers = touched_by(sink, "_post")
    run = train(sink)
    assert_ran(run, sink, callers)
    # the ENOSPC itself is reported, not the EINVAL of the spool cutting its line back (/dev/full
    # refuses ftruncate; a real full file system would not)
    assert_warned_once_each(logs, "deltascope.sinks", "unreachable", r"cannot spool .*OSError\(28,")
    st = sink.stats
    assert st.written == 0 and st.spooled == 0 and st.pending == 0
    assert 1 <= st.errors <= STEPS  # one per batch that found no room: counted, not raised
    assert st.written + st.dropped + len(spooled_steps(sink)) == STEPS  # every lost record counted


# -- MLflow, TensorBoard, JSONL -------------------------------------------------------------------


def test_mlflow_server_unreachable(logs):
    sink = MLflowSink(f"http://127.0.0.1:{free_port()}", run_name="nobody")
    callers = touched_by(sink, "_write")
    run = train(sink)
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks", "MLflowSink write failed.*unreachable")
    assert [r.getMessage() for r in logs.records if r.name.startswith("urllib3")] == []  # no retries
    st = sink.stats
    assert st.written == 0 and st.dropped == STEPS and 1 <= st.errors <= STEPS
    assert sink.run_id is None


def _under_a_file(tmp_path: Path, name: str) -> Path:
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path / "a-file" / name  # root or not, nothing can be created in here


def test_tensorboard_logdir_unwritable(tmp_path, logs):
    sink = TensorBoardSink(_under_a_file(tmp_path, "tb"))
    callers = touched_by(sink, "_write")
    run = train(sink)
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks", "TensorBoardSink write failed: NotADirectoryError")
    st = sink.stats
    assert st.written == 0 and st.dropped == STEPS and 1 <= st.errors <= STEPS


@pytest.mark.parametrize("fault", ["unwritable", "disk_full"])
def test_jsonl_unwritable_or_disk_full(fault, tmp_path, logs):
    if fault == "unwritable":
        path, error = _under_a_file(tmp_path, "stats.jsonl"), "FileExistsError"  # mkdir of a-file
    else:
        path, error = tmp_path / "stats.jsonl", "No space left on device"
        os.symlink("/dev/full", path)
    sink = JsonlSink(path)
    callers = touched_by(sink, "_write")
    run = train(sink)
    assert_ran(run, sink, callers)
    assert_warned_once_each(logs, "deltascope.sinks", f"JsonlSink write failed: .*{error}")
    st = sink.stats
    assert st.written == 0 and st.dropped == STEPS and 1 <= st.errors <= STEPS


_TORN = """
import json, resource, sys
from probes.sinks.jsonl import JsonlSink
sink = JsonlSink(sys.argv[1])
sink._retry_initial = sink._backoff = 0.0  # retry the next record at once
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # Python ignores SIGXFSZ: EFBIG instead
sink.write(0, {"loss": 0.0})
sink.write(1, {f"k{i:04d}": 1.0 for i in range(1000)})  # 12 KB: 4 KB of it fit, then EFBIG
sink.write(2, {"loss": 2.0})
sink.close()
print(json.dumps([sink.stats.written, sink.stats.dropped, sink.stats.last_error]))
"""


def test_jsonl_keeps_whole_lines_when_a_write_stops_half_way(tmp_path):
    """A line that only partly reached the file (a real short write: a file size limit, as on a
    disk that fills mid-line) is cut off again, so the next record starts a line a reader parses."""
    path = tmp_path / "stats.jsonl"
    out = subprocess.run([sys.executable, "-c", _TORN, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    written, dropped, error = json.loads(out.stdout)
    assert [written, dropped] == [2, 1] and "File too large" in error
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]
