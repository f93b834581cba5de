#!/usr/bin/env bash
# Issue 21: one seed's fine-tuned model and CoDi student continued past Table 1's budget.
#   launch/issue21/table1_budget.sh WORKDIR [SEED (1)] [STEPS (1000)]
# 1. The 500-step rows (bicubic, finetune, codi) of seed SEED in WORKDIR/short, unless FROM=DIR
#    names a Table 1 workdir that already holds their checkpoints (DIR/seed<S>/<row>/checkpoints).
# 2. Their checkpoints copied to WORKDIR/long, and the rows continued there to STEPS steps
#    (`train.num_steps=STEPS`: the cosine schedule of STEPS steps, so a warm restart at step 500).
# 3. benchmarks/table1_budget.py compares the two budgets on the test photos and stores the long
#    rows' eval.json and the report under benchmarks/results/table1_budget/.
# Cost (seed 1, 500 -> 1000 steps, beside two direct_cm runs on the 2-core box): 66 min, of
#   which the fine-tuned model's evaluation (its 200-step DDIM) took half. Re-running resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORKDIR="${1:?usage: table1_budget.sh WORKDIR [SEED] [STEPS]}"
SEED="${2:-1}"; STEPS="${3:-1000}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
ROWS="--config.table1.rows=('bicubic','finetune','codi')"
SRC="${FROM:-$WORKDIR/short}"

table1() { "$PY" -m cdd_jax.main --config="$ROOT/configs/table1.py" "$ROWS" \
             "--config.table1.seeds=($SEED,)" "$@"; }

have_checkpoints() { [ -d "$SRC/seed$SEED/finetune/checkpoints/500" ] && \
                     [ -d "$SRC/seed$SEED/codi/checkpoints/500" ]; }
if ! have_checkpoints; then
  [ -z "${FROM:-}" ] || { echo "FROM=$FROM lacks seed$SEED's 500-step checkpoints" >&2; exit 2; }
  table1 --workdir="$SRC"
fi
for row in finetune codi; do
  dst="$WORKDIR/long/seed$SEED/$row"
  if [ ! -d "$dst/checkpoints" ]; then
    mkdir -p "$dst" && cp -r "$SRC/seed$SEED/$row/checkpoints" "$dst/checkpoints.tmp" \
      && mv "$dst/checkpoints.tmp" "$dst/checkpoints"
  fi
done
table1 --workdir="$WORKDIR/long" "--config.train.num_steps=$STEPS"
"$PY" "$ROOT/benchmarks/table1_budget.py" --long="$WORKDIR/long/seed$SEED"
