"""Step time under sink faults: the tiny model trained on CPU with probes every step, once with no
sinks and once per fault, interleaved over rounds (the order rotates each round).

Faults, all real: the deltascope server down at start, killed (SIGKILL) mid-run, slow (every
request held ``--slow`` s) or answering 500 to everything; the HttpSink spool on a full disk (its
file is a symlink to /dev/full, server down); the MLflow tracking server unreachable; a TensorBoard
or JSONL directory under a regular file. Each run builds a fresh Probe and sink on the same model,
times every step (forward, backward, AdamW, ``probe.step``), then closes the probe untimed. Each
fault run is paired with a no-sink run (a Probe without sinks) just before or after it, the order
alternating by round, so that slow drift in the machine's load cancels within a pair. The table
gives the median step of the fault runs and of their baselines, the median and range over rounds
of the paired ratio, the warnings the job's log got per run (``deltascope.*``, and any other
logger's), and the sink's counters of the last round. A healthy JsonlSink is there for reference:
what a working sink costs. On a shared machine the noise is large: read the range, not only the
median.

    python bench/faults.py                    # 3 rounds of 100 steps
    python bench/faults.py --rounds 5 --steps 200 --only "down at start,mlflow"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ingest import free_port, start_server  # noqa: E402

from ddl import DDLModel, presets, with_overrides  # noqa: E402
from probes import JsonlSink, MLflowSink, Probe, TensorBoardSink  # noqa: E402
from probes.http_sink import HttpSink  # noqa: E402


class BadServer:
    """A real HTTP server on 127.0.0.1: every request waits ``delay`` s, then gets ``status`` (or
    the answers of a healthy deltascope server)."""

    def __init__(self, delay: float = 0.0, status: int | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(delay)
                code, body = status, {"detail": "broken"}
                if code is None:
                    code, body = ((201, {"id": 1, "token": "t"}) if self.path == "/api/v1/runs" else
                                  (200, {"duplicate": False, "verdict": "healthy", "firing": [], "alerts": []}))
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Warnings(logging.Handler):
    """Counts WARNING and above: the job's log during one run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ours = self.others = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("deltascope"):
            self.ours += 1
        else:
            self.others += 1


class Fault:
    """``make(tmp)`` -> (sink, between) for one run; ``between(i)`` runs before its i-th step."""

    def __init__(self, name: str, make: Callable[[Path], tuple[Any, Callable[[int], None] | None]]) -> None:
        self.name, self.make = name, make


def http_counters(s: HttpSink) -> str:
    st = s.stats
    recs = 0
    if s.spool.path.is_file():
        recs = sum(len(json.loads(line)["records"]) for line in s.spool.path.read_text().splitlines())
    return (f"written {st.written}, spooled {st.spooled} batches ({recs} records left), "
            f"dropped {st.dropped}, errors {st.errors}")


def counters(s: Any) -> str:
    if isinstance(s, HttpSink):
        return http_counters(s)
    st = s.stats
    return f"written {st.written}, dropped {st.dropped}, errors {st.errors}"


def faults(args: argparse.Namespace, servers: list[Any]) -> list[Fault]:
    quick = {"batch_size": 16, "flush_interval": 1.0}
    slow, failing = BadServer(delay=args.slow), BadServer(status=500)
    servers += [slow, failing]
    live: dict[str, Any] = {}

    def down(tmp: Path) -> tuple[Any, None]:
        return HttpSink(f"http://127.0.0.1:{free_port()}", "down", spool_dir=tmp, **quick), None

    def killed(tmp: Path) -> tuple[Any, Callable[[int], None]]:
        live["proc"], url = start_server(f"sqlite:///{tmp / 'live.db'}")

        def between(step: int) -> None:
            if step == args.steps // 2:
                live["proc"].kill()  # SIGKILL mid-run; the loop goes on
                live["proc"].wait()

        return HttpSink(url, "killed", spool_dir=tmp / "spool", **quick), between

    def full(tmp: Path) -> tuple[Any, None]:
        s = HttpSink(f"http://127.0.0.1:{free_port()}", "full", spool_dir=tmp, **quick)
        os.symlink("/dev/full", s.spool.path)  # every write of the spool file: ENOSPC
        return s, None

    def under_file(tmp: Path, name: str) -> Path:
        (tmp / "a-file").write_text("not a directory\n")
        return tmp / "a-file" / name

    return [
        Fault("http: server down at start", down),
        Fault("http: server killed mid-run", killed),
        Fault(f"http: slow server ({args.slow:g} s/request)",
              lambda tmp: (HttpSink(slow.url, "slow", spool_dir=tmp, timeout=4 * args.slow, **quick), None)),
        Fault("http: server answers 500", lambda tmp: (HttpSink(failing.url, "500", spool_dir=tmp, **quick), None)),
        Fault("http: spool disk full", full),
        Fault("mlflow: server unreachable",
              lambda tmp: (MLflowSink(f"http://127.0.0.1:{free_port()}", run_name="down"), None)),
        Fault("tensorboard: logdir unwritable", lambda tmp: (TensorBoardSink(under_file(tmp, "tb")), None)),
        Fault("jsonl: path unwritable", lambda tmp: (JsonlSink(under_file(tmp, "s.jsonl")), None)),
        Fault("(reference: healthy JsonlSink)", lambda tmp: (JsonlSink(tmp / "s.jsonl"), None)),
    ]


