#!/usr/bin/env bash
# Issue 21's Table 1 re-run, resumable across sessions (launch/issue21/README.md).
#   launch/issue21/table1_rerun.sh WORKDIR [PART...]
# Parts (default: all, in order):
#   ode    seed 0's bicubic/finetune/cm/direct_cm rows, then benchmarks/ode_error_sr.py (issue 20)
#   table  the whole table, every seed of configs/table1.py
#   seedN  the whole table for seed N only (N = 0, 1, 2: several can run side by side in separate
#          WORKDIRs); its rows are harvested, the aggregates are not (a later `table` run writes
#          them from the stored rows without training anything)
# Finished rows committed under benchmarks/results/table1_v2/ are copied into WORKDIR first, and every row
# that finishes is copied back (`harvest`), so a session that ends mid-run loses only the row
# it was training.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORKDIR="${1:?usage: table1_rerun.sh WORKDIR [ode|table|seedN|harvest]...}"; shift
PARTS=("${@:-ode table}")
PY="${PYTHON:-$ROOT/.venv/bin/python}"
STORE="$ROOT/benchmarks/results/table1_v2"

seed_rows() {  # copy finished rows (eval.json + predictions) from $1 to $2
  local src="$1" dst="$2"
  [ -d "$src" ] || return 0
  (cd "$src" && find . -path './seed*/*/eval.json' -print) | while read -r f; do
    local d; d="$(dirname "$f")"
    if [ ! -f "$dst/$d/eval.json" ] || ! cmp -s "$src/$f" "$dst/$f"; then
      mkdir -p "$dst/$d"
      cp "$src/$d/eval_predictions.npz" "$dst/$d/" 2>/dev/null || true
      cp "$src/$f" "$dst/$d/eval.json.tmp" && mv "$dst/$d/eval.json.tmp" "$dst/$f"
      echo "copied $d -> $dst"
    fi
  done
}
AGGREGATES=1
for part in ${PARTS[@]}; do case "$part" in seed*) AGGREGATES=0 ;; esac; done
harvest() {
  seed_rows "$WORKDIR" "$STORE"
  [ "$AGGREGATES" = 1 ] || return 0
  for f in table1.md table1.json table1_per_seed.json table1_photos_validation.json table1_photos_test.json \
           table1_quality_vs_nfe.png table1_quality_vs_nfe_test.png table1_grid.png; do
    [ -f "$WORKDIR/$f" ] && cp "$WORKDIR/$f" "$STORE/$f"
  done
  return 0
}

mkdir -p "$WORKDIR" "$STORE"
seed_rows "$STORE" "$WORKDIR"
( while sleep 120; do harvest > /dev/null 2>&1 || true; done ) &
trap 'kill $! 2>/dev/null; harvest' EXIT
for part in ${PARTS[@]}; do
  case "$part" in
    ode)
      "$PY" -m cdd_jax.main --config="$ROOT/configs/table1.py" --workdir="$WORKDIR" \
        "--config.table1.rows=('bicubic','finetune','cm','direct_cm')" "--config.table1.seeds=(0,)"
      harvest
      "$PY" "$ROOT/benchmarks/ode_error_sr.py" --workdir="$WORKDIR" --lpips ;;
    table)
      "$PY" -m cdd_jax.main --config="$ROOT/configs/table1.py" --workdir="$WORKDIR"
      harvest ;;
    seed[0-9]*)
      "$PY" -m cdd_jax.main --config="$ROOT/configs/table1.py" --workdir="$WORKDIR" \
        "--config.table1.seeds=(${part#seed},)"
      harvest ;;
    harvest) harvest ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
