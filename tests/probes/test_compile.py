"""Hooks registered before torch.compile trace with zero graph breaks and give eager's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from probes import MemorySink, Probe
from tests.probes.conftest import assert_stats_close, batch, tiny


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = tiny(n_layer=1, block_size=16)
    twin = copy.deepcopy(eager)
    se, sc = MemorySink(), MemorySink()
    with Probe(eager, every=2, sinks=[se]) as pe, Probe(twin, every=2, sinks=[sc]) as pc:
        compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")  # a break raises
        for step in range(4):  # log, non-log, log, non-log: both graph variants, twice
            x = batch(eager, 2, T=16, seed=step)
            eager(x, x)[1].backward()
            compiled(x, x)[1].backward()
            pe.step(step)
            pc.step(step)
    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert [r.step for r in sc.records] == [r.step for r in se.records] == [0, 2]
    for a, b in zip(sc.records, se.records, strict=True):
        assert_stats_close(a.scalars, b.scalars, rtol=1e-5, atol=1e-6)
        assert {k: h.counts for k, h in a.hists.items()} == {k: h.counts for k, h in b.hists.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fold", [False, True], ids=["fused", "fused-fold"])
def test_compiled_fused_model_under_a_probe_matches_the_unfused_eager_one(monkeypatch, fold):
    """A fused_delta d_v=4 model keeps its op (and the fold) compiled with a probe: one graph per mode,
    the unfused eager model's statistics."""
    from ddl import fused

    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", fold)
    torch._dynamo.reset()
    eager = tiny(n_layer=1, block_size=16, d_v=4)
    twin = tiny(n_layer=1, block_size=16, d_v=4, fused_delta=True)
    twin.load_state_dict(eager.state_dict())
    se, sc = MemorySink(), MemorySink()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    with Probe(eager, every=2, sinks=[se]) as pe, Probe(twin, every=2, sinks=[sc]) as pc:
        compiled = torch.compile(twin, fullgraph=True, backend=counter)  # a break raises
        for step in range(4):
            x = batch(eager, 2, T=16, seed=step)
            eager(x, x)[1].backward()
            compiled(x, x)[1].backward()
            pe.step(step)
            pc.step(step)
    op = "deltascope.delta_update_read" if fold else "deltascope.delta_update"
    assert counter.frame_count == 2  # the log-step graph and the idle one
    for gm in counter.graphs:
        assert sum(str(n.target) in (op, f"{op}.default") for n in gm.graph.nodes) == 2
    assert [r.step for r in sc.records] == [r.step for r in se.records] == [0, 2]
    for a, b in zip(sc.records, se.records, strict=True):
        assert_stats_close(a.scalars, b.scalars, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
def test_inductor_cuda_fullgraph_matches_eager():
    """The hooks lower through inductor on CUDA (Triton kernels) with no graph break."""
    torch._dynamo.reset()
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = tiny(n_layer=1, block_size=16).cuda()
    twin = copy.deepcopy(eager)
    se, sc = MemorySink(), MemorySink()
    with Probe(eager, every=2, sinks=[se]) as pe, Probe(twin, every=2, sinks=[sc]) as pc:
        compiled = torch.compile(twin, fullgraph=True)
        for step in range(4):
            x = batch(eager, 2, T=16, seed=step).cuda()
            eager(x, x)[1].backward()
            compiled(x, x)[1].backward()
            pe.step(step)
            pc.step(step)
    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert [r.step for r in sc.records] == [0, 2]
    for a, b in zip(sc.records, se.records, strict=True):
        assert_stats_close(a.scalars, b.scalars, skip=("k_unit_err",), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("defer,fn", [(True, "stacked_block"), (False, "site_block")])
def test_fused_statistics_match_plain(monkeypatch, defer, fn):
    """The compiled copies of the statistics (on by default on CUDA: one call per forward for
    all sites, or one per site) give the plain numbers; on CPU they are compiled with aot_eager
    here, inductor being too slow on two cores."""
    import probes._hooks

    monkeypatch.setattr(probes._hooks, "FUSE_BACKEND", "aot_eager")
    monkeypatch.setattr(probes._hooks, "DEFER", defer)
    torch._dynamo.reset()
    plain = tiny(d_v=4)
    fused = copy.deepcopy(plain)
    sp, sf = MemorySink(), MemorySink()
    with Probe(plain, sinks=[sp], fuse=False) as pp, Probe(fused, sinks=[sf], fuse=True) as pf:
        for step in range(2):
            x = batch(plain, 2, seed=step)
            plain(x, x)[1].backward()
            fused(x, x)[1].backward()
            pp.step(step)
            pf.step(step)
        assert pf._sh.fuse and set(pf._sh._fused) == {fn}
    for a, b in zip(sf.records, sp.records, strict=True):
        assert_stats_close(a.scalars, b.scalars, rtol=1e-5, atol=1e-6)
        assert {k: h.counts for k, h in a.hists.items()} == {k: h.counts for k, h in b.hists.items()}


def test_attaching_widens_inductor_pointwise_cat_to_the_site_count(monkeypatch):
    """The stacked statistics concatenate one row per site; above inductor's limit each input
    became its own copy kernel (+147 launches per compiled step of the small model)."""
    from torch._inductor import config

    monkeypatch.setattr(config, "max_pointwise_cat_inputs", 2)
    model = tiny(n_layer=3)
    with Probe(model, sinks=[MemorySink()], host="thread"):
        assert config.max_pointwise_cat_inputs == 6  # 3 layers x (attn, mlp)
    monkeypatch.setattr(config, "max_pointwise_cat_inputs", 64)
    with Probe(model, sinks=[MemorySink()], host="thread"):
        assert config.max_pointwise_cat_inputs == 64  # never narrowed
