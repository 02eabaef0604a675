"""Against a real uvicorn server in a subprocess on 127.0.0.1: the live alert stream, SIGKILL
durability, client errors over a real socket, and schemathesis over the published OpenAPI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import batch, scalars
from tests.server.live import LiveServer


class SSEReader:
    """Reads an event stream on its own thread; each event is kept with its arrival time, so a
    test can measure latency while it keeps posting."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[float, str, dict]] = []
        self._cond = threading.Condition()
        self.status: int | None = None
        self.content_type = ""
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=60.0))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._client.stream("GET", self.url) as r:
                self.status, self.content_type = r.status_code, r.headers.get("content-type", "")
                event, data = "message", []
                for line in r.iter_lines():  # the server pings often: the stop flag is seen
                    if self._stop.is_set():
                        return
                    if line == "":
                        if data:
                            with self._cond:
                                self.events.append((time.monotonic(), event, json.loads("\n".join(data))))
                                self._cond.notify_all()
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
        except Exception as e:  # closing the client from the test ends the stream here
            self.error = e

    def find(self, event: str, timeout: float = 10.0, where=lambda d: True) -> tuple[float, dict]:
        """The first ``event`` received so far (or within ``timeout``) that satisfies ``where``."""
        def hit():
            return next(((t, d) for t, k, d in self.events if k == event and where(d)), None)

        with self._cond:
            if self._cond.wait_for(lambda: hit() is not None, timeout):
                return hit()
        raise AssertionError(f"no {event!r} event in {timeout} s (status {self.status}, {self.error!r})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("live"), admin_token="adm", sse_ping_s="0.2").start()
    yield server
    server.stop()


def test_sse_subscriber_gets_the_alert_once_beta_collapse_holds_for_for_evals(live):
    run_id, headers = live.register("sse")
    per_run = SSEReader(f"{live.url}/api/v1/runs/{run_id}/events")
    everyone = SSEReader(f"{live.url}/api/v1/events")
    try:
        per_run.find("ready")
        everyone.find("ready")
        assert per_run.status == 200 and per_run.content_type.startswith("text/event-stream")
        with httpx.Client(base_url=live.url, headers=headers, timeout=10) as c:
            for step in (1, 2, 3):  # for_evals = 3 consecutive log steps below collapse_beta
                r = c.post(f"/api/v1/runs/{run_id}/stats", json=batch(f"s{step}", [step], beta_p90__mlp__1=0.01))
                assert r.status_code == 200
        _, alert = per_run.find("alert", where=lambda d: d["state"] == "firing")
        assert (alert["rule"], alert["site"], alert["layer"], alert["step"]) == ("beta_collapse", "mlp", 1, 3)
        assert alert["run_id"] == run_id and alert["alert_id"] >= 1 and alert["prev"] == "pending"
        _, stats = per_run.find("stats")
        assert stats["run_id"] == run_id and stats["beta_p90_min"] == pytest.approx(0.01)
        _, seen = everyone.find("alert", where=lambda d: d["state"] == "firing")
        assert seen["alert_id"] == alert["alert_id"]
    finally:
        per_run.close()
        everyone.close()


def test_client_errors_over_a_real_socket(live):
    run_id, headers = live.register("errors")
    other_id, other = live.register("other")
    url = f"{live.url}/api/v1/runs/{run_id}/stats"
    good = batch("ok", [1])
    nan = json.dumps(good).replace('"beta_p90/attn/L00": 0.9', '"beta_p90/attn/L00": NaN')
    js = {"content-type": "application/json"}
    cases = [
        (httpx.post(url, content=b'{"batch_id": ', headers={**headers, **js}), 422, "malformed JSON"),
        (httpx.post(url, content=nan, headers={**headers, **js}), 422, "beta_p90/attn/L00"),
        (httpx.post(url, json=good), 401, "Authorization"),
        (httpx.post(url, json=good, headers={"Authorization": "Bearer wrong"}), 403, f"run {run_id}"),
        (httpx.post(url, json=good, headers=other), 403, f"run {run_id}"),
        (httpx.post(f"{live.url}/api/v1/runs/987654/stats", json=good, headers=headers), 404,
         "unknown run 987654"),
        (httpx.post(url, content=b"[" * 100_000, headers={**headers, **js}), 400, "nested deeper"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["detail"], (status, r.text)
    big = b'{"batch_id": "x", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    try:
        r = httpx.post(url, content=big, headers={**headers, **js}, timeout=10)
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    except httpx.WriteError:
        pass  # the server may answer 413 and close before the client finishes writing
    assert httpx.get(f"{live.url}/healthz").status_code == 200  # still up
    assert httpx.get(f"{live.url}/api/v1/runs/{run_id}").json()["last_step"] is None


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_record(tmp_path):
    server = LiveServer(tmp_path).start()
    run_id, headers = server.register("crash")
    acked: list[int] = []
    stop = threading.Event()

    def sender() -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=5) as c:
            step = 0
            while not stop.is_set():
                step += 1
                try:
                    r = c.post(f"/api/v1/runs/{run_id}/stats", json={"batch_id": f"b{step}", "records": [
                        {"step": step, "scalars": scalars(step, layers=12)}]})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    acked.append(step)

    t = threading.Thread(target=sender)
    t.start()
    time.sleep(1.5)
    server.kill()  # mid-stream: some POST is likely in flight
    stop.set()
    t.join(10)
    assert len(acked) > 5
    server.start()
    h = httpx.get(f"{server.url}/api/v1/runs/{run_id}/history",
                  params={"stat": "beta_p90", "site": "mlp", "layer": 11, "max_points": 10_000}).json()
    stored = [p["step"] for p in h["points"]]
    assert set(acked) <= set(stored)  # every acknowledged record is there
    assert stored == list(range(1, len(stored) + 1))  # and no gap, no half batch
    assert len(stored) <= len(acked) + 1  # at most the one in flight, committed but unanswered
    layers = httpx.get(f"{server.url}/api/v1/runs/{run_id}/layers").json()
    assert len(layers["layers"]) == 24 and layers["last_step"] == stored[-1]
    server.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_undocumented_status(live, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis CLI not installed"
    run_id, headers = live.register("fuzz")
    r = httpx.post(f"{live.url}/api/v1/runs/{run_id}/stats", headers=headers,
                   json=batch("seed", [1], nonfinite__attn__0=1.0))
    alert_id = r.json()["alerts"][0]["alert_id"]
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(f'headers = {{ Authorization = "{headers["Authorization"]}" }}\n'
                   f'[parameters]\n"path.run_id" = {run_id}\n"path.alert_id" = {alert_id}\n')
    cmd = [st, "--config-file", str(cfg), "run", f"{live.url}/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--max-examples", "25", "--seed", "7", "--no-shrink",
           # one worker: CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion depth
           # mismatch", cpython#106905) and hypothesis parses lambda sources from each worker thread
           "--workers", "1",
           "--exclude-path-regex", "events$", "--request-timeout", "10"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert httpx.get(f"{live.url}/healthz").status_code == 200
