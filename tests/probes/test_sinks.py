"""The shared sink contract, run against every sink with real files and stores read back:
round trip, a failing member of a fan-out, a full queue, close twice, write after close."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from probes.sink import Histogram, Sink, SinkStats
from probes.sinks import FanoutSink, JsonlSink, MemorySink, MLflowSink, TensorBoardSink
from probes.sinks._base import ThreadedSink
from probes.sinks.tensorboard import custom_scalars_layout
from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE, key
from tests.server.live import wait_for

# MLflow's sqlite store trips SQLAlchemy 2.1's deprecation of ``noload`` on its writer thread;
# warnings are errors here and a failed mapper set-up stays failed for the whole process.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")

STEPS = (0, 5, 10)
SITES = [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]


def _scalars(step: int) -> dict[str, float]:
    out = {"loss": 3.0 - 0.1 * step, "lr": 1e-3}
    for i, (site, layer) in enumerate(SITES):
        out[key("beta_mean", site, layer)] = 0.5 + 0.01 * step + 0.1 * i
        out[key("beta_p10", site, layer)] = 0.25 + 0.1 * i
        out[key("h_norm_drift", site, layer)] = 1.0 + 0.01 * step
    return out


def _hists(step: int) -> dict[str, Histogram]:
    beta = [0.0] * BETA_BINS
    beta[10 + step % 3], beta[40] = 7.0, 3.0
    hn = [0.0] * H_NORM_BINS
    hn[30] = 10.0
    return {key("beta_hist", "attn", 0): Histogram(0.0, 2.0, tuple(beta)),
            key("h_norm_hist", "mlp", 1): Histogram(*H_NORM_LOG10_RANGE, tuple(hn))}


# -- readers: (scalars by step, hist counts by step) as the store holds them ----------------------
Read = tuple[dict[int, dict[str, float]], dict[int, dict[str, list[float]]]]


def _read_memory(sink: MemorySink, tmp: Path) -> Read:
    return ({r.step: r.scalars for r in sink.records},
            {r.step: {k: list(h.counts) for k, h in r.hists.items()} for r in sink.records})


def _read_jsonl(sink: JsonlSink, tmp: Path) -> Read:
    scalars: dict[int, dict[str, float]] = {}
    hists: dict[int, dict[str, list[float]]] = {}
    for line in sink.path.read_text().splitlines():
        obj = json.loads(line)
        step = obj.pop("step")
        scalars[step] = {k: v for k, v in obj.items() if not isinstance(v, list)}
        hists[step] = {k: v for k, v in obj.items() if isinstance(v, list)}
    return scalars, hists


def _read_tensorboard(sink: TensorBoardSink, tmp: Path) -> Read:
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )
    from tensorboard.plugins.custom_scalar import layout_pb2

    ea = EventAccumulator(sink.logdir, size_guidance={SCALARS: 0, HISTOGRAMS: 0, TENSORS: 0})
    ea.Reload()
    scalars: dict[int, dict[str, float]] = {}
    for tag in ea.Tags()["scalars"]:
        for ev in ea.Scalars(tag):
            scalars.setdefault(ev.step, {})[tag] = ev.value
    hists: dict[int, dict[str, list[float]]] = {}
    for tag in ea.Tags()["histograms"]:
        lo, hi, n = (0.0, 2.0, BETA_BINS) if tag.startswith("beta") else (*H_NORM_LOG10_RANGE, H_NORM_BINS)
        for ev in ea.Histograms(tag):
            hv = ev.histogram_value
            counts = [0.0] * n
            first = round((hv.bucket_limit[0] - lo) / ((hi - lo) / n))
            for j, c in enumerate(hv.bucket[1:]):
                counts[first + j] = c
            assert hv.num == sum(counts)
            hists.setdefault(ev.step, {})[tag] = counts
    layout = layout_pb2.Layout.FromString(
        ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    titles = {c.title for cat in layout.category for c in cat.chart}
    assert "beta p10/p50/p90 attn L00" in titles and "h_norm_drift mlp" in titles
    margin = next(c for cat in layout.category for c in cat.chart if c.title == "beta p10/p50/p90 mlp L01")
    assert [s.value for s in margin.margin.series] == ["beta_p50/mlp/L01"]
    assert margin.margin.series[0].lower == "beta_p10/mlp/L01"
    return scalars, hists


def _read_mlflow(sink: MLflowSink, tmp: Path) -> Read:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=sink.tracking_uri)
    run = c.get_run(sink.run_id)
    assert run.data.params == {"preset": "tiny", "d_v": "1"}
    assert run.data.tags["purpose"] == "contract"
    assert run.info.status == "FINISHED"
    scalars: dict[int, dict[str, float]] = {}
    for k in run.data.metrics:
        for m in c.get_metric_history(sink.run_id, k):
            scalars.setdefault(m.step, {})[k] = m.value
    return scalars, {}  # MLflow has no histograms


SINKS: dict[str, tuple[Callable[..., Any], Callable[[Any, Path], Read]]] = {
    "memory": (lambda tmp, **kw: MemorySink(), _read_memory),
    "jsonl": (lambda tmp, **kw: JsonlSink(tmp / "out" / "stats.jsonl", **kw), _read_jsonl),
    "tensorboard": (lambda tmp, **kw: TensorBoardSink(tmp / "tb", **kw), _read_tensorboard),
    # one sqlite store for the module (its schema migration costs seconds); a run per sink
    "mlflow": (lambda tmp, **kw: MLflowSink(_MLFLOW_URI[0], run_name="contract",
                                            params={"preset": "tiny", "d_v": 1},
                                            tags={"purpose": "contract"}, **kw),
               _read_mlflow),
}
_MLFLOW_URI: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _mlflow_store(tmp_path_factory):
    _MLFLOW_URI[:] = [f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"]


@pytest.fixture(params=list(SINKS))
def kind(request) -> str:
    return request.param


def test_round_trip(kind, tmp_path):
    make, read = SINKS[kind]
    sink = make(tmp_path)
    assert isinstance(sink, Sink)
    for s in STEPS:
        sink.write(s, _scalars(s), _hists(s))
    sink.flush()
    sink.close()
    assert sink.stats.written == len(STEPS) and sink.stats.errors == 0 and sink.stats.dropped == 0
    scalars, hists = read(sink, tmp_path)
    assert sorted(scalars) == list(STEPS)
    for s in STEPS:
        want = _scalars(s)
        assert set(scalars[s]) == set(want)
        for k, v in want.items():
            assert math.isclose(scalars[s][k], v, rel_tol=1e-6), (k, scalars[s][k], v)
        if kind != "mlflow":
            assert hists[s] == {k: list(h.counts) for k, h in _hists(s).items()}


def test_close_is_idempotent_and_write_after_close_is_dropped(kind, tmp_path):
    sink = SINKS[kind][0](tmp_path)
    sink.write(0, _scalars(0))
    sink.close()
    sink.close()
    sink.write(1, _scalars(1), _hists(1))  # never raises
    sink.flush()
    assert sink.stats.written == 1 and sink.stats.dropped == 1


class Broken:
    """A sink whose every call raises."""

    def __init__(self) -> None:
        self.stats = SinkStats()

    def write(self, step, scalars, hists=None):
        raise OSError("disk on fire")

    def flush(self):
        raise OSError("disk on fire")

    def close(self):
        raise OSError("disk on fire")


def test_failing_member_does_not_stop_the_others(kind, tmp_path, caplog):
    make, read = SINKS[kind]
    sink = make(tmp_path)
    fan = FanoutSink([Broken(), sink])
    with caplog.at_level(logging.WARNING, "deltascope.sinks"):
        for s in STEPS:
            fan.write(s, _scalars(s), _hists(s))
        fan.flush()
        fan.close()
        fan.close()
    assert fan.stats.errors == len(STEPS) + 2  # writes, flush, close (the second close is a no-op)
    assert sorted(read(sink, tmp_path)[0]) == list(STEPS)
    warned = [r for r in caplog.records if "Broken.write" in r.getMessage()]
    assert len(warned) == 1  # one warning per fault kind, not one per step


THREADED = [k for k in SINKS if k != "memory"]


@pytest.mark.parametrize("kind", THREADED)
def test_full_queue_drops_and_counts_without_blocking(kind, tmp_path, monkeypatch):
    gate = threading.Event()
    sink: ThreadedSink = SINKS[kind][0](tmp_path, queue_size=2)
    real = sink._write
    monkeypatch.setattr(sink, "_write", lambda *a: (gate.wait(10), real(*a)))
    for s in range(20):  # the writer is held: a blocking write() would never drop, and deadlock here
        sink.write(s, _scalars(0))
    gate.set()
    sink.close()
    assert sink.stats.dropped >= 20 - 3 and sink.stats.written == 20 - sink.stats.dropped


def test_layout_is_generated_from_the_catalogue():
    lay = custom_scalars_layout([("mlp", 1), ("attn", 1)])
    assert lay["deltascope beta"]["beta p10/p50/p90 attn L01"] == [
        "Margin", ["beta_p50/attn/L01", "beta_p10/attn/L01", "beta_p90/attn/L01"]]
    assert lay["deltascope occupancy"]["regime occupancy mlp L01"][1] == [
        "occ_identity/mlp/L01", "occ_projection/mlp/L01", "occ_reflection/mlp/L01", "occ_negative/mlp/L01"]
    assert lay["deltascope k drift"]["h_norm_drift attn"] == ["Multiline", ["h_norm_drift/attn/L01"]]


def test_mlflow_accepts_canonical_keys():
    from mlflow.utils.validation import _validate_metric_name

    from probes.sinks.mlflow import mlflow_key

    _validate_metric_name("beta_mean/attn/L03")  # slashes are allowed: keys stay canonical
    assert mlflow_key("beta_mean/attn/L03") == "beta_mean/attn/L03"
    assert mlflow_key("loss[train]") == "loss_train_"
    _validate_metric_name(mlflow_key("a|b?c"))


def test_jsonl_lines_are_on_disk_once_acknowledged(tmp_path):
    """Crash safety: every line counted as written can be read back without flush or close."""
    sink = JsonlSink(tmp_path / "s.jsonl")
    for s in STEPS:
        sink.write(s, _scalars(s) | {"bad": float("nan")}, _hists(s))
    assert wait_for(lambda: sink.stats.written == len(STEPS))
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == len(STEPS)
    assert json.loads(lines[0])["bad"] is None  # strict JSON: non-finite values are null
    sink.close()
