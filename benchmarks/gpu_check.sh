#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU worker (run from the repository root).
# Needs: .gpu/demo128 and .gpu/demo224 made here by `benchmarks/gpu_train.py pack`, and the
# wheels the worker lacks (monai, pydicom) in .whl/. Writes its logs to ${OUT:-/tmp/gpu-check}.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step() {  # name, time limit, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | grep -v -E "litlogger|Tip:|TPU|LOCAL_RANK|GPU available" | tee "$out/$name.txt"
}
step throughput-asc 90 python3 benchmarks/train_throughput.py --size 224 --batch 32 --steps 40
step throughput-paper 120 python3 benchmarks/train_throughput.py --size 224 --batch 32 --steps 40 \
  --backbone densenet121 --shape-backbone resnet18 --features 256
step train-default 150 python3 benchmarks/gpu_train.py run .gpu/demo128
step train-paper 220 python3 benchmarks/gpu_train.py run .gpu/demo224 --profile paper
