#!/usr/bin/env bash
# The recipe of the shipped student (cdd_jax/assets/student), one command:
#     bash launch/make_student.sh [WORKDIR] [OUT]
# Runs the main job (`configs/sr.py`, the default preset, unchanged: the shipped teacher ->
# CoDi distillation -> evaluation -> the exported student folder WORKDIR/student) and copies that
# folder to OUT, replacing it whole. Resumable: run it again after an interruption and the job
# continues from its last checkpoint; on a finished WORKDIR it only evaluates and exports again.
set -euo pipefail
WORKDIR=${1:-runs/sr}
OUT=${2:-cdd_jax/assets/student}
PYTHON=${PYTHON:-python}
"$PYTHON" -m cdd_jax.main --config=configs/sr.py --workdir="$WORKDIR"
# The folder loads (its manifest of content hashes checks) before it replaces the shipped one.
"$PYTHON" -c "import sys; from cdd_jax.inference.student import load_student; load_student(sys.argv[1])" "$WORKDIR/student"
rm -rf "$OUT.new"
cp -r "$WORKDIR/student" "$OUT.new"
rm -rf "$OUT.old"
if [ -e "$OUT" ]; then mv "$OUT" "$OUT.old"; fi
mv "$OUT.new" "$OUT"
rm -rf "$OUT.old"
echo "student folder: $OUT"
