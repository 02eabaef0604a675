"""Alert latency: wall time from posting the first bad log step to receiving the ``firing`` SSE event.

Starts the server (subprocess, temporary SQLite file), and for each repetition registers a run,
subscribes to ``GET /api/v1/runs/{id}/events`` in a thread (httpx streaming, waits for ``ready``),
then posts one log step (one record of 24 sites x 27 stats + loss + lr) every ``--interval``
seconds on a fixed schedule: ``--healthy`` healthy steps, then steps where
``beta_p90/attn/L03`` is below ``collapse_beta``. The latency runs from just before the POST of
the FIRST bad step to the arrival of the ``alert`` event for ``beta_collapse`` with state
``firing``. With ``for_evals`` = N the detector fires on the N-th consecutive bad step, so the
expected latency is about (N - 1) x interval plus one request; the bound checked is
``for_evals x interval + 1 s``.

    python bench/alert_latency.py                 # 5 repetitions, interval 0.2 s
    python bench/alert_latency.py --reps 10 --interval 0.5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import record, start_server  # noqa: E402

from server.catalogue import key  # noqa: E402
from server.thresholds import Thresholds  # noqa: E402

SITE, LAYER = "attn", 3


class Listener(threading.Thread):
    """Reads one run's SSE stream; sets ``ready`` on the ``ready`` event and records the
    perf_counter time of the first ``beta_collapse`` alert whose state is ``firing``."""

    def __init__(self, url: str, run_id: int) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id = url, run_id
        self.ready = threading.Event()
        self.fired = threading.Event()
        self.t_fire: float | None = None
        self.alert: dict | None = None
        self.states: list[tuple[int, str]] = []
        self.stop = False

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(5, read=None)) as c, \
                c.stream("GET", f"/api/v1/runs/{self.run_id}/events") as r:
            event = None
            for line in r.iter_lines():
                if self.stop:
                    return
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event is not None:
                    now = time.perf_counter()
                    data = json.loads(line[5:].strip())
                    if event == "ready":
                        self.ready.set()
                    elif event == "alert" and data.get("rule") == "beta_collapse":
                        self.states.append((data["step"], data["state"]))
                        if data["state"] == "firing" and self.t_fire is None:
                            self.t_fire, self.alert = now, data
                            self.fired.set()
                            return
                elif not line:
                    event = None


def one_rep(url: str, rep: int, interval: float, healthy: int, bad_beta: float,
            max_bad: int, rng: random.Random) -> dict:
    with httpx.Client(base_url=url, timeout=30) as c:
        run = c.post("/api/v1/runs", json={"name": f"bench-alert-{rep}"}).json()
        c.headers.update({"authorization": f"Bearer {run['token']}", "content-type": "application/json"})
        lis = Listener(url, run["id"])
        lis.start()
        if not lis.ready.wait(10):
            raise SystemExit("no `ready` event in 10 s")
        path = f"/api/v1/runs/{run['id']}/stats"
        bad_key = key("beta_p90", SITE, LAYER)
        t_first = None
        first_bad_step = healthy
        bad_posted = 0
        start = time.perf_counter()
        for step in range(healthy + max_bad):
            due = start + step * interval
            while (d := due - time.perf_counter()) > 0:
                if lis.fired.wait(d):
                    break
            if lis.fired.is_set():
                break
            rec = record(step, rng, False)
            if step >= healthy:
                rec["scalars"][bad_key] = bad_beta
            body = json.dumps({"batch_id": f"s{step}", "records": [rec]})
            t_post = time.perf_counter()
            if step == first_bad_step:
                t_first = t_post
            c.post(path, content=body).raise_for_status()
            if step >= healthy:
                bad_posted += 1
        lis.fired.wait(5)
        lis.stop = True
    if lis.t_fire is None or t_first is None:
        return {"rep": rep, "latency": None, "bad_posted": bad_posted, "states": lis.states}
    return {"rep": rep, "latency": lis.t_fire - t_first, "fire_step": lis.alert["step"],
            "first_bad_step": first_bad_step, "bad_posted": bad_posted, "states": lis.states}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between log steps")
    ap.add_argument("--healthy", type=int, default=5, help="healthy log steps before the bad ones")
    ap.add_argument("--max-bad", type=int, default=20, help="give up after this many bad steps")
    a = ap.parse_args()

    t = Thresholds()
    bound = t.for_evals * a.interval + 1.0
    bad_beta = t.collapse_beta / 5
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(f"sqlite:///{tmp}/alert.db")
        try:
            for rep in range(a.reps):
                rows.append(one_rep(url, rep, a.interval, a.healthy, bad_beta, a.max_bad, rng))
        finally:
            proc.terminate()
            proc.wait(10)

    print(f"alert latency: beta_collapse on {SITE} L{LAYER:02d}, beta_p90={bad_beta:g} < collapse_beta="
          f"{t.collapse_beta:g}; one log step per POST every {a.interval:g} s; for_evals={t.for_evals}; "
          f"bound = for_evals x interval + 1 s = {bound:.2f} s")
    print(f"{'rep':>3}  {'first bad step':>14}  {'firing at step':>14}  {'latency s':>9}  {'<= bound':>8}")
    lats = []
    for r in rows:
        if r["latency"] is None:
            print(f"{r['rep']:>3}  {'-':>14}  {'never':>14}  {'-':>9}  {'NO':>8}   states={r['states']}")
            continue
        lats.append(r["latency"])
        print(f"{r['rep']:>3}  {r['first_bad_step']:>14}  {r['fire_step']:>14}  {r['latency']:>9.3f}  "
              f"{'yes' if r['latency'] <= bound else 'NO':>8}")
    if lats:
        exp = (t.for_evals - 1) * a.interval
        print(f"min {min(lats):.3f} s, median {sorted(lats)[len(lats) // 2]:.3f} s, max {max(lats):.3f} s "
              f"(schedule alone: (for_evals-1) x interval = {exp:.2f} s); "
              f"{sum(x <= bound for x in lats)}/{len(rows)} within the {bound:.2f} s bound")


if __name__ == "__main__":
    main()
