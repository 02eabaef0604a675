"""DDP: two gloo ranks on CPU, each with half of the global batch, merge their partials into the
statistics of one process over the whole batch, and every rank sees the same numbers."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from probes import MemorySink, Probe
from tests.probes.conftest import assert_stats_close, batch, tiny

STEPS = 3


def _train(model, net, x, pb) -> tuple[MemorySink, Probe]:
    sink = MemorySink()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with Probe(net, every=1, sinks=[sink], probe_batch=pb, probe_every=1) as probe:
        for step in range(STEPS):
            _, loss = net(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            probe.step(step, scalars={"loss": loss.detach()})
    return sink, probe


def _dump(sink: MemorySink, probe: Probe) -> dict:
    return {
        "records": [
            {"step": r.step, "scalars": r.scalars, "hists": {k: list(h.counts) for k, h in r.hists.items()}}
            for r in sink.records
        ],
        "world_seen": probe.stats.log_steps,
    }


def _rank(rank: int, world: int, port: int, out: str, device: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny().to(device)
        x = batch(model, 2 * world).to(device)
        half = x[2 * rank : 2 * rank + 2]
        sink, probe = _train(model, DDP(model), half, x[:1])
        Path(out, f"rank{rank}.json").write_text(json.dumps(_dump(sink, probe)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_two_ranks_merge_into_the_single_process_statistics(tmp_path, device):
    """On CUDA (both gloo ranks on one GPU) the merge runs on a side stream while the hooks write
    a second buffer: two log steps check that the buffers take turns without losing a step."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path), device), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["records"] for r in (0, 1))
    model = tiny().to(device)
    x = batch(model, 4).to(device)
    single = _dump(*_train(model, model, x, x[:1]))["records"]
    assert [r["step"] for r in r0] == [r["step"] for r in single] == list(range(STEPS))
    for a, b, s in zip(r0, r1, single, strict=True):
        # every rank holds the same merged numbers (the loss too: device scalars are averaged)
        assert a["scalars"] == b["scalars"] and a["hists"] == b["hists"]
        assert a["scalars"]["loss"] == pytest.approx(s["scalars"]["loss"], rel=1e-5)
        # k_abs_concentration's mean direction is per forward pass, hence per rank
        assert_stats_close(a["scalars"], s["scalars"], skip=("k_abs_concentration",), rtol=1e-4,
                           atol=1e-5)
        for k, counts in s["hists"].items():
            assert sum(a["hists"][k]) == sum(counts)
            assert np.abs(np.array(a["hists"][k]) - np.array(counts)).sum() <= 2, k
