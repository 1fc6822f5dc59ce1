#!/usr/bin/env bash
# The GPU path measured in one command (<= 10 min on one H100/H200; random weights, no
# downloads): writes benchmarks/results/gpu_<device>.json. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" benchmarks/gpu_check.py \
  --out "benchmarks/results/gpu_${device}.json" "$@"
