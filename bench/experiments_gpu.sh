#!/usr/bin/env bash
# One device call that reproduces the GPU runs behind docs/EXPERIMENTS.md: the gates_small grid
# (124M preset, Shakespeare) with four workers sharing one GPU, then copies each finished run's
# stats, summary and log under ${OUT:-/tmp/out} (checkpoints stay behind: 1.5 GB each).
#   bash bench/experiments_gpu.sh [SPEC] [DEVICES]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
spec=${1:-gates_small}; devices=${2:-cuda,cuda,cuda,cuda}
export PYTHONUNBUFFERED=1 DELTASCOPE_CACHE=${DELTASCOPE_CACHE:-/tmp/dscache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/device.txt"
# build the corpus cache once, before the workers race for it
python3 -c 'from ddl.data import prepare_corpus; print(prepare_corpus(vocab_size=4096))' 2>&1 | tail -n 2
exp=/tmp/exp/$spec
timeout "${BUDGET_S:-520}" python3 -m ddl.experiment "$spec" --out "$exp" --devices "$devices" 2>&1 \
  | grep -v "it/s\]" > "$OUT/experiment.log"
echo "experiment exit: ${PIPESTATUS[0]}" | tee -a "$OUT/experiment.log"
for d in "$exp"/*-seed*; do
  [[ -f $d/summary.json ]] || { echo "unfinished: $d"; continue; }
  mkdir -p "$OUT/$spec/$(basename "$d")"
  cp "$d"/stats.jsonl "$d"/summary.json "$d"/*.json "$OUT/$spec/$(basename "$d")/" 2>/dev/null
done
tail -n 30 "$OUT/experiment.log"
