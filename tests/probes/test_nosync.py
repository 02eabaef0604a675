"""No host sync in the hooks or between log steps: reading a tensor's value on the host raises."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from probes import MemorySink, Probe
from tests.probes.conftest import batch, tiny

HOST_READS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


@contextmanager
def forbid_host_reads() -> Iterator[None]:
    """Every way Python code reads a tensor's value raises while inside; restored after."""
    saved = {n: torch.Tensor.__dict__.get(n) for n in HOST_READS}

    def boom(name: str):
        def f(self, *a, **k):
            raise AssertionError(f"host read: Tensor.{name}")

        return f

    for n in HOST_READS:
        setattr(torch.Tensor, n, boom(n))
    try:
        yield
    finally:
        for n, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, orig)


def test_forbid_host_reads_restores():
    t = torch.ones(())
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        t.item()
    assert t.item() == 1.0 and bool(t)


@pytest.mark.parametrize("over", [{}, {"d_v": 4}])
def test_hooks_and_step_never_read_tensors_on_the_host(over):
    model = tiny(**over)
    x = batch(model, 2)
    sink = MemorySink()
    with Probe(model, every=2, sinks=[sink], probe_batch=x[:1], probe_every=2) as probe:
        for step in range(4):  # log, non-log, log, non-log
            with forbid_host_reads():
                _, loss = model(x, x)
                loss.backward()
                probe.step(step, scalars={"loss": loss.detach(), "lr": 0.1})
    assert [r.step for r in sink.records] == [0, 2]
    assert "k_cos_probe/mlp/L01" in sink.records[1].scalars
    assert probe.stats.errors == 0


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_between_log_steps():
    """Steps run under sync-debug mode "error": any synchronising CUDA call raises, on the
    non-log steps and on the log steps too (whose only wait is on the host thread)."""
    model = tiny().cuda()
    x = batch(model, 4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    with Probe(model, every=3, sinks=[sink]) as probe:
        for step in range(2):  # warm-up: allocations, pinned buffers, cuBLAS handles
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            probe.step(step, scalars={"loss": loss.detach()})
        torch.cuda.synchronize()
        try:
            with warnings.catch_warnings():  # "a prototype feature" UserWarning
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("error")
            for step in range(2, 9):
                _, loss = model(x, x)
                loss.backward()
                opt.step()
                opt.zero_grad()
                probe.step(step, scalars={"loss": loss.detach()})
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert [r.step for r in sink.records] == [0, 3, 6]
    assert probe._sh.fuse is None and probe._sh._fused, "an eager CUDA model uses fused statistics"
    if importlib.util.find_spec("triton") is not None:  # the Triton reductions ran, and did not fall back
        assert probe._sh.kernels and set(probe._sh._fused) == {"stacked_finish"}
    assert "loss" in sink.records[-1].scalars and "beta_mean/mlp/L01" in sink.records[-1].scalars
