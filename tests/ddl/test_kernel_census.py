"""bench/kernel_census.py: inductor's Triton code for a compiled step, counted on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def census(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_census.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.skipif(HAS_TRITON, reason="this checks the message given where triton is missing")
def test_without_triton_it_says_what_to_install():
    res = census("--variants", "additive")
    assert res.returncode != 0
    assert "needs triton importable" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.kernels  # make test-kernels: the pass with triton importable
@pytest.mark.skipif(not HAS_TRITON, reason="the census needs triton importable (nothing is compiled)")
def test_census_counts_what_the_fold_removes(tmp_path):
    """Tiny preset, three variants: both graphs found, every Triton launch given bytes, and the fold
    (the readout inside the fused update, the default under compile) leaves fewer backward launches and
    bytes than the unfolded fused path; no variant keeps EC's convolution."""
    out = tmp_path / "census.jsonl"
    res = census("--preset", "tiny", "--seq", "64", "--variants", "additive,ddl_dv4_fused:nofold,ddl_dv4_fused",
                 "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["additive", "ddl_dv4_fused:nofold", "ddl_dv4_fused"]
    for r in rows.values():
        for part in ("forward", "backward"):
            g = r[part]
            assert 0 < g["triton_launches"] <= g["launches"] and g["triton_mb"] > 0
            assert sum(n for _, n, _ in g["kernels"]) == g["launches"]
            assert not any("convolution" in k for k, _, _ in g["kernels"])
    plain, fold = rows["ddl_dv4_fused:nofold"], rows["ddl_dv4_fused"]  # compiled, the fold is the default
    for r in (plain, fold):  # ddl.fused's kernels launched by inductor, once a site each way, with their bytes
        for part, kernel in (("forward", "_fwd_chunk_kernel"), ("backward", "_bwd_chunk_kernel")):
            assert [(n, mb > 0) for k, n, mb in r[part]["kernels"] if k == kernel] == [(8, True)], r[part]["kernels"]
        assert not any(k.startswith("torch.ops.deltascope") for k, _, _ in r["forward"]["kernels"])
    assert fold["backward"]["launches"] < plain["backward"]["launches"]
    assert fold["backward"]["triton_mb"] < plain["backward"]["triton_mb"]
    assert "fwd launches" in res.stdout


@pytest.mark.kernels  # make test-kernels: the pass with triton importable
@pytest.mark.skipif(not HAS_TRITON, reason="the census needs triton importable (nothing is compiled)")
def test_census_with_a_probe_shows_its_statistics_in_the_forward(tmp_path):
    """--probe: a collecting probe's statistics compile into the forward graph (more launches, the fused kernel
    kept); the backward is the model's alone."""
    out = tmp_path / "census.jsonl"
    for extra in ((), ("--probe",)):
        res = census("--preset", "tiny", "--seq", "64", "--variants", "ddl_dv4_fused", "--json", str(out), *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    bare, probed = map(json.loads, out.read_text().splitlines())
    assert (bare["probe"], probed["probe"]) == (False, True)
    assert probed["forward"]["launches"] > bare["forward"]["launches"]
    assert [n for k, n, _ in probed["forward"]["kernels"] if k == "_fwd_chunk_kernel"] == [8]  # the kernel kept
    assert probed["backward"]["launches"] == bare["backward"]["launches"]


@pytest.mark.kernels  # make test-kernels: the pass with triton importable
@pytest.mark.skipif(not HAS_TRITON, reason="the census needs triton importable (nothing is compiled)")
def test_census_norms_are_persistent_reductions_at_d_768(tmp_path):
    """Small preset (d = 768), d_v = 4: every forward kernel that normalises (an rsqrt in its name) is one persistent
    reduction, x read once. A value head whose rows o > 0 are read at an offset of w turned a site's norm-and-heads
    kernel into a looped one, x read twice (``ddl.layers._NarrowProduct``). Neither the tiny preset (d = 128) nor
    64 tokens shows it: inductor's heuristics there choose persistent reductions anyway."""
    out = tmp_path / "census.jsonl"
    res = census("--preset", "small", "--seq", "1024", "--variants", "ddl_dv4_fused", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    kernels = json.loads(out.read_text())["forward"]["kernels"]
    norms = {k: n for k, n, _ in kernels if "rsqrt" in k}
    assert sum(norms.values()) >= 2 * 12, kernels  # at least the two norms of each block
    assert all(k.startswith("triton_per_") for k in norms), norms
    gated = [n for k, n in norms.items() if "sigmoid" in k]  # the norm and the gate's logit in one kernel a site
    assert gated == [24], norms
