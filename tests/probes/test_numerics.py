"""Every statistic against a naive float64 recomputation from the captured tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from probes import MemorySink, Probe
from tests.probes.conftest import Capture, assert_stats_close, batch, naive_stats, tiny

VARIANTS = [
    pytest.param({}, id="dv1"),
    pytest.param({"d_v": 4, "compressor": "cc"}, id="dv4-cc"),
    pytest.param({"d_v": 4, "compressor": "tc"}, id="dv4-tc"),
]


def _hists_equal(got, want) -> None:
    assert set(got) >= set(want)
    for k, w in want.items():
        np.testing.assert_array_equal(np.array(got[k].counts), w, err_msg=k)


@pytest.mark.parametrize("stride", [1, 3, 8], ids=lambda s: f"stride{s}")
@pytest.mark.parametrize("over", VARIANTS)
def test_stats_equal_naive_float64(over, stride):
    """Two log steps of training on the tiny model: every key equals its definition, including
    the drift, the step-to-step and the probe-batch cosines (which need the previous step); at
    every token (stride 1), and at sampled positions (3 leaves a ragged end: T = 32)."""
    model = tiny(**over)
    twin = copy.deepcopy(model)  # captures on an identical model, so the probe sees no extra hooks
    cap = Capture(twin)
    pb = batch(model, 2, seed=99)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    topt = torch.optim.SGD(twin.parameters(), lr=0.3)
    sink = MemorySink()
    expected, dirs, first_h, probe_k = [], None, {}, None
    with Probe(model, every=1, sinks=[sink], probe_batch=pb, probe_every=1, token_stride=stride) as probe:
        for step in range(2):
            x = batch(model, 3, seed=step)
            for net, o in ((model, opt), (twin, topt)):
                _, loss = net(x, x)
                loss.backward()
                o.step()
                o.zero_grad()
            fw = cap.take()
            with torch.no_grad():
                twin(pb)
            pf = cap.take()[0]
            k_now = [pf[i]["hk"][1] for i in range(len(probe.sites))]
            want, hists, new_dirs = naive_stats(
                fw, probe.sites, model.cfg.beta_max, prev_dir=dirs, first_h=first_h,
                probe_k=(probe_k, k_now) if probe_k is not None else None, stride=stride,
            )
            expected.append((want, hists))
            dirs, probe_k = new_dirs, k_now
            probe.step(step, scalars={"loss": loss.detach(), "lr": 0.3})
    assert [r.step for r in sink.records] == [0, 1]
    for rec, (want, hists) in zip(sink.records, expected, strict=True):
        assert_stats_close(rec.scalars, want)
        _hists_equal(rec.hists, hists)
    assert "k_cos_step/attn/L00" not in sink.records[0].scalars  # no previous step yet
    assert "k_cos_layer/attn/L00" not in sink.records[0].scalars  # first site in forward order
    assert sink.records[1].scalars["loss"] == pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("over", [VARIANTS[0], VARIANTS[1]])
def test_micro_batches_merge_into_one_step(over):
    """Two micro-batches accumulate into one log step: equal to the definitions over both, and
    to the probe's statistics of one batch holding both."""
    a, b = tiny(**over), tiny(**over)
    twin = copy.deepcopy(a)
    cap = Capture(twin)
    x = batch(a, 4)
    sa, sb = MemorySink(), MemorySink()
    with Probe(a, sinks=[sa]) as pa, Probe(b, sinks=[sb]) as pb:
        for half in (x[:2], x[2:]):
            a(half, half)[1].backward()
            twin(half, half)
        b(x, x)[1].backward()
        pa.step(0)
        pb.step(0)
    want, hists, _ = naive_stats(cap.take(), pa.sites, a.cfg.beta_max, first_h={}, stride=pa.token_stride)
    assert_stats_close(sa.last().scalars, want)
    _hists_equal(sa.last().hists, hists)
    # against one big batch: all but k_abs_concentration, whose m is per forward pass; a token
    # may land in the next bin when batch size changes the matmul's rounding
    assert_stats_close(sa.last().scalars, sb.last().scalars, skip=("k_abs_concentration",),
                       rtol=1e-4, atol=1e-5)
    for k, h in sb.last().hists.items():
        assert sum(sa.last().hists[k].counts) == sum(h.counts)
        assert np.abs(np.array(sa.last().hists[k].counts) - np.array(h.counts)).sum() <= 2, k


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("over", [VARIANTS[0], VARIANTS[1]])
def test_cuda_statistics_equal_cpu(over):
    """The CUDA path (pinned copy, event, host thread) gives the CPU path's numbers."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = tiny(**over)
    gpu = copy.deepcopy(cpu).cuda()
    x = batch(cpu, 4)
    sinks = {}
    for name, net in (("cpu", cpu), ("cuda", gpu)):
        sinks[name] = MemorySink()
        xs = x.to(next(net.parameters()).device)
        with Probe(net, sinks=[sinks[name]], probe_batch=xs[:1], probe_every=1) as probe:
            for step in range(2):
                _, loss = net(xs, xs)
                loss.backward()
                probe.step(step, scalars={"loss": loss.detach()})
    for a, b in zip(sinks["cuda"].records, sinks["cpu"].records, strict=True):
        assert_stats_close(a.scalars, b.scalars, skip=("k_unit_err",), rtol=1e-3, atol=1e-5)
        assert a.scalars["loss"] == pytest.approx(b.scalars["loss"], rel=1e-4)
        for k, h in b.hists.items():
            assert np.abs(np.array(a.hists[k].counts) - np.array(h.counts)).sum() <= 4, k
