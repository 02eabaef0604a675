"""bench/kernel_registers.py: the fused kernels' registers on an H100, from ptxas on a machine without a GPU."""

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


def registers(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # a triton on it stays
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": path}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_registers.py"), *args], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.skipif(HAS_TRITON, reason="this checks the message given where triton is missing")
def test_without_triton_it_says_what_to_install():
    res = registers()
    assert res.returncode != 0
    assert "needs triton importable" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="compiling for sm_90a needs triton importable (nothing runs)")
def test_unknown_kernel_is_named():
    res = registers("--kernels", "forward,sideways")
    assert res.returncode != 0 and "unknown sideways" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="compiling for sm_90a needs triton importable (nothing runs)")
def test_registers_of_each_launch(tmp_path):
    """Every kernel and launch asked for is compiled and read back; a thread's share of the work, and
    so its registers, does not grow as warps are added, and the multiprocessor's count follows."""
    out = tmp_path / "regs.jsonl"
    res = registers("--kernels", "forward,backward_read,backward_dv1", "--warps", "4,16", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 + 4 * 2  # tile kernels: straight-line and loop; d_v = 1: 1, 2, 4, 8 rows
    assert {r["kernel"] for r in rows} == {"forward", "backward_read", "backward_dv1"}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["blocks_per_sm"] >= 1
        assert r["blocks_per_sm"] * r["warps"] <= 64
    by = {(r["kernel"], r.get("strided"), r.get("rows"), r["warps"]): r for r in rows}
    for (kernel, strided, n_rows, warps), r in by.items():
        if warps == 4:
            assert by[(kernel, strided, n_rows, 16)]["registers"] <= r["registers"]
    assert "backward_read" in res.stdout and "regs" in res.stdout
