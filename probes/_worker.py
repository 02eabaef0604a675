"""The probe's host work: finishing a log step's statistics, the Detector and the sinks, either on
the probe's host thread (:class:`HostSide`) or in a child process of its own (:class:`Worker`).

Why a process: the host work is Python (about 1.2 ms per log step for the small model's 24 sites,
more with real sinks: TensorBoard alone writes 623 scalars). On a host thread every millisecond of
it is taken from the training thread through the GIL, and at the worst moment: the copy's event
completes as the step ends, when the training thread starts launching the next step onto an idle
GPU. In a child process the training process keeps ~30 us of Python per log step (wait for the
event without the GIL, hand the raw buffer over a socket, read a small answer).

The child is ``python -m probes._worker FD`` (a fresh interpreter, never ``multiprocessing``'s
spawn, which re-imports the user's ``__main__`` and would re-run an unguarded training script). It
imports no torch unless a sink does. Sinks move to it by pickling: a disk or network sink that has
written nothing pickles its configuration only (``ThreadedSink.__getstate__``); sinks that cannot
move (``MemorySink``, user sinks) stay in the training process and receive the finished records
back. When the training process dies the child sees end-of-file, then flushes and closes its sinks,
so what was handed over is written. When the child dies the probe finishes on its host thread again
(``Probe._worker_lost``).

Wire format (``multiprocessing.connection`` framing over a socket pair, pickled tuples):
  parent -> child: ("init", HostConfig, sinks), ("step", StepMeta) [+ raw buffer],
                   ("write", step, scalars), ("flush",), ("close",)
  child -> parent: ("ready",), ("done", Done), ("written",), ("flushed", reports), ("closed", reports)
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from probes._finish import Finisher
from probes._layout import Layout
from probes.sink import Histogram, Sink
from probes.sinks.fanout import FanoutSink
from server.rules import Alert, Detector, Transition
from server.thresholds import Thresholds

log = logging.getLogger("deltascope.probes")

START_TIMEOUT = 60.0
"""Seconds the child may take to import and say ready before the probe stays on its thread."""
ANSWER_TIMEOUT = 60.0
"""Seconds one log step (or a flush) may take in the child before it is given up as hung."""


@dataclass
class HostConfig:
    sites: list[tuple[str, int]]
    beta_max: float
    thresholds: Thresholds
    run: str


@dataclass
class StepMeta:
    step: int
    layout: Layout | None
    scalar_names: list[str]
    host_scalars: dict[str, float]
    world: int
    dtype: str | None  # the raw buffer's numpy dtype; None: no buffer follows
    want_record: bool  # send the finished record back: sinks stayed in the training process


@dataclass
class Done:
    step: int
    transitions: list[Transition]
    alerts: list[Alert]
    verdict: str
    error: str | None
    record: tuple[dict[str, float], dict[str, Histogram]] | None


class HostSide:
    """One log step's host work: finish the raw buffer, judge it, write it to ``sink``."""

    def __init__(self, cfg: HostConfig, sinks: Sequence[Sink]) -> None:
        self.finisher = Finisher(cfg.sites, cfg.beta_max)
        self.detector = Detector(cfg.thresholds, cfg.beta_max, cfg.run)
        self.sink = FanoutSink(list(sinks))

    def process(
        self, step: int, arr: np.ndarray | None, layout: Layout | None, scalar_names: list[str],
        host_scalars: Mapping[str, float], world: int,
    ) -> tuple[list[Transition], dict[str, float], dict[str, Histogram]]:
        scalars: dict[str, float] = {}
        hists: dict[str, Histogram] = {}
        per_site: dict[tuple[str, int], dict[str, float]] = {}
        if arr is not None and layout is not None:
            scalars, hists = self.finisher.finish(arr, layout, scalar_names, world)
            per_site = self.finisher.per_site
        scalars.update(host_scalars)
        transitions = self.detector.evaluate_sites(step, per_site)
        self.sink.write(step, scalars, hists)
        return transitions, scalars, hists


def _report(s: Any) -> dict[str, Any]:
    """What the training process's copy of a moved sink learns back: its stats and plain public
    attributes (e.g. ``MLflowSink.run_id``, set by the run it created)."""
    out = {k: v for k, v in vars(s).items()
           if not k.startswith("_") and isinstance(v, str | int | float | bool | type(None))}
    out["stats"] = {f.name: getattr(s.stats, f.name) for f in fields(s.stats)}
    return out


def apply_report(s: Any, rep: Mapping[str, Any]) -> None:
    for k, v in rep.items():
        if k == "stats":
            for name, value in v.items():
                setattr(s.stats, name, value)  # in place: callers may hold s.stats
        else:
            setattr(s, k, v)


