#!/usr/bin/env bash
# Seed 002's detection runs on smollm2-135m, CPU fp32, end to end:
# vectors -> data per variant -> LoRA runs -> B1 on the base model and every run -> summary JSON.
# Finished stages are skipped on rerun (training resumes; an eval with metrics.json is kept).
# Usage: bash benchmarks/detection_runs.sh [preset ...]   (default: the five presets)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/detection-cpu}
I=.venv/bin/introspect
M=smollm2-135m
V=$OUT/vectors/random.safetensors
C=$OUT/vectors/concepts.safetensors
PRESETS=("${@:-original r1-minimal flipped-labels food-control vague-prompt}")
PRESETS=(${PRESETS[@]})
TRAIN_OPTS=(--epochs 1 --set lr=5e-4 --set warmup_steps=20 --set eval_every=25 --set save_every=25)
EVAL_OPTS=(--vectors "$V" --concepts "$C" --n-per-tier 400 --magnitudes 5,10,20,30)

[ -f "$V" ] || $I vectors random --model $M --n 200 --n-train 100 --seed 42 --out "$V"
[ -f "$C" ] || $I vectors concepts --model $M --out "$C"

variant_of() { case "$1" in r1-minimal) echo original ;; *) echo "$1" ;; esac; }

[ -f "$OUT/eval/base/metrics.json" ] || $I eval detection --model $M "${EVAL_OPTS[@]}" --food --out "$OUT/eval/base"
for p in "${PRESETS[@]}"; do
  v=$(variant_of "$p")
  [ -f "$OUT/data/$v/val.parquet" ] || \
    $I data --model $M --variant "$v" --n 2000 --val-fraction 0.1 --vectors "$V" --seed 0 --out "$OUT/data/$v"
  [ -d "$OUT/train/$p/final" ] || \
    $I train --model $M --data "$OUT/data/$v" --vectors "$V" --preset "$p" --out "$OUT/train/$p" --resume "${TRAIN_OPTS[@]}"
  food=(); [ "$p" = food-control ] && food=(--food)
  [ -f "$OUT/eval/$p/metrics.json" ] || \
    $I eval detection --model $M --adapter "$OUT/train/$p" "${EVAL_OPTS[@]}" "${food[@]}" --out "$OUT/eval/$p"
done
.venv/bin/python benchmarks/summarize_detection.py "$OUT" --out benchmarks/results/detection_cpu.json
