"""The probe's worker process (``Probe(host="process")``): the same records, files and alerts as the
host thread; sinks that can move run in the child and report back; a dead worker costs no data
path (the probe finishes on its thread from then on); a dead training process costs no record the
child had received."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from probes import JsonlSink, MemorySink, Probe
from probes.callbacks import stop_on
from probes.sink import SinkStats
from tests.probes.conftest import batch, tiny
from tests.probes.test_faults import FAULTS, _site

ROOT = Path(__file__).resolve().parents[2]


class ListSink:
    """A user sink with no pickling contract: it must stay in the training process."""

    def __init__(self) -> None:
        self.stats = SinkStats()
        self.steps: list[int] = []

    def write(self, step, scalars, hists=None) -> None:
        self.steps.append(step)
        self.stats.written += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _train(host: str, out: Path, steps: int = 5, **kw) -> tuple[Probe, MemorySink, JsonlSink, ListSink]:
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = batch(model, 2)
    mem, js, mine = MemorySink(), JsonlSink(out / f"{host}.jsonl"), ListSink()
    with Probe(model, every=1, sinks=[mem, js, mine], host=host, **kw) as probe:
        assert probe.host == host
        for step in range(steps):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            probe.step(step, scalars={"loss": loss.detach(), "lr": 1e-3})
        probe.log(steps - 1, {"val_loss": 2.5})
    return probe, mem, js, mine


def test_process_mode_writes_what_the_thread_writes(tmp_path):
    _, mem_t, js_t, mine_t = _train("thread", tmp_path)
    probe, mem_p, js_p, mine_p = _train("process", tmp_path)
    assert [type(s).__name__ for s in probe.sink.sinks] == ["MemorySink", "ListSink"]  # JSONL moved
    assert [r.step for r in mem_p.records] == [0, 1, 2, 3, 4, 4]
    assert [r.scalars for r in mem_p.records] == [r.scalars for r in mem_t.records]
    assert [r.hists for r in mem_p.records] == [r.hists for r in mem_t.records]
    assert mem_p.records[-1].scalars == {"val_loss": 2.5}
    assert mine_p.steps == mine_t.steps == [0, 1, 2, 3, 4, 4]
    lines_t = (tmp_path / "thread.jsonl").read_text().splitlines()
    lines_p = (tmp_path / "process.jsonl").read_text().splitlines()
    assert lines_p == lines_t and len(lines_p) == 6
    assert json.loads(lines_p[0])["beta_mean/attn/L00"] > 0
    # the moved sink's copy here learnt what the child's did
    assert (js_p.stats.written, js_p.stats.dropped, js_p.stats.errors) == (6, 0, 0)
    assert probe.stats.errors == 0 and probe.stats.log_steps == 5


@pytest.mark.parametrize("host", ["thread", "process"])
def test_alerts_and_stop_come_back_to_the_training_process(host):
    model = tiny()
    FAULTS["beta_collapse"](_site(model, "attn", 1))
    x = batch(model, 2)
    seen = []
    with Probe(model, every=1, sinks=[MemorySink()], host=host,
               on_alert=[lambda t: seen.append((t.rule, t.site, t.layer, t.state.value)), stop_on("beta_collapse")]
               ) as probe, torch.no_grad():
        step = 0
        while not probe.stop_requested and step < 20:
            model(x, x)
            probe.step(step)
            step += 1
    # pending at the first bad log step, firing at the for_evals-th, applied one log step later
    assert seen == [("beta_collapse", "attn", 1, "pending"), ("beta_collapse", "attn", 1, "firing")]
    assert probe.verdict == "warning" and step == probe.thresholds.for_evals + 1  # a warning-severity rule


def test_a_killed_worker_hands_over_to_the_host_thread(tmp_path, caplog):
    model = tiny()
    x = batch(model, 2)
    mem, js = MemorySink(), JsonlSink(tmp_path / "s.jsonl")
    with caplog.at_level(logging.WARNING, "deltascope.probes"), Probe(
        model, every=1, sinks=[mem, js], host="process"
    ) as probe, torch.no_grad():
        for step in range(3):
            model(x, x)
            probe.step(step)
        probe.flush()
        worker = probe._worker
        assert worker is not None
        worker.proc.kill()
        worker.proc.wait()
        for step in range(3, 6):
            model(x, x)
            probe.step(step)
        assert probe.host == "thread"
    assert "worker process is lost" in caplog.text
    assert [r.step for r in mem.records] == list(range(6))
    steps = [json.loads(line)["step"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # the child wrote 0-2; this process's copy appended 3-5
    assert js.stats.written == 6  # its own three, plus the child's three, reported at the flush
    assert probe.stats.errors == 0


def test_the_child_writes_out_what_it_received_when_training_dies(tmp_path):
    """SIGKILL of the training process: the child reads end-of-file and closes its sinks."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from probes import JsonlSink, Probe
        from tests.probes.conftest import batch, tiny
        model = tiny()
        x = batch(model, 2)
        probe = Probe(model, every=1, sinks=[JsonlSink({str(tmp_path / "s.jsonl")!r})], host="process")
        with torch.no_grad():
            for step in range(6):
                model(x, x)
                probe.step(step)  # step s applies log step s - 1: the child has answered it
        print(probe._worker.proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr
    child = int(r.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    steps = [json.loads(line)["step"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert steps[:5] == [0, 1, 2, 3, 4]  # every step the child answered; 5 only if it arrived in time
    assert steps in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_bad_host_is_refused_before_anything_is_attached():
    model = tiny()
    with pytest.raises(ValueError, match="host must be one of auto, thread, process"):
        Probe(model, host="gpu")
    assert all(not m._forward_hooks for m in model.modules())


def test_a_used_sink_stays_in_the_training_process(tmp_path):
    js = JsonlSink(tmp_path / "s.jsonl")
    js.write(0, {"x": 1.0})
    js.flush()
    model = tiny()
    with Probe(model, every=1, sinks=[js], host="process") as probe, torch.no_grad():
        assert probe.sink.sinks == [js]  # it has a file open: it cannot move
        model(batch(model, 2), batch(model, 2))
        probe.step(0)
    assert [json.loads(line)["step"] for line in (tmp_path / "s.jsonl").read_text().splitlines()] == [0, 0]