def run(model: DDLModel, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, sink: Any,
        between: Callable[[int], None] | None, first: int) -> list[float]:
    times = []
    probe = Probe(model, every=1, sinks=[] if sink is None else [sink], start_step=first)
    for step in range(first, first + steps):
        if between is not None:
            between(step - first)
        t = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.step(step, scalars={"loss": loss.detach()})
        times.append(time.perf_counter() - t)
    probe.close()  # untimed: the end of a job, bounded by the sinks' timeouts
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--slow", type=float, default=2.0, help="seconds the slow server holds each request")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--only", default="", help="comma-separated substrings of fault names")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DDLModel(with_overrides(presets["tiny"], n_layer=2, block_size=32, vocab_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (args.batch, 32), generator=torch.Generator().manual_seed(1))

    counter = Warnings()
    logging.getLogger().addHandler(counter)  # also keeps Python's last-resort handler from printing them
    servers: list[Any] = []
    conds = faults(args, servers)
    if args.only:
        conds = [c for c in conds if any(k in c.name for k in args.only.split(","))]
    times: dict[str, list[float]] = {c.name: [] for c in conds}
    base: dict[str, list[float]] = {c.name: [] for c in conds}
    ratios: dict[str, list[float]] = {c.name: [] for c in conds}
    warned: dict[str, list[tuple[int, int]]] = {c.name: [] for c in conds}
    last: dict[str, str] = {}
    step = 0

    def block(sink: Any, between: Callable[[int], None] | None) -> list[float]:
        nonlocal step
        t = run(model, opt, x, args.steps, sink, between, step)
        step += args.steps
        return t

    block(None, None)  # warm-up
    try:
        for r in range(args.rounds):
            for c in conds:
                with tempfile.TemporaryDirectory() as tmp:
                    pair: dict[str, list[float]] = {}
                    for which in (("base", "fault") if r % 2 == 0 else ("fault", "base")):
                        if which == "base":
                            pair[which] = block(None, None)
                            continue
                        counter.ours = counter.others = 0
                        sink, between = c.make(Path(tmp))
                        pair[which] = block(sink, between)
                        warned[c.name].append((counter.ours, counter.others))
                        last[c.name] = counters(sink)
                mf, mb = statistics.median(pair["fault"]), statistics.median(pair["base"])
                times[c.name] += pair["fault"]
                base[c.name] += pair["base"]
                ratios[c.name].append(mf / mb)
                print(f"round {r + 1}/{args.rounds} {c.name:38s} {1e3 * mf:7.2f} ms, its baseline "
                      f"{1e3 * mb:7.2f} ms", file=sys.stderr, flush=True)
    finally:
        for srv in servers:
            srv.stop()

    allbase = [t for ts in base.values() for t in ts]
    print(f"\ntiny model (n_layer 2, T 32, B {args.batch}), CPU, {torch.get_num_threads()} torch thread(s), "
          f"probe every step; {args.rounds} rounds; each fault run ({args.steps} steps) next to its own "
          f"no-sink baseline run, the pair's order alternating by round; torch {torch.__version__}")
    print(f"no-sink baseline over all runs: median {1e3 * statistics.median(allbase):.2f} ms/step")
    print(f"| {'fault':38s} | median step ms | its baseline ms | vs baseline (median, range of rounds) "
          f"| warnings per run | counters (last round) |")
    print(f"|{'-' * 40}|{'-' * 16}|{'-' * 17}|{'-' * 39}|{'-' * 18}|---|")
    for c in conds:
        rs = ratios[c.name]
        vs = f"{100 * (statistics.median(rs) - 1):+.1f}% ({100 * (min(rs) - 1):+.0f}..{100 * (max(rs) - 1):+.0f}%)"
        ours = sorted({w[0] for w in warned[c.name]})
        others = sum(w[1] for w in warned[c.name])
        w = "/".join(map(str, ours)) + (f" (+{others} other)" if others else "")
        print(f"| {c.name:38s} | {1e3 * statistics.median(times[c.name]):14.2f} | "
              f"{1e3 * statistics.median(base[c.name]):15.2f} | {vs:>37s} | {w:>16s} | {last[c.name]} |")


if __name__ == "__main__":
    main()
