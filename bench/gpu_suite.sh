#!/usr/bin/env bash
# One device call that reproduces every GPU figure in docs/PERFORMANCE.md for issues 2 and 3.
# Run from the repository root on a CUDA machine; writes JSON lines and logs under ${OUT:-/tmp/out}.
#   bash bench/gpu_suite.sh [throughput|ratios|host|kernels|stats|overhead[-eager|-compiled|-dv4]|train|tests|all]
# ratios: issue 6's DDL/additive ratios in one process, synced every step and every block (under 600 s);
# host: the same at B = 1, where a step takes about the host's time to issue it, and where that time goes (cProfile);
# kernels: the fused kernels' launch sweep and the grouped kernel profile (another call).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DELTASCOPE_CACHE=${DELTASCOPE_CACHE:-/tmp/dscache}
# the repository's packages without an install (the device image has torch and triton, not pydantic and the rest:
# carry those as wheels, and put their folder on PYTHONPATH before calling this)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/device.txt"

if [[ $what == throughput || $what == all ]]; then
  python3 bench/throughput.py --preset small --batch 16 --seq 1024 --steps 30 --json "$OUT/throughput.jsonl"
  python3 bench/throughput.py --preset small --batch 16 --seq 1024 --steps 30 --compile --json "$OUT/throughput.jsonl"
fi
if [[ $what == ratios || $what == all ]]; then
  python3 bench/throughput.py --preset small --batch 16 --seq 1024 --steps 30 --compile --sync both \
    --variants additive,ddl_dv1,ddl_dv4_fused,ddl_dv4_fused:nomm --json "$OUT/ratios.jsonl"
fi
if [[ $what == host || $what == all ]]; then
  # B = 1: the GPU gets a sixteenth of the work, so each step takes about its host's time to issue it
  python3 bench/throughput.py --preset small --batch 1 --seq 1024 --steps 40 --compile --sync both \
    --variants additive,ddl_dv1,ddl_dv4_fused --json "$OUT/ratios-b1.jsonl"
  python3 bench/host_profile.py --variants additive,ddl_dv4_fused --steps 15 --json "$OUT/host-profile.jsonl"
  python3 bench/host_profile.py --variants ddl_dv4_fused --steps 15 --probe --json "$OUT/host-profile.jsonl"
fi
if [[ $what == kernels || $what == all ]]; then
  python3 bench/fused_kernels.py --json "$OUT/fused-kernels.jsonl"
  python3 bench/ec_kernels.py --json "$OUT/ec-kernels.jsonl"
  python3 bench/throughput_profile.py --compile --variants additive,ddl_dv1,ddl_dv4_fused,ddl_dv4_fused:nofold --out "$OUT"
fi
if [[ $what == stats || $what == all ]]; then
  # the eager probe's statistics call alone: compiled by inductor, then as the probe runs it (Triton reductions)
  python3 bench/probe_stats.py --json "$OUT/probe-stats.jsonl"
  python3 bench/probe_stats.py --kernels --launches "2,256,2;4,256,4;4,512,4" --json "$OUT/probe-stats.jsonl"
  python3 bench/probe_stats.py --kernels --dv 4 --json "$OUT/probe-stats.jsonl"
  # d_v = 4: k handed over against k made from h (the default), the state's chunk, and the op a compiled model calls
  python3 bench/probe_stats.py --kernels --dv 4 --given-k --json "$OUT/probe-stats.jsonl"
  python3 bench/probe_stats.py --kernels --dv 4 --launches "2,256,2,256;2,256,2,1024;1,256,2,1024" \
    --json "$OUT/probe-stats.jsonl"
  python3 bench/probe_stats.py --op --dv 4 --json "$OUT/probe-stats.jsonl"
fi
# overhead takes over 600 s: on a machine with a per-call limit run its parts, each about 200 s
if [[ $what == overhead || $what == overhead-eager || $what == all ]]; then
  python3 bench/probe_overhead.py --preset small --batch 16 --seq 1024 --blocks 10 --steps 10 --json "$OUT/overhead.jsonl"
fi
if [[ $what == overhead || $what == overhead-compiled || $what == all ]]; then
  python3 bench/probe_overhead.py --preset small --batch 16 --seq 1024 --compile --json "$OUT/overhead.jsonl"
fi
if [[ $what == overhead || $what == overhead-dv4 || $what == all ]]; then
  # a probed fused d_v=4 model keeps its kernel (observer hooks): the probe against the same model disarmed,
  # then where the probe's time goes
  python3 bench/probe_overhead.py --preset small --batch 16 --seq 1024 --compile --blocks 6 --steps 12 \
    --set '{"d_v": 4, "fused_delta": true}' --json "$OUT/overhead.jsonl"
  python3 bench/probe_profile.py --preset small --batch 16 --seq 1024 --compile \
    --set '{"d_v": 4, "fused_delta": true}' --out "$OUT"
fi
if [[ $what == train || $what == all ]]; then
  for c in "" "--compile"; do
    python3 -m ddl.cli train --preset small --max-steps 60 --every 1 --log-every 20 --eval-every 1000 \
      --out "/tmp/runs/small$c" $c 2>&1 | grep -v "it/s\]" | tail -n 8 | tee -a "$OUT/train.log"
  done
fi
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider -p no:logging -m gpu tests/ddl/test_fused.py tests/probes tests/ddl/test_data.py 2>&1 | tail -n 15 | tee "$OUT/gpu-tests.log"
fi
