#!/usr/bin/env bash
# Seed 002's detection runs on smollm2-135m, CPU, end to end (DTYPE=bfloat16: all of it in bf16,
# written beside the fp32 results as detection_cpu_bf16.*, with each tier checked against the
# fp32 run's interval):
# magnitudes are relative to each layer range's mean residual norm (SmolLM2's norms grow from ~50
# to ~680 with depth, so absolute 5/10 in the late layers is invisible: see the README);
# vectors -> data per variant -> LoRA runs -> B1 on the base model and every run -> summary JSON.
# Finished stages are skipped on rerun (training resumes; an eval with metrics.json is kept).
# Usage: bash benchmarks/detection_runs.sh [preset ...]   (default: the five presets)
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=${DTYPE:-float32}
case "$DTYPE" in float32) SUFFIX="" ;; bfloat16) SUFFIX=_bf16 ;; *) echo "DTYPE: float32 or bfloat16" >&2; exit 2 ;; esac
OUT=${OUT:-runs/detection-cpu$SUFFIX}
I=.venv/bin/introspect
M=smollm2-135m
V=$OUT/vectors/random.safetensors
C=$OUT/vectors/concepts.safetensors
PRESETS=("${@:-original flipped-labels food-control r1-minimal vague-prompt}")
PRESETS=(${PRESETS[@]})
MAGS=(--magnitude-mode relative --magnitudes 0.05,0.1,0.2,0.3)
TRAIN_OPTS=(--dtype "$DTYPE" --set lr=5e-4 --set warmup_steps=20 --set eval_every=50 --set save_every=50 --set val_max_examples=128)
EVAL_OPTS=(--dtype "$DTYPE" --vectors "$V" --concepts "$C" --n-per-tier 400 "${MAGS[@]}")

[ -f "$V" ] || $I vectors random --model $M --n 200 --n-train 100 --seed 42 --out "$V"
[ -f "$C" ] || $I vectors concepts --model $M --dtype "$DTYPE" --out "$C"

variant_of() { case "$1" in r1-minimal) echo original ;; *) echo "$1" ;; esac; }
# The detection runs get two passes over the data; the controls' outcome is clear after one.
epochs_of() { case "$1" in original|r1-minimal) echo 2 ;; *) echo 1 ;; esac; }

[ -f "$OUT/eval/base/metrics.json" ] || $I eval detection --model $M "${EVAL_OPTS[@]}" --food --out "$OUT/eval/base"
for p in "${PRESETS[@]}"; do
  v=$(variant_of "$p")
  [ -f "$OUT/data/$v/val.parquet" ] || \
    $I data --model $M --variant "$v" --n 2000 --val-fraction 0.1 --vectors "$V" --seed 0 "${MAGS[@]}" --out "$OUT/data/$v"
  [ -d "$OUT/train/$p/final" ] || \
    $I train --model $M --data "$OUT/data/$v" --vectors "$V" --preset "$p" --out "$OUT/train/$p" --resume \
      --epochs "$(epochs_of "$p")" "${TRAIN_OPTS[@]}"
  food=(); [ "$p" = food-control ] && food=(--food)
  [ -f "$OUT/eval/$p/metrics.json" ] || \
    $I eval detection --model $M --adapter "$OUT/train/$p" "${EVAL_OPTS[@]}" "${food[@]}" --out "$OUT/eval/$p"
done
COMPARE=(); [ "$DTYPE" = float32 ] || COMPARE=(--compare benchmarks/results/detection_cpu.json)
.venv/bin/python benchmarks/summarize_detection.py "$OUT" --dtype "$DTYPE" "${COMPARE[@]}" \
  --out "benchmarks/results/detection_cpu$SUFFIX.json" --markdown "benchmarks/results/detection_cpu$SUFFIX.md"