def movable(s: Sink) -> bytes | None:
    """``s`` pickled for the child, or None when it must stay in this process: only sinks that
    say ``moves_to_worker = True`` move (a user sink may hold anything: locks, callbacks, the list
    a notebook reads), and only while they have written nothing."""
    if not getattr(type(s), "moves_to_worker", False):
        return None
    try:
        return pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        log.info("%s stays in the training process: %r", type(s).__name__, e)
        return None


# -- the training process's side ------------------------------------------------------------------
class WorkerLost(RuntimeError):
    """The child exited, hung or answered nonsense; the probe goes back to its host thread."""


class Worker:
    """A child process running :class:`HostSide`; one request and one answer at a time, from one
    thread (the probe's host thread)."""

    def __init__(self, cfg: HostConfig, sinks: Sequence[bytes]) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, *sys.path, env.get("PYTHONPATH", "")] if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "probes._worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self._send(("init", cfg, list(sinks)))
            self._expect("ready", START_TIMEOUT)
        except BaseException:
            self.kill()
            raise

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            raise WorkerLost(f"probe worker gone ({self._status()}): {e!r}") from e

    def _expect(self, kind: str, timeout: float) -> Any:
        try:
            if not self.conn.poll(timeout):  # blocks in select(), without the GIL
                raise WorkerLost(f"probe worker did not answer {kind!r} within {timeout:g} s")
            msg = pickle.loads(self.conn.recv_bytes())
        except (OSError, EOFError) as e:
            raise WorkerLost(f"probe worker gone ({self._status()}): {e!r}") from e
        if msg[0] != kind:
            raise WorkerLost(f"probe worker answered {msg[0]!r}, expected {kind!r}")
        return msg[1] if len(msg) > 1 else None

    def _status(self) -> str:
        code = self.proc.poll()
        return "running" if code is None else f"exit code {code}"

    def step(self, meta: StepMeta, raw: Any) -> Done:
        """One log step: ``raw`` is the host copy of the device buffer (anything with the buffer
        protocol), handed over as it is."""
        self._send(("step", meta))
        if meta.dtype is not None:
            try:
                self.conn.send_bytes(raw)
            except OSError as e:
                raise WorkerLost(f"probe worker gone ({self._status()}): {e!r}") from e
        return self._expect("done", ANSWER_TIMEOUT)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._send(("write", step, scalars))
        self._expect("written", ANSWER_TIMEOUT)

    def flush(self, timeout: float) -> list[dict[str, Any]]:
        self._send(("flush",))
        return self._expect("flushed", timeout)

    def close(self, timeout: float) -> list[dict[str, Any]] | None:
        """Ask the child to close its sinks and exit; their last reports, or None if it could not."""
        try:
            self._send(("close",))
            reports = self._expect("closed", timeout)
        except WorkerLost as e:
            log.warning("deltascope probe worker did not close cleanly: %s", e)
            reports = None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.conn.close()
        return reports

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the child ------------------------------------------------------------------------------------
def _serve(conn: Connection) -> None:
    kind, cfg, blobs = pickle.loads(conn.recv_bytes())
    assert kind == "init"
    sinks = [pickle.loads(b) for b in blobs]
    for s in sinks:
        try:
            s.warm()
        except Exception as e:  # its first write will fail the same way, counted by the sink
            log.warning("%s could not import what it needs: %r", type(s).__name__, e)
    host = HostSide(cfg, sinks)

    def answer(*msg: Any) -> None:
        conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    answer("ready")
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:  # the training process is gone: write out what it handed over
            host.sink.close()
            return
        if msg[0] == "step":
            meta: StepMeta = msg[1]
            arr = None
            if meta.dtype is not None:
                arr = np.frombuffer(conn.recv_bytes(), dtype=meta.dtype).astype(np.float64)
            error, record = None, None
            transitions: list[Transition] = []
            try:
                transitions, scalars, hists = host.process(
                    meta.step, arr, meta.layout, meta.scalar_names, meta.host_scalars, meta.world)
                if meta.want_record:
                    record = (scalars, hists)
            except Exception as e:  # one bad step is counted by the parent, the child goes on
                error = repr(e)
            d = host.detector
            answer("done", Done(meta.step, transitions, d.alerts(), d.verdict(), error, record))
        elif msg[0] == "write":
            host.sink.write(msg[1], msg[2])
            answer("written")
        elif msg[0] == "flush":
            host.sink.flush()
            answer("flushed", [_report(s) for s in host.sink.sinks])
        elif msg[0] == "close":
            host.sink.close()
            answer("closed", [_report(s) for s in host.sink.sinks])
            return


def main(argv: Sequence[str]) -> int:
    # Ctrl-C reaches the whole foreground process group: the child outlives the interrupt and
    # exits on end-of-file once the training process is gone, after closing its sinks
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="deltascope probe worker: %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    try:
        _serve(conn)
    except (EOFError, OSError):
        return 0
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: what it pickles must name probes._worker
    from probes._worker import main as _main

    sys.exit(_main(sys.argv[1:]))
