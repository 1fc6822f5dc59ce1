#!/usr/bin/env bash
# Issue 16's table on smollm2-135m, 2 CPU cores: plans/localization.yaml (a Phase C run per
# question: layer range, strength, which of ten sentences, which of ten held-out concepts), then
# OUT_DIR/localization.json ({"questions": {"layers", "strength", "sentence", "concepts"}}, each
# with accuracy, ci, chance, n, n_options, base_accuracy, prior_accuracy; concepts also
# mutual_information_bits) and OUT_DIR/localization.md (the README's table).
# Finished stages are skipped on rerun. Usage: bash benchmarks/localization_runs.sh OUT_DIR
set -euo pipefail
OUT=$(realpath -m "${1:?usage: bash benchmarks/localization_runs.sh OUT_DIR}")
cd "$(dirname "$0")/.."
start=$(date +%s)
.venv/bin/introspect run plans/localization.yaml --runs-dir "$OUT"
wall=$(( $(date +%s) - start ))
.venv/bin/python benchmarks/summarize_localization.py "$OUT/localization" --wall-s "$wall" \
  --out "$OUT/localization.json" --markdown "$OUT/localization.md"
