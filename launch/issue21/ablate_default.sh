#!/usr/bin/env bash
# Issue 21: each deviation of the default SR job (configs/sr.py) removed in turn, scored on the
# validation photos only (8 crops of 128 px: crop_grid=2); no test photo is looked at.
#   launch/issue21/ablate_default.sh WORKDIR [RUN...]   (runs: base no_anchor lambda1 no_shuffle)
# "base" is the default job itself (its exported student is the shipped one). The re-noising
# deviation ("fresh" vs "ddim") needs no run of its own: every job scores both samplers.
# Each finished run's eval/photos_validation.json is copied to benchmarks/results/ablate_default/RUN.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORKDIR="${1:?usage: ablate_default.sh WORKDIR [base|no_anchor|lambda1|no_shuffle]...}"; shift
RUNS=("${@:-base no_anchor lambda1 no_shuffle}")
PY="${PYTHON:-$ROOT/.venv/bin/python}"
STORE="$ROOT/benchmarks/results/ablate_default"
mkdir -p "$WORKDIR" "$STORE"
for run in ${RUNS[@]}; do
  case "$run" in
    base) extra=() ;;
    no_anchor) extra=(--config.control.anchor_precision=0.0) ;;
    lambda1) extra=(--config.distill.lambda_x=1.0) ;;
    no_shuffle) extra=(--config.degradation.channel_shuffle_prob=0.0) ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
  if [ -f "$STORE/$run.json" ]; then echo "$run: done ($STORE/$run.json)"; continue; fi
  "$PY" -m cdd_jax.main --config="$ROOT/configs/sr.py" --workdir="$WORKDIR/$run" \
    --config.evaluate.photos.crop_grid=2 "--config.evaluate.photos.splits=('validation',)" \
    "${extra[@]}"
  cp "$WORKDIR/$run/eval/photos_validation.json" "$STORE/$run.json.tmp"
  mv "$STORE/$run.json.tmp" "$STORE/$run.json"
  cp "$WORKDIR/$run/eval/photos_validation_per_image.csv" "$STORE/$run.per_image.csv"
  cp "$WORKDIR/$run/eval/results.json" "$STORE/$run.crops.json"
done
