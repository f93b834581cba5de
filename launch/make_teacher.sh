#!/usr/bin/env bash
# The recipe of the shipped teacher (cdd_jax/assets/teacher), one command:
#     bash launch/make_teacher.sh [WORKDIR] [OUT]
# Pretrains `configs/pretrain.py` (the default preset, unchanged) in WORKDIR and exports its EMA
# weights to OUT as a diffusers pipeline folder (UNet2DModel + DDPMScheduler + cdd_jax.json).
# Resumable: run it again after an interruption and it continues from the last checkpoint.
set -euo pipefail
WORKDIR=${1:-runs/teacher}
OUT=${2:-cdd_jax/assets/teacher}
PYTHON=${PYTHON:-python}
"$PYTHON" -m cdd_jax.main --config=configs/pretrain.py --workdir="$WORKDIR"
"$PYTHON" -m cdd_jax.export --workdir="$WORKDIR" --out="$OUT" \
  --note="bash launch/make_teacher.sh: configs/pretrain.py default preset, $(date -u +%F)"
