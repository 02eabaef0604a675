"""The Probe's API: discovery, the log-step schedule, hooks removed on exit, scalars, variants."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from probes import JsonlSink, MemorySink, Probe, TensorBoardSink
from probes._finish import hist_quantile
from tests.probes.conftest import assert_stats_close, batch, tiny


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_sites_in_forward_order_and_by_name():
    model = tiny()
    with Probe(model) as p:
        assert p.sites == [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    named = {"attn/0": "blocks.0.attn_delta", "mlp/L01": "blocks.1.mlp_delta"}
    with Probe(model, modules=named) as p:
        assert p.sites == [("attn", 0), ("mlp", 1)]
    with pytest.raises(ValueError, match="site name"):
        Probe(model, modules={"attention/0": "blocks.0.attn_delta"})
    with pytest.raises(ValueError, match="hook-contract"):
        Probe(model, modules={"attn/0": "blocks.0.attn"})


@pytest.mark.parametrize("kw, field", [({"every": 0}, "every"), ({"token_stride": 0}, "token_stride")])
def test_bad_settings_are_refused_before_any_hook(kw, field):
    model = tiny()
    before = _hook_count(model)
    with pytest.raises(ValueError, match=field):
        Probe(model, **kw)
    assert _hook_count(model) == before


def test_exit_removes_every_hook():
    model = tiny()
    before = _hook_count(model)
    with Probe(model, sinks=[MemorySink()]):
        assert _hook_count(model) == before + 4 * 4  # residual, logit, k_dir, write
    assert _hook_count(model) == before


def test_two_probes_on_one_model_share_its_hooks():
    """A second probe on the same residuals adds no hooks; each gets the full statistics, with its
    own schedule, and closing one leaves the other measuring."""
    model = tiny()
    x = batch(model, 2)
    a, b = MemorySink(), MemorySink()
    pa = Probe(model, sinks=[a])
    with Probe(model, every=2, sinks=[b]) as pb, torch.no_grad():
        assert _hook_count(model) == 4 * 4
        for step in range(3):
            model(x, x)
            pa.step(step)
            pb.step(step)
        pa.close()
        assert _hook_count(model) == 4 * 4
        model(x, x)
        pb.step(3)
        model(x, x)
        pb.step(4)
    assert _hook_count(model) == 0
    assert [r.step for r in a.records] == [0, 1, 2] and [r.step for r in b.records] == [0, 2, 4]
    assert a.records[0].scalars == b.records[0].scalars and a.records[2].scalars == b.records[1].scalars
    assert b.records[2].scalars["beta_mean/mlp/L01"] == b.records[1].scalars["beta_mean/mlp/L01"]


def test_a_deep_copy_of_the_model_stays_out_of_the_statistics():
    """An EMA or evaluation copy made with deepcopy carries the hooks along; its forward at a log
    step must not write into the probe of the model it was copied from."""
    model = tiny()
    x = batch(model, 2)
    alone, with_copy = MemorySink(), MemorySink()
    with Probe(model, sinks=[alone]) as probe, torch.no_grad():
        model(x, x)
        probe.step(0)
    with Probe(model, sinks=[with_copy]) as probe, torch.no_grad():
        ema = copy.deepcopy(model)
        model(x, x)
        ema(x[:1].flip(1), x[:1])
        probe.step(0)
    assert with_copy.last().scalars == alone.last().scalars
    assert {k: list(h.counts) for k, h in with_copy.last().hists.items()} == {
        k: list(h.counts) for k, h in alone.last().hists.items()}


def test_log_steps_and_idle_hooks():
    """Log steps are the first and then every ``every``-th; between them the buffer is untouched."""
    model = tiny()
    x = batch(model, 2)
    sink = MemorySink()
    with Probe(model, every=3, sinks=[sink]) as probe, torch.no_grad():
        for step in range(7):
            model(x, x)
            if step % 3 != 0:
                assert probe._sh.buf[: probe._sh.layout.sum_end].abs().sum() == 0
            probe.step(step)
    assert [r.step for r in sink.records] == [0, 3, 6]
    assert probe.stats.log_steps == 3 and probe.stats.dropped == 0


def test_device_scalars_travel_in_the_buffer():
    """0-dim tensors are packed into the device buffer (growing it past its 8 slots), floats not."""
    model = tiny()
    x = batch(model, 2)
    sink = MemorySink()
    with Probe(model, sinks=[sink]) as probe, torch.no_grad():
        model(x, x)
        sc = {f"s{i}": torch.tensor(float(i)) for i in range(11)} | {"lr": 0.5}
        probe.step(0, scalars=sc)
        model(x, x)
        probe.step(1, scalars={"loss": torch.tensor(2.5)})
    assert {k: sink.records[0].scalars[k] for k in sc} == {f"s{i}": float(i) for i in range(11)} | {"lr": 0.5}
    assert sink.records[1].scalars["loss"] == 2.5 and "s3" not in sink.records[1].scalars
    assert "beta_mean/mlp/L01" in sink.records[1].scalars


@pytest.mark.parametrize("d_v", [1, 4])
def test_the_statistics_see_what_a_user_hook_makes_of_k_and_delta(d_v):
    """With only the probe's observers on k_dir and write, the statistics make k from h and delta from v, p and
    beta by the modules' formulas; a user's hook on them is seen as it is: an identity hook gives the same numbers,
    one that doubles k and triples delta gives ||k|| = 2 and three times the update ratio."""
    def run(k_hook, d_hook):
        model = tiny(d_v=d_v)
        for m in model.delta_residuals():
            if k_hook:
                m.k_dir.register_forward_hook(lambda mod, a, k: k_hook * k)
            if d_hook:
                m.write.register_forward_hook(lambda mod, a, d: d_hook * d)
        x, sink = batch(model, 2), MemorySink()
        with Probe(model, sinks=[sink]) as probe, torch.no_grad():
            model(x, x)
            made = [e is not None for e in probe._sh.eps]  # k made from h at these sites
            probe.step(0)
        assert made == [not k_hook] * len(made)
        return sink.records[0].scalars

    plain, same = run(None, None), run(1, 1)
    assert_stats_close(same, plain, rtol=1e-6, atol=1e-7)
    assert plain["k_unit_err/attn/L00"] < 1e-5
    assert run(2, None)["k_unit_err/attn/L00"] == pytest.approx(1.0, abs=1e-5)
    # the first site's update: its X is the embedding whatever the hooks do downstream
    assert run(None, 3)["update_ratio/attn/L00"] == pytest.approx(3 * plain["update_ratio/attn/L00"], rel=1e-5)


def test_fixed_beta_and_beta_range():
    model = tiny(beta_fixed=0.5, beta_max=1.0)
    x = batch(model, 2)
    sink = MemorySink()
    with Probe(model, sinks=[sink]) as probe, torch.no_grad():
        assert probe.beta_max == 1.0
        model(x, x)
        probe.step(0)
    s = sink.last().scalars
    assert "gate_logit_sat/attn/L00" not in s  # no logit when beta is fixed
    assert s["beta_mean/attn/L00"] == pytest.approx(0.5) and s["beta_std/attn/L00"] == pytest.approx(0)
    h = sink.last().hists["beta_hist/attn/L00"]
    assert (h.lo, h.hi) == (0.0, 1.0) and h.counts[32] == 2 * 32


def test_additive_model_logs_scalars_only(caplog):
    model = tiny(residual="additive")
    sink = MemorySink()
    with caplog.at_level(logging.WARNING, "deltascope.probes"), Probe(model, sinks=[sink]) as probe:
        probe.step(0, scalars={"loss": 1.0})
    assert probe.sites == [] and sink.last().scalars == {"loss": 1.0}
    assert "no delta residuals" in caplog.text


def test_probe_into_jsonl_and_tensorboard(tmp_path):
    model = tiny()
    x = batch(model, 2)
    with Probe(model, every=2, sinks=[JsonlSink(tmp_path / "stats.jsonl"), TensorBoardSink(tmp_path)]
               ) as probe, torch.no_grad():
        for step in range(4):
            model(x, x)
            probe.step(step, scalars={"loss": 1.0})
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"step":2' in lines[1] and '"beta_hist/attn/L00":[' in lines[0]
    assert probe.sink.stats.errors == 0


@pytest.mark.parametrize(
    ("counts", "q", "want"),
    [([0, 4, 0, 0], 0.5, 1.5), ([0, 4, 0, 0], 0.0, 1.0), ([0, 4, 0, 0], 1.0, 2.0),
     ([1, 1, 1, 1], 0.5, 2.0), ([0, 0, 0, 0], 0.5, float("nan"))],
)
def test_hist_quantile(counts, q, want):
    got = hist_quantile(np.array(counts, dtype=float), 0.0, 4.0, q)
    assert got == pytest.approx(want, nan_ok=True)


@pytest.mark.parametrize(("over", "fold"), [({}, False), ({"d_v": 4}, False), ({"d_v": 4}, True)],
                         ids=["dv1", "dv4", "dv4-fold"])
def test_a_fused_model_keeps_its_kernel_under_a_probe(monkeypatch, over, fold):
    """The probe's hooks are observers: a ``fused_delta`` model keeps its fused update (and the fold)
    with a probe attached, and the probe reports what it reports on the unfused twin."""
    from ddl import fused
    from tests.ddl.test_fused import OpCalls

    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", fold)
    plain, twin = tiny(**over), tiny(**over, fused_delta=True)
    twin.load_state_dict(plain.state_dict())
    x = batch(plain, 2)
    got, want = MemorySink(), MemorySink()
    for model, sink in ((plain, want), (twin, got)):
        with Probe(model, sinks=[sink]) as probe, torch.no_grad(), OpCalls() as calls:
            for step in range(2):
                model(x, x)
                probe.step(step)
        n_sites = len(probe.sites)
        assert calls.n == (0 if model is plain else 2 * n_sites)
        assert calls.folded == (2 * n_sites if model is twin and fold else 0)
    for a, b in zip(got.records, want.records, strict=True):
        assert a.step == b.step and set(a.scalars) == set(b.scalars)
        for key, value in b.scalars.items():
            assert a.scalars[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        assert set(a.hists) == set(b.hists)
        for key, h in b.hists.items():
            assert sum(a.hists[key].counts) == sum(h.counts), key
